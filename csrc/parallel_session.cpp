// One host OpenMP region for many parallel_run calls (parallel.h: parallel_session).
//
// A native sequence at batch 1 makes 15-30 short parallel_run calls, 0.03-0.4 ms each. As one
// OpenMP region each, every call paid the team's fork (about 1.3 us until the second thread's task
// began) and join (about 1.4 us after the last task ended): 60-80 us of a 3 ms MobileNetV2 call.
// Inside a session the other threads of one region wait in a loop of their own, spinning on a
// word per thread: the calling thread posts a call's tasks to them, runs task 0, cancels the
// posts no thread has claimed (tasks share their work dynamically, so those have nothing left to
// do) and waits for the claimed ones, as lwkernels' thread pool does (thread_pool.cpp).
//
// Calls made on other threads, or made inside a task, run as before: the session belongs to the
// calling thread, and only while it is not running a call's tasks.
#include "parallel_session.h"

#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "host_openmp.h"
#include "parallel.h"
#include "spin_wait.h"

namespace lwk {
namespace detail {
namespace {

// Polls of a waiting thread before it starts yielding its core at each poll (tens of
// microseconds; a session's gaps between calls are a few microseconds, so this only matters
// where threads outnumber cores).
constexpr int kSpinPolls = 1 << 14;

class Session {
 public:
  explicit Session(int threads) : threads_(threads), slots_(new Slot[static_cast<std::size_t>(threads)]) {}

  // On the session's thread 0, outside any call's tasks: the call's tasks on this thread and the
  // session's others (see the file comment).
  void run(int n, TaskFn fn, void* ctx) {
    const int posted = (n < threads_ ? n : threads_) - 1;
    if (posted <= 0) {
      fn(ctx, 0);
      return;
    }
    const uint64_t gen = ++gen_;
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    pending_.store(posted, std::memory_order_relaxed);
    for (int t = 1; t <= posted; ++t) slots_[t].word.store(gen << 2 | kPosted, std::memory_order_release);
    std::exception_ptr mine;
    try {
      fn(ctx, 0);
    } catch (...) {
      mine = std::current_exception();
    }
    for (int t = 1; t <= posted; ++t) {
      uint64_t expected = gen << 2 | kPosted;
      if (slots_[t].word.compare_exchange_strong(expected, gen << 2 | kCancelled, std::memory_order_acq_rel)) {
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
    for (int polls = 0; pending_.load(std::memory_order_acquire) != 0;) {
      cpu_relax();
      if (++polls > kSpinPolls) std::this_thread::yield();
    }
    std::exception_ptr err = mine;
    {
      std::lock_guard<std::mutex> lk(error_m_);
      if (!err) err = error_;
      error_ = nullptr;
    }
    if (err) std::rethrow_exception(err);
  }

  // Thread `task` (> 0) of the region: runs what thread 0 posts to it until the session ends.
  void serve(int task) {
    if (task >= threads_) return;
    Slot& slot = slots_[task];
    uint64_t seen = 0;
    for (int polls = 0;;) {
      uint64_t word = slot.word.load(std::memory_order_acquire);
      if ((word & kStateMask) == kPosted && (word >> 2) != seen) {
        const TaskFn fn = fn_.load(std::memory_order_relaxed);
        void* const ctx = ctx_.load(std::memory_order_relaxed);
        if (!slot.word.compare_exchange_strong(word, (word & ~kStateMask) | kRunning,
                                               std::memory_order_acq_rel)) {
          continue;  // cancelled: the fields read above may belong to a later call, drop them
        }
        seen = word >> 2;
        try {
          fn(ctx, task);
        } catch (...) {
          std::lock_guard<std::mutex> lk(error_m_);
          if (!error_) error_ = std::current_exception();
        }
        pending_.fetch_sub(1, std::memory_order_acq_rel);
        polls = 0;
        continue;
      }
      if (done_.load(std::memory_order_acquire)) return;
      cpu_relax();
      if (++polls > kSpinPolls) std::this_thread::yield();
    }
  }

  void finish() { done_.store(true, std::memory_order_release); }

 private:
  // Slot::word = generation << 2 | state, as in thread_pool.cpp: thread 0 posts (gen, kPosted)
  // after writing fn_ and ctx_; a thread claims it by CAS to kRunning, or thread 0 cancels it by
  // CAS to kCancelled.
  static constexpr uint64_t kPosted = 0, kRunning = 1, kCancelled = 2, kStateMask = 3;
  struct alignas(64) Slot {
    std::atomic<uint64_t> word{kCancelled};
  };

  const int threads_;
  uint64_t gen_ = 0;  // only thread 0 touches it
  std::atomic<TaskFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  alignas(64) std::atomic<int> pending_{0};
  alignas(64) std::atomic<bool> done_{false};
  std::mutex error_m_;
  std::exception_ptr error_;
  std::unique_ptr<Slot[]> slots_;  // [threads_]; slot 0 unused
};

// The session whose thread 0 this thread is, while it is outside a call's tasks.
thread_local Session* t_session = nullptr;

struct Region {
  Session* session;
  void (*body)(void*);
  void* ctx;
  std::exception_ptr error;
};

void region_task(void* p, int task) {
  Region& r = *static_cast<Region*>(p);
  if (task != 0) {
    r.session->serve(task);
    return;
  }
  t_session = r.session;
  try {
    r.body(r.ctx);
  } catch (...) {
    r.error = std::current_exception();
  }
  t_session = nullptr;
  r.session->finish();
}

}  // namespace

bool session_run(int n, TaskFn fn, void* ctx) {
  Session* s = t_session;
  if (s == nullptr) return false;
  t_session = nullptr;  // calls made inside the tasks run on their own
  try {
    s->run(n, fn, ctx);
  } catch (...) {
    t_session = s;
    throw;
  }
  t_session = s;
  return true;
}

}  // namespace detail

void parallel_session(int threads, void (*body)(void*), void* ctx) {
  if (threads <= 1 || detail::t_session != nullptr || parallel_backend() == ParallelBackend::kThreadPool) {
    body(ctx);  // (the thread pool hands tasks over by spinning already)
    return;
  }
  auto session = std::make_unique<detail::Session>(threads);
  detail::Region region{session.get(), body, ctx, nullptr};
  if (!detail::host_openmp_run(threads, &detail::region_task, &region)) {
    body(ctx);
    return;
  }
  if (region.error) std::rethrow_exception(region.error);
}

}  // namespace lwk
