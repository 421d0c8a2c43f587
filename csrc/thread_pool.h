// lwkernels' own persistent thread pool, one backend of parallel_run (parallel.h).
//
// pool_run(n, fn, ctx) offers fn(ctx, i) for every i in [0, n): task 0 runs on the calling
// thread, the others on pool workers. Once task 0 returns, tasks whose worker has not started yet
// are cancelled rather than waited for (parallel.h: tasks share their work dynamically), so a
// worker that the OS has not scheduled (a busy, shared machine) never delays the call. Only one
// call uses the workers at a time; a call that finds them busy (another Python thread is inside a
// kernel) runs its tasks on its own thread, so concurrent callers never wait on each other and
// never deadlock.
// Workers spin briefly after a task before sleeping, so back-to-back calls (consecutive layers)
// do not pay a wake-up each.
#pragma once

#include "parallel.h"

namespace lwk {
namespace detail {

// Returns when every task that started has finished. Rethrows the first exception a task threw
// (tasks should not throw). n <= 1 runs inline.
void pool_run(int n, TaskFn fn, void* ctx);

}  // namespace detail
}  // namespace lwk
