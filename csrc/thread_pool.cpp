#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "spin_wait.h"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define LWK_HAVE_PTHREAD_ATFORK 1
#endif

namespace lwk {
namespace detail {
namespace {

// How long an idle worker (or a caller waiting for workers) spins before blocking.
constexpr auto kSpin = std::chrono::microseconds(100);
constexpr int kMaxWorkers = 255;

class ThreadPool {
 public:
  ThreadPool() = default;
  // Never destroyed (see instance()); workers block on cv_ at process exit.

  void run(int n, TaskFn fn, void* ctx) {
    if (n <= 1) {
      fn(ctx, 0);
      return;
    }
    if (n - 1 > kMaxWorkers) n = kMaxWorkers + 1;
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) {  // another call owns the workers: do everything here
      for (int i = 0; i < n; ++i) fn(ctx, i);
      return;
    }
    ensure_workers(n - 1);
    error_ = nullptr;
    const uint64_t gen = ++gen_;
    pending_.store(n - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(m_);
      for (int w = 0; w < n - 1; ++w) {
        Worker& wk = *workers_[w];
        wk.fn.store(fn, std::memory_order_relaxed);
        wk.ctx.store(ctx, std::memory_order_relaxed);
        wk.task.store(w + 1, std::memory_order_relaxed);
        wk.word.store(gen << 2 | kPosted, std::memory_order_release);
      }
    }
    cv_.notify_all();

    std::exception_ptr mine;
    try {
      fn(ctx, 0);
    } catch (...) {
      mine = std::current_exception();
    }
    // Tasks share their work dynamically (parallel.h), so by now every
    // task that has not started has nothing left to do: cancel those instead of waiting for a
    // worker that may not even be scheduled yet.
    for (int w = 0; w < n - 1; ++w) {
      uint64_t expected = gen << 2 | kPosted;
      if (workers_[w]->word.compare_exchange_strong(expected, gen << 2 | kCancelled,
                                                    std::memory_order_acq_rel)) {
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }

    // Wait for the workers that did start: spin, then block.
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    int polls = 0;
    while (pending_.load(std::memory_order_acquire) != 0) {
      cpu_relax();
      if ((++polls & 63) == 0 && std::chrono::steady_clock::now() > deadline) {
        std::unique_lock<std::mutex> lk(done_m_);
        done_cv_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
        break;
      }
    }
    std::exception_ptr err = mine ? mine : error_;
    error_ = nullptr;
    busy.unlock();
    if (err) std::rethrow_exception(err);
  }

 private:
  // Worker::word = generation << 2 | state. The caller posts (gen, kPosted) after writing the
  // task fields; a worker claims it by CAS to kRunning, the caller may instead cancel it by CAS
  // to kCancelled. A worker that lost the race never touches the (possibly gone) task context.
  static constexpr uint64_t kPosted = 0, kRunning = 1, kCancelled = 2, kStateMask = 3;

  struct Worker {
    std::atomic<uint64_t> word{kCancelled};
    std::atomic<TaskFn> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
    std::atomic<int> task{0};
    std::thread thread;
  };

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* w = workers_.back().get();
      w->thread = std::thread([this, w] { loop(w); });
      w->thread.detach();
    }
  }

  static bool posted(uint64_t word, uint64_t seen_gen) {
    return (word & kStateMask) == kPosted && (word >> 2) != seen_gen;
  }

  void loop(Worker* w) {
    uint64_t seen_gen = 0;
    for (;;) {
      // Spin for a while, then sleep until the caller posts a task for us.
      const auto deadline = std::chrono::steady_clock::now() + kSpin;
      int polls = 0;
      uint64_t word;
      while (!posted(word = w->word.load(std::memory_order_acquire), seen_gen)) {
        cpu_relax();
        if ((++polls & 63) == 0 && std::chrono::steady_clock::now() > deadline) {
          std::unique_lock<std::mutex> lk(m_);
          cv_.wait(lk, [&] { return posted(w->word.load(std::memory_order_acquire), seen_gen); });
          polls = 0;
        }
      }
      const TaskFn fn = w->fn.load(std::memory_order_relaxed);
      void* const ctx = w->ctx.load(std::memory_order_relaxed);
      const int task = w->task.load(std::memory_order_relaxed);
      if (!w->word.compare_exchange_strong(word, (word & ~kStateMask) | kRunning,
                                           std::memory_order_acq_rel)) {
        continue;  // cancelled (or re-posted): the fields read above are stale, drop them
      }
      seen_gen = word >> 2;
      try {
        fn(ctx, task);
      } catch (...) {
        std::lock_guard<std::mutex> lk(done_m_);
        if (!error_) error_ = std::current_exception();
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(done_m_);  // pairs with the caller's predicate check
        done_cv_.notify_one();
      }
    }
  }

  std::mutex busy_;  // held by the call that owns the workers
  std::mutex m_;     // guards worker wake-ups
  std::condition_variable cv_;
  std::mutex done_m_;
  std::condition_variable done_cv_;
  std::atomic<int> pending_{0};
  uint64_t gen_ = 0;  // only touched by the busy_ owner
  std::exception_ptr error_;
  std::vector<std::unique_ptr<Worker>> workers_;  // only touched by the busy_ owner
};

std::atomic<ThreadPool*> g_pool{nullptr};
std::once_flag g_once;

#if defined(LWK_HAVE_PTHREAD_ATFORK)
// A forked child has none of the parent's threads (and maybe a locked mutex): give it a fresh
// pool. The old one is leaked on purpose; its memory is the child's copy and must not be touched.
void reset_after_fork() { g_pool.store(new ThreadPool, std::memory_order_release); }
#endif

ThreadPool& instance() {
  std::call_once(g_once, [] {
    g_pool.store(new ThreadPool, std::memory_order_release);  // leaked: no exit-time teardown
#if defined(LWK_HAVE_PTHREAD_ATFORK)
    pthread_atfork(nullptr, nullptr, reset_after_fork);
#endif
  });
  return *g_pool.load(std::memory_order_acquire);
}

}  // namespace

void pool_run(int n, TaskFn fn, void* ctx) { instance().run(n, fn, ctx); }

}  // namespace detail
}  // namespace lwk
