// Tests of parallel_run (csrc/parallel.h) on both backends: lwkernels' thread pool, and the host
// OpenMP runtime (host_openmp.h), which a program gets by loading one before the first call.
//
//   test_parallel                 no OpenMP runtime loaded: the pool, and asking for OpenMP fails
//   test_parallel --host-openmp   loads libgomp.so.1 privately first (as PyTorch's import does),
//                                 then runs every test on both backends
//
// Checked: each task index runs at most once and within [0, n), task 0 on the calling thread,
// dynamically shared work is done exactly once, the first exception reaches the caller, nested
// and concurrent calls neither deadlock nor lose work, calls inside a parallel_session do the
// same, and a forked child still computes.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "parallel.h"
#include "work_sharing.h"

#if defined(__linux__)
#include <dlfcn.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

namespace {

using lwk_test::g_failures;

using lwk::detail::parallel_run;

// Work shared through a counter, as the kernels share theirs; records who ran what.
struct Shared {
  static constexpr int kMaxTasks = 64;
  int n_items = 0;
  std::atomic<int> next{0};
  std::vector<std::atomic<int>> done;  // per item: how many times it was processed
  std::atomic<int> task_runs[kMaxTasks];
  std::thread::id caller;
  std::atomic<bool> task0_on_caller{false};
  explicit Shared(int items) : n_items(items), done(items) {
    for (auto& d : done) d.store(0);
    for (auto& t : task_runs) t.store(0);
    caller = std::this_thread::get_id();
  }
};

void shared_task(void* p, int task) {
  auto* s = static_cast<Shared*>(p);
  if (task >= 0 && task < Shared::kMaxTasks) s->task_runs[task].fetch_add(1);
  if (task == 0) s->task0_on_caller.store(std::this_thread::get_id() == s->caller);
  for (;;) {
    const int i = s->next.fetch_add(1);
    if (i >= s->n_items) return;
    s->done[i].fetch_add(1);
  }
}

void check_shared(const Shared& s, int n, const char* what) {
  int wrong_items = 0;
  for (const auto& d : s.done) wrong_items += d.load() != 1;
  CHECK(wrong_items == 0, "%s n=%d: %d items not processed exactly once", what, n, wrong_items);
  CHECK(s.task_runs[0].load() == 1, "%s n=%d: task 0 ran %d times", what, n, s.task_runs[0].load());
  CHECK(s.task0_on_caller.load(), "%s n=%d: task 0 did not run on the calling thread", what, n);
  for (int t = 1; t < Shared::kMaxTasks; ++t) {
    CHECK(s.task_runs[t].load() <= (t < n ? 1 : 0), "%s n=%d: task %d ran %d times", what, n, t,
          s.task_runs[t].load());
  }
}

void test_tasks_and_work(const char* what) {
  for (int n : {1, 2, 3, 4, 7, 16}) {
    for (int items : {0, 1, 5, 1000}) {
      Shared s(items);
      parallel_run(n, shared_task, &s);
      check_shared(s, n, what);
    }
  }
}

struct ThrowCtx {
  Shared shared{100};
  int thrower;
};

void throw_from(void* p, int task) {
  auto* c = static_cast<ThrowCtx*>(p);
  shared_task(&c->shared, task);
  if (task == c->thrower) throw std::runtime_error("task " + std::to_string(task) + " failed");
}

void test_exceptions(const char* what) {
  for (int thrower : {0, 1}) {
    ThrowCtx c;
    c.thrower = thrower;
    std::string message;
    try {
      parallel_run(2, throw_from, &c);
    } catch (const std::runtime_error& e) {
      message = e.what();
    }
    // Task 1 may have been dropped (parallel.h), and then nothing was thrown; task 0 always runs.
    const bool task1_ran = c.shared.task_runs[1].load() == 1;
    if (thrower == 0 || task1_ran) {
      const std::string want = "task " + std::to_string(thrower) + " failed";
      CHECK(message == want, "%s: expected the exception '%s', got '%s'", what, want.c_str(),
            message.c_str());
    }
  }
  // The backend still works after a failed call.
  Shared s(100);
  parallel_run(2, shared_task, &s);
  check_shared(s, 2, what);
}

// A task that itself calls parallel_run (nesting must neither deadlock nor lose work).
struct NestCtx {
  std::atomic<int> inner_items{0};
};

void outer_task(void* p, int) {
  auto* c = static_cast<NestCtx*>(p);
  Shared s(50);
  parallel_run(2, shared_task, &s);
  int done = 0;
  for (const auto& d : s.done) done += d.load();
  c->inner_items.fetch_add(done);
}

void test_nested(const char* what) {
  NestCtx c;
  parallel_run(2, outer_task, &c);
  // Each outer task that ran did its 50 inner items; task 0 always runs.
  const int total = c.inner_items.load();
  CHECK(total == 50 || total == 100, "%s: nested calls processed %d items (want 50 or 100)", what, total);
}

void test_concurrent_callers(const char* what) {
  std::atomic<int> bad{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < 4; ++i) {
    callers.emplace_back([&, i] {
      for (int rep = 0; rep < 200; ++rep) {
        Shared s(64 + rep);
        parallel_run(2 + (i + rep) % 3, shared_task, &s);
        for (const auto& d : s.done) bad += d.load() != 1;
      }
    });
  }
  for (auto& t : callers) t.join();
  CHECK(bad.load() == 0, "%s: concurrent callers: %d items not processed exactly once", what, bad.load());
}

#if defined(__linux__)
// A child forked after the backend ran must still compute (the parent's workers are not there).
void test_fork(const char* what) {
  Shared warm(100);
  parallel_run(2, shared_task, &warm);
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    Shared s(1000);
    parallel_run(2, shared_task, &s);
    int wrong = 0;
    for (const auto& d : s.done) wrong += d.load() != 1;
    _exit(wrong == 0 && lwk::parallel_backend_in_use() == "threadpool" ? 0 : 1);
  }
  CHECK(pid > 0, "%s: fork failed", what);
  if (pid <= 0) return;
  // libgomp's team does not survive fork: a child that used it would hang, so wait at most 30 s.
  int status = 0;
  pid_t done = 0;
  for (int ms = 0; ms < 30000 && done == 0; ms += 10) {
    done = waitpid(pid, &status, WNOHANG);
    if (done == 0) usleep(10000);
  }
  if (done == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    CHECK(false, "%s: the forked child hung (it must fall back to the thread pool)", what);
    return;
  }
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s: the forked child failed (status %d)", what,
        status);
}
#endif

