// The hook through which parallel_run hands its tasks to a session (parallel.h: parallel_session;
// parallel_session.cpp says how a session runs them).
#pragma once

#include "parallel.h"

namespace lwk {
namespace detail {

// Runs fn(ctx, i) for i in [0, n) on the calling thread's session and returns true; returns false
// without running anything when the calling thread is not a session's thread 0, or is running one
// of its tasks.
bool session_run(int n, TaskFn fn, void* ctx);

}  // namespace detail
}  // namespace lwk
