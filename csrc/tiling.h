// The tiling of a forward call: the pixel tile and the output-channel split of the work items
// (Plan's work decomposition), chosen per call by a small cost model. Not part of the public API.
#pragma once

#include <algorithm>
#include <cstdint>

#include "joint_block.h"

namespace lwk {
namespace detail {

struct Tiling {
  int64_t tile_px, n_tiles, co_chunk, n_co;
  bool shared_dw;  // see Plan::shared_dw
};

struct TileShape {
  int64_t gran;       // NCHW: micro-kernel columns (pixels); NHWC: micro-kernel rows (pixels)
  int64_t vw;         // vector width (elements)
  int64_t panel;      // packed weight panel width (output channels)
  bool nchw;
  // Elements per pixel of a worker's output buffer that shares the cache with the depthwise tile
  // (y_transposed: the output channels; else 0, the outputs go straight to y).
  int64_t out_px_elems = 0;
};

// The most pixels a worker's tile may have within the cache budget (bytes): its depthwise output
// (C channels) within the budget, and with other buffers (ts.out_px_elems per pixel) all of it within
// twice the budget (per-core L2 holds that much on every CPU the kernels meet).
inline int64_t tile_pixels_within(int64_t budget, int64_t C, const TileShape& ts, int64_t elem_size) {
  const int64_t alone = budget / std::max<int64_t>(1, C * elem_size);
  const int64_t with_buffers = 2 * budget / std::max<int64_t>(1, (C + ts.out_px_elems) * elem_size);
  return alone < with_buffers ? alone : with_buffers;
}

// Chooses the pixel tile and the output-channel split for `threads` workers by a small cost model:
// depthwise work (once per tile and worker), pointwise work on the columns the micro-kernels
// really compute, streaming the packed weights once per item, and a fixed per-item overhead. The
// makespan is what the busiest worker does under the static contiguous partition of share_work
// (each worker's items followed exactly when there are few, else estimated in closed form). Each
// calling thread remembers its recent tilings by everything they depend on (recent_results.h):
// costing the candidates takes up to ~7 us, and a model asks for the same few on every call.
// Tiles need not be whole micro-kernel blocks: 7 x 7 = 49 pixels is better one tile of a 48-wide
// block and a thin column than a 48-pixel tile and a 1-pixel tile, which repeats the depthwise
// for one pixel and streams all the weights again for it.
Tiling choose_tiling(const JointGeometry& g, int64_t elem_size, const TileShape& ts, int threads);

}  // namespace detail
}  // namespace lwk
