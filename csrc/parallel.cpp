#include "parallel.h"

#include <atomic>
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

void parallel_run(int n, TaskFn fn, void* ctx) {
  if (n <= 1) {
    fn(ctx, 0);
    return;
  }
  if (session_run(n, fn, ctx)) return;
  if (parallel_backend() != ParallelBackend::kThreadPool && host_openmp_run(n, fn, ctx)) return;
  pool_run(n, fn, ctx);
}

}  // namespace detail
}  // namespace lwk