// share_work (work_sharing.h), the kernels' one work-sharing scheme: every item exactly once, in
// chunks of at most `grain` items, on task numbers below the task count; with one task a single
// call covering everything. With several, the chunks are of equal sizes (within one item) and
// their number is a multiple of the tasks where there are enough items (49 items at grain 43 on
// two tasks: 25 + 24, not 43 + 6).
void test_share_work(const char* what) {
  for (int tasks : {1, 2, 3, 8}) {
    for (int64_t n : {0, 1, 7, 49, 100, 1000}) {
      for (int64_t grain : {1, 3, 43, 64}) {
        std::vector<std::atomic<int>> done(static_cast<size_t>(n));
        for (auto& d : done) d.store(0);
        std::atomic<int> bad_chunks{0}, calls{0};
        std::atomic<int64_t> smallest{n + 1}, largest{0};
        const int used = lwk::detail::tasks_for(n, grain, tasks);
        lwk::detail::share_work(n, grain, tasks, [&](int task, int64_t b, int64_t e) {
          calls.fetch_add(1);
          if (task < 0 || task >= used || b < 0 || e > n || b >= e) {
            bad_chunks.fetch_add(1);
            return;
          }
          if (used > 1 && e - b > grain) bad_chunks.fetch_add(1);
          int64_t s = smallest.load(), l = largest.load();
          while (e - b < s && !smallest.compare_exchange_weak(s, e - b)) {}
          while (e - b > l && !largest.compare_exchange_weak(l, e - b)) {}
          for (int64_t i = b; i < e; ++i) done[static_cast<size_t>(i)].fetch_add(1);
        });
        int wrong = 0;
        for (const auto& d : done) wrong += d.load() != 1;
        CHECK(wrong == 0 && bad_chunks.load() == 0,
              "%s share_work tasks=%d n=%lld grain=%lld: %d items not run exactly once, %d bad chunks",
              what, tasks, (long long)n, (long long)grain, wrong, bad_chunks.load());
        CHECK(used > 1 || calls.load() == (n > 0 ? 1 : 0),
              "%s share_work with one task made %d calls for n=%lld", what, calls.load(), (long long)n);
        if (used > 1) {
          CHECK(largest.load() - smallest.load() <= 1,
                "%s share_work tasks=%d n=%lld grain=%lld: chunks of %lld to %lld items", what, tasks,
                (long long)n, (long long)grain, (long long)smallest.load(), (long long)largest.load());
          CHECK(calls.load() % used == 0 || calls.load() == n,
                "%s share_work tasks=%d n=%lld grain=%lld: %d chunks for %d tasks", what, tasks,
                (long long)n, (long long)grain, calls.load(), used);
        }
      }
    }
  }
}

