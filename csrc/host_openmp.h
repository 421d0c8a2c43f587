// The process's own OpenMP runtime (PyTorch's), found at run time, as a backend of parallel_run.
//
// Why: PyTorch runs its ops on an OpenMP team whose idle threads keep spinning for milliseconds
// after each parallel region (libgomp's default wait policy). Kernels on a separate pool then
// compete with those spinning threads for the same cores, so every fused block that follows a
// PyTorch op (or another model's call) runs slower. Running our tasks on the same team avoids
// it: the spinning threads are the ones that pick our work up.
//
// How: lwkernels is not linked against any OpenMP runtime (nor against torch). The loaded
// libraries are listed (dl_iterate_phdr), the first whose file name starts with libgomp, libomp or
// libiomp and exports the GNU entry points (GOMP_parallel, omp_get_thread_num; LLVM's and
// Intel's runtimes export them too) is taken, in load order. Where none is loaded (a program
// without PyTorch, the C++ tests), in a process forked after this one started, or on a platform
// without dl_iterate_phdr, the host runtime is unavailable and parallel_run uses the pool.
#pragma once

#include <string>

#include "parallel.h"

namespace lwk {
namespace detail {

// Runs fn(ctx, i) for i in [0, n) on a team of n threads of the host runtime and returns true;
// returns false without running anything when no host runtime is available. A team may be smaller
// than n (inside another OpenMP region, or capped by OMP_THREAD_LIMIT); the missing tasks are
// dropped, as parallel.h allows. Rethrows the first exception a task threw.
bool host_openmp_run(int n, TaskFn fn, void* ctx);

// The runtime's file name as the loader knows it; empty when none is available.
std::string host_openmp_library();

}  // namespace detail
}  // namespace lwk
