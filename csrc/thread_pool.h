// A small persistent thread pool for the CPU kernels (no OpenMP: PyTorch ships its own runtime,
// and two OpenMP runtimes in one process is trouble).
//
// run(n, fn, ctx) calls fn(ctx, i) once for every i in [0, n): task 0 on the calling thread, the
// others on pool workers. Only one call uses the workers at a time; a call that finds them busy
// (another Python thread is inside a kernel) runs all its tasks on its own thread, so concurrent
// callers never wait on each other and never deadlock. Workers spin briefly after a task before
// sleeping, so back-to-back calls (consecutive layers) do not pay a wake-up each.
#pragma once

namespace lwk {
namespace detail {

using TaskFn = void (*)(void* ctx, int task);

// Runs fn(ctx, 0..n-1) and returns when all have finished. Rethrows the first exception a task
// threw (tasks should not throw). n <= 1 runs inline.
void parallel_run(int n, TaskFn fn, void* ctx);

}  // namespace detail
}  // namespace lwk