// set_region_timing (parallel.h): a call's wall time and its tasks' summed run time, the calling
// thread's nested calls counted once, nothing recorded once it is unset.
struct SpinCtx {
  std::atomic<int> next{0};
  int items = 0;
  bool nested = false;
};

void spin_for(double seconds) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < end) {
  }
}

void spin_task(void* p, int) {
  auto* c = static_cast<SpinCtx*>(p);
  while (c->next.fetch_add(1) < c->items) {
    spin_for(200e-6);
    if (c->nested) {
      SpinCtx inner;
      inner.items = 2;
      parallel_run(2, spin_task, &inner);  // (inside a task: runs inline or on the pool)
    }
  }
}

void test_region_timing(const char* what) {
  for (int n : {1, 2}) {
    for (bool nested : {false, true}) {
      lwk::detail::RegionTimes times;
      SpinCtx c;
      c.items = 10;
      c.nested = nested;
      lwk::detail::set_region_timing(&times);
      const auto start = std::chrono::steady_clock::now();
      parallel_run(n, spin_task, &c);
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      lwk::detail::set_region_timing(nullptr);
      // 10 items of >= 200 us each, shared by the tasks (nested: each item's own call of two more
      // runs within the item, in part on other threads, which only the item's time counts).
      const double work = 10 * 200e-6;
      CHECK(times.wall > 0 && times.wall <= wall, "%s region timing n=%d: wall %g s of a call taking %g s", what,
            n, times.wall, wall);
      CHECK(times.busy >= work && times.busy <= n * times.wall + 1e-6,
            "%s region timing n=%d nested=%d: busy %g s for %g s of work in %g s on %d threads", what, n,
            int(nested), times.busy, work, times.wall, n);
      const lwk::detail::RegionTimes before = times;
      SpinCtx more;
      more.items = 2;
      parallel_run(n, spin_task, &more);
      CHECK(times.wall == before.wall && times.busy == before.busy, "%s region timing went on after it was unset",
            what);
    }
  }
}

// busiest_share (work_sharing.h), the cost models' view of share_work's split: the busiest task's
// cost item by item, and the example of an image's 56 output rows in tiles of 5 (11 full tiles and
// a 1-row one) on two tasks.
void test_busiest_share(const char* what) {
  for (int tasks : {1, 2, 3, 8}) {
    for (int64_t n : {1, 7, 12, 49, 100}) {
      for (int64_t group : {1, 2, 4, 7, 12, 100}) {
        double worst = 0;
        for (int t = 0; t < tasks; ++t) {
          double load = 0;
          for (int64_t i = n * t / tasks; i < n * (t + 1) / tasks; ++i) load += (i + 1) % group == 0 ? 3.0 : 10.0;
          worst = std::max(worst, load);
        }
        const double got = lwk::detail::busiest_share(n, tasks, group, 10.0, 3.0);
        CHECK(got == worst, "%s busiest_share(n=%lld, tasks=%d, group=%lld) = %g, item by item %g", what,
              (long long)n, tasks, (long long)group, got, worst);
      }
    }
  }
  const double rows = lwk::detail::busiest_share(12, 2, 12, 5.0, 1.0);
  CHECK(rows == 30.0, "%s busiest_share: 11 x 5 + 1 rows on two tasks gave %g, not 6 x 5", what, rows);
}

