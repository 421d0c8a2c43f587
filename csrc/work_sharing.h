// How the kernels share one call's work between the tasks of parallel_run (parallel.h), written
// once for the inference kernels, the weight packing and the training kernels.
//
// share_work(n, grain, tasks, body) calls body(task, begin, end) for chunks [begin, end) of at
// most `grain` items that together cover [0, n) exactly once. Task t owns a contiguous range of
// chunks and claims them one at a time; when its range is empty it claims from the ranges of
// tasks t+1, t+2, ... On an idle machine every task just runs its own range (contiguous, so
// consecutive items can share cached data, e.g. one tile's depthwise output); on a busy one a
// descheduled worker's chunks are taken over instead of delaying the call. Task 0 alone finishes
// everything, as parallel_run requires of its tasks (it may drop tasks that start late).
// With one task, body(0, 0, n) runs once on the calling thread.
//
// In an anonymous namespace: ISA-specific translation units include this header (through
// train_impl.h), and each must keep its own copy compiled with its own flags.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "parallel.h"

namespace lwk {
namespace detail {
namespace {

// Tasks worth starting for n items in chunks of `grain` on up to `threads` threads (>= 1).
inline int tasks_for(int64_t n, int64_t grain, int threads) {
  const int64_t g = grain > 1 ? grain : 1;
  const int64_t chunks = (n + g - 1) / g;
  const int64_t t = threads < chunks ? threads : chunks;
  return static_cast<int>(t > 1 ? t : 1);
}

// The most any task has to do when n items of grain 1 are shared as below on an idle machine (task
// t runs items [n * t / tasks, n * (t + 1) / tasks)), every item costing `full` except the last of
// each group of `group` consecutive items, which costs `last` (an image's last, shorter row tile; a
// tile's last, narrower chunk of channels). For the cost models that choose how to cut the work.
inline double busiest_share(int64_t n, int tasks, int64_t group, double full, double last) {
  double worst = 0;
  for (int t = 0; t < tasks; ++t) {
    const int64_t a = n * t / tasks, b = n * (t + 1) / tasks;
    const int64_t lasts = b / group - a / group;  // items i in [a, b) with (i + 1) % group == 0
    const double load = double(b - a - lasts) * full + double(lasts) * last;
    if (load > worst) worst = load;
  }
  return worst;
}

struct alignas(64) ChunkClaim {
  std::atomic<int64_t> next{0};  // the next chunk of this range to hand out
  int64_t end = 0;               // one past the range's last chunk
};

template <typename Body>
struct ShareCtx {
  const Body* body;
  ChunkClaim* claims;  // [tasks]
  int tasks;
  int64_t n, chunks;  // chunk i is [i * n / chunks, (i + 1) * n / chunks)
};

template <typename Body>
void share_task(void* p, int task) {
  const auto& c = *static_cast<const ShareCtx<Body>*>(p);
  for (int k = 0; k < c.tasks; ++k) {
    ChunkClaim& cl = c.claims[(task + k) % c.tasks];
    for (;;) {
      const int64_t i = cl.next.fetch_add(1, std::memory_order_relaxed);
      if (i >= cl.end) break;
      (*c.body)(task, i * c.n / c.chunks, (i + 1) * c.n / c.chunks);
    }
  }
}

template <typename Body>
void share_work(int64_t n, int64_t grain, int tasks, const Body& body) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  tasks = tasks_for(n, grain, tasks);
  if (tasks <= 1) {
    body(0, 0, n);
    return;
  }
  // Chunks of equal sizes (within one item), their count a multiple of the tasks where n allows:
  // a 24 x 56 x 56 transpose (49 items of grain 43) went 43 + 6 items, one task idle for most of
  // the call. (At least n / grain chunks: none is larger than the grain.)
  const int64_t wanted = (n + grain - 1) / grain;
  const int64_t even = (wanted + tasks - 1) / tasks * tasks;
  const int64_t chunks = even < n ? even : n;
  std::unique_ptr<ChunkClaim[]> claims(new ChunkClaim[tasks]);
  for (int t = 0; t < tasks; ++t) {
    claims[t].next.store(chunks * t / tasks, std::memory_order_relaxed);
    claims[t].end = chunks * (t + 1) / tasks;
  }
  const ShareCtx<Body> ctx{&body, claims.get(), tasks, n, chunks};
  parallel_run(tasks, &share_task<Body>, const_cast<ShareCtx<Body>*>(&ctx));
}

}  // namespace
}  // namespace detail
}  // namespace lwk
