#include "parallel.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>

#include "host_openmp.h"
#include "parallel_session.h"
#include "thread_pool.h"

namespace lwk {
namespace {

std::atomic<ParallelBackend> g_backend{ParallelBackend::kAuto};

}  // namespace

void set_parallel_backend(ParallelBackend backend) {
  if (backend == ParallelBackend::kHostOpenMP && detail::host_openmp_library().empty()) {
    throw std::runtime_error(
        "no OpenMP runtime (libgomp, libomp or libiomp) is loaded in this process; "
        "use the thread pool or the automatic choice");
  }
  g_backend.store(backend, std::memory_order_relaxed);
}

ParallelBackend parallel_backend() { return g_backend.load(std::memory_order_relaxed); }

std::string parallel_backend_in_use() {
  const std::string library = detail::host_openmp_library();
  if (parallel_backend() == ParallelBackend::kThreadPool || library.empty()) return "threadpool";
  return "openmp (" + library.substr(library.find_last_of('/') + 1) + ")";
}

namespace detail {

namespace {

thread_local RegionTimes* t_region_times = nullptr;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct TimedTasks {
  TaskFn fn;
  void* ctx;
  std::atomic<int64_t> busy_ns{0};
};

void timed_task(void* p, int task) {
  auto* c = static_cast<TimedTasks*>(p);
  const int64_t start = now_ns();
  c->fn(c->ctx, task);
  c->busy_ns.fetch_add(now_ns() - start, std::memory_order_relaxed);
}

void run_untimed(int n, TaskFn fn, void* ctx);

// parallel_run with set_region_timing's bookkeeping; the calling thread's own nested calls (inside
// its task) are part of this one.
void run_timed(int n, TaskFn fn, void* ctx, RegionTimes& times) {
  TimedTasks timed{fn, ctx};
  struct Account {  // (also when a task throws)
    RegionTimes& times;
    const TimedTasks& timed;
    RegionTimes* saved;
    int64_t start;
    ~Account() {
      t_region_times = saved;
      times.wall += double(now_ns() - start) * 1e-9;
      times.busy += double(timed.busy_ns.load(std::memory_order_relaxed)) * 1e-9;
    }
  } account{times, timed, t_region_times, now_ns()};
  t_region_times = nullptr;
  run_untimed(n, &timed_task, &timed);
}

void run_untimed(int n, TaskFn fn, void* ctx) {
  if (n <= 1) {
    fn(ctx, 0);
    return;
  }
  if (session_run(n, fn, ctx)) return;
  if (parallel_backend() != ParallelBackend::kThreadPool && host_openmp_run(n, fn, ctx)) return;
  pool_run(n, fn, ctx);
}

}  // namespace

void set_region_timing(RegionTimes* times) { t_region_times = times; }

void parallel_run(int n, TaskFn fn, void* ctx) {
  if (t_region_times != nullptr) {
    run_timed(n, fn, ctx, *t_region_times);
  } else {
    run_untimed(n, fn, ctx);
  }
}

}  // namespace detail
}  // namespace lwk
