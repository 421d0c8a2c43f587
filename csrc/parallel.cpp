#include "parallel.h"

#include "thread_pool.h"

namespace lwk {
namespace detail {

void parallel_run(int n, TaskFn fn, void* ctx) {
  if (n <= 1) {
    fn(ctx, 0);
    return;
  }
  pool_run(n, fn, ctx);
}

}  // namespace detail
}  // namespace lwk