// parallel_session (parallel.h): the checks above for calls made inside a session's body, the
// session's other threads taking tasks (with the host OpenMP runtime, where it holds a region),
// and an exception from the body reaching the caller.
struct SessionCtx {
  const char* what;
  std::atomic<int> helped{0};  // calls whose task 1 ran
};

void session_body(void* p) {
  auto* c = static_cast<SessionCtx*>(p);
  test_tasks_and_work(c->what);
  test_share_work(c->what);
  test_exceptions(c->what);
  test_nested(c->what);
  for (int rep = 0; rep < 200; ++rep) {
    Shared s(20000);
    parallel_run(2, shared_task, &s);
    check_shared(s, 2, c->what);
    if (s.task_runs[1].load() == 1) c->helped.fetch_add(1);
  }
}

void throwing_body(void*) { throw std::runtime_error("body failed"); }

void test_session(const char* what, bool holds_region) {
  const std::string inside = std::string(what) + ", in a session";
  SessionCtx c{inside.c_str()};
  lwk::parallel_session(4, session_body, &c);
  if (holds_region) {
    CHECK(c.helped.load() > 0, "%s: the session's other threads took no task in 200 calls", what);
  }
  std::string message;
  try {
    lwk::parallel_session(2, throwing_body, nullptr);
  } catch (const std::runtime_error& e) {
    message = e.what();
  }
  CHECK(message == "body failed", "%s: a session's body threw 'body failed', the caller got '%s'", what,
        message.c_str());
  Shared s(100);  // plain calls still work afterwards
  parallel_run(2, shared_task, &s);
  check_shared(s, 2, what);
}

void run_all(const char* what, bool host_openmp) {
  test_tasks_and_work(what);
  test_share_work(what);
  test_busiest_share(what);
  test_region_timing(what);
  test_exceptions(what);
  test_nested(what);
  test_concurrent_callers(what);
  test_session(what, host_openmp);
#if defined(__linux__)
  test_fork(what);
#endif
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  bool host_openmp = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--host-openmp") == 0) host_openmp = true;
  }
  try {
    if (host_openmp) {
#if defined(__linux__)
      // RTLD_LOCAL: the runtime's symbols are not global, as with a library that PyTorch loads.
      if (!dlopen("libgomp.so.1", RTLD_NOW | RTLD_LOCAL)) {
        std::printf("FAIL: --host-openmp: cannot load libgomp.so.1: %s\n", dlerror());
        return 1;
      }
#else
      std::printf("FAIL: --host-openmp needs Linux\n");
      return 1;
#endif
      const std::string in_use = lwk::parallel_backend_in_use();
      CHECK(in_use == "openmp (libgomp.so.1)", "auto should pick the loaded runtime, got '%s'", in_use.c_str());
      lwk::set_parallel_backend(lwk::ParallelBackend::kHostOpenMP);
      run_all("host openmp", true);
      lwk::set_parallel_backend(lwk::ParallelBackend::kThreadPool);
      CHECK(lwk::parallel_backend_in_use() == "threadpool", "threadpool was not selected");
      run_all("thread pool beside openmp", false);
    } else {
      const std::string in_use = lwk::parallel_backend_in_use();
      CHECK(in_use == "threadpool", "no runtime is loaded, yet the backend in use is '%s'", in_use.c_str());
      bool threw = false;
      try {
        lwk::set_parallel_backend(lwk::ParallelBackend::kHostOpenMP);
      } catch (const std::runtime_error&) {
        threw = true;
      }
      CHECK(threw, "asking for the host OpenMP runtime without one loaded must throw");
      run_all("thread pool", false);
    }
  } catch (const std::exception& e) {
    std::printf("FAIL: unexpected exception: %s\n", e.what());
    return 1;
  }
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("parallel_run: all checks passed (%s)\n", host_openmp ? "host openmp + thread pool" : "thread pool");
  return 0;
}
