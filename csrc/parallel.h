// How the CPU kernels run their work on several threads.
//
// parallel_run(n, fn, ctx) offers fn(ctx, i) for every i in [0, n), task 0 on the calling thread,
// and returns when every task that started has finished. Not every task is guaranteed to run:
// tasks must share their work dynamically (each keeps claiming work from a shared counter until
// none is left, as share_work's tasks do: work_sharing.h), so that task 0 alone would
// finish the call. That lets a backend drop tasks whose thread is late or missing.
//
// Two backends: the process's OpenMP runtime when one is loaded (PyTorch's; host_openmp.h says
// why that matters), otherwise lwkernels' own thread pool (thread_pool.h).
#pragma once

#include <string>

namespace lwk {

enum class ParallelBackend {
  kAuto,        // the host OpenMP runtime when available, else the thread pool (the default)
  kThreadPool,  // always lwkernels' own pool
  kHostOpenMP,  // the host runtime; set_parallel_backend throws if there is none
};

// Process-wide; takes effect at the next call. In a child forked after the host runtime was
// chosen, calls fall back to the thread pool.
void set_parallel_backend(ParallelBackend backend);
ParallelBackend parallel_backend();

// What calls use now: "openmp (<runtime file name>)" or "threadpool".
std::string parallel_backend_in_use();

// Runs body(ctx) on the calling thread with the host OpenMP runtime's other `threads` - 1 threads
// standing by: the parallel_run calls body makes on this thread run as one region instead of one
// region each (parallel_session.cpp says why). With one thread, with the thread pool, inside
// another session, or where no host runtime is loaded, body(ctx) simply runs. Rethrows what body
// throws.
void parallel_session(int threads, void (*body)(void* ctx), void* ctx);

namespace detail {

using TaskFn = void (*)(void* ctx, int task);

// Rethrows the first exception a task threw (tasks should not throw). n <= 1 runs inline.
void parallel_run(int n, TaskFn fn, void* ctx);

// Profiling (CallSequence's step timing): while a RegionTimes is set on a thread, every
// parallel_run that thread makes adds its wall time (call to return) to `wall` and its tasks'
// summed run times to `busy`; with `threads` threads standing by, threads * wall - busy is the
// thread time the calls left idle. Tasks' own calls are not counted twice. Costs two clock reads
// per task while set.
struct RegionTimes {
  double wall = 0, busy = 0;
};
// The calling thread's (nullptr: stop).
void set_region_timing(RegionTimes* times);
// set_region_timing(times) for its lifetime, also when what it times throws.
struct ScopedRegionTiming {
  explicit ScopedRegionTiming(RegionTimes* times) { set_region_timing(times); }
  ~ScopedRegionTiming() { set_region_timing(nullptr); }
  ScopedRegionTiming(const ScopedRegionTiming&) = delete;
  ScopedRegionTiming& operator=(const ScopedRegionTiming&) = delete;
};

}  // namespace detail
}  // namespace lwk
