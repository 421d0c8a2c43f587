#include "tiling.h"

#include <algorithm>
#include <limits>

#include "internal.h"
#include "recent_results.h"

namespace lwk {
namespace detail {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Pointwise cost of a tile of q pixels in units of one pixel column of the wide micro-kernel.
// NCHW: whole blocks, then a last block of at most vw/4 columns through the thin kernel (about
// twice a wide column each: it is bound by loading the weights) or rounded up to whole vectors.
// NHWC: pixels are rows; a partial row block costs about what its rows do.
double pw_columns(int64_t q, const TileShape& ts) {
  if (!ts.nchw) return double(q);
  const int64_t full = q / ts.gran * ts.gran, rest = q - full;
  if (rest == 0) return double(full);
  if (rest <= ts.vw / 4) return double(full) + 2.0 * double(rest);
  return double(full) + double(round_up(rest, ts.vw));
}

// Shared-depthwise mode: the largest buffer for all tiles' depthwise outputs; the fixed cost of
// its extra dispatch and the cost of one vector of tile data computed by another worker (it comes
// from that core's cache), in the cost model's units (about one vector FMA each).
constexpr int64_t kSharedDwBytes = int64_t(4) << 20;
constexpr double kSharedDwOverhead = 4000.0;
constexpr double kSharedDwRemoteCost = 2.0;

// Up to this many work items the cost model follows each worker's items exactly.
constexpr int64_t kExactItems = 64;

Tiling compute_tiling(const JointGeometry& g, int64_t elem_size, const TileShape& ts, int threads) {
  const int64_t npix = g.out_h * g.out_w;
  const int64_t C = g.in_channels, CO = g.out_channels;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t gran = ts.gran;
  const int64_t budget = static_cast<int64_t>(tile_budget_bytes());
  // The largest tile the budget allows (at least one micro-kernel block).
  const int64_t pmax = std::max(gran, tile_pixels_within(budget, C, ts, elem_size));
  const int64_t base_tiles = ceil_div(npix, pmax);
  const int64_t npanels = ceil_div(CO, ts.panel);
  const int workers = std::max(1, threads);

  Tiling best{0, 0, 0, 0, false};
  double best_cost = std::numeric_limits<double>::infinity();
  // Re-tiling only matters when there are too few items to balance; otherwise keep the largest
  // tiles that fit the budget.
  const bool few = g.batch * base_tiles < 8 * int64_t(workers);
  const int64_t max_tiles = few ? std::min<int64_t>(npix, base_tiles * workers * 2) : base_tiles;
  const int64_t max_co = (workers > 1 && few) ? std::min<int64_t>(npanels, 2 * workers) : 1;
  const int shared_mode = shared_depthwise();
  auto shared_fits = [&](int64_t p) {
    return workers > 1 && g.batch * ceil_div(npix, p) * p * C * elem_size <= kSharedDwBytes;
  };
  auto dw_cost = [&](int64_t q) { return double(q) * C * taps / double(ts.vw); };
  auto pw_cost = [&](int64_t q, int64_t chunk) {
    return pw_columns(q, ts) * double(chunk) * C / double(2 * ts.vw) + double(chunk) * C * 0.25 + 2000.0;
  };
  auto consider = [&](int64_t p) {
    p = std::min(std::max<int64_t>(p, 1), npix);
    if (p > pmax) return;
    const int64_t tiles = ceil_div(npix, p);
    const int64_t last_px = npix - (tiles - 1) * p;
    for (int64_t nco = 1; nco <= max_co; ++nco) {
      const int64_t chunk_panels = ceil_div(npanels, nco);
      if (ceil_div(npanels, chunk_panels) != nco) continue;
      const int64_t chunk = std::min(CO, chunk_panels * ts.panel);
      const int64_t items = g.batch * tiles * nco;
      // The busiest worker: ceil(items / workers) consecutive items of full tiles, which span at
      // most ceil((k - 1) / nco) + 1 tiles (one depthwise each).
      const int64_t k = ceil_div(items, workers);
      const int64_t q = tiles == 1 ? last_px : p;
      const int64_t dw_tiles = ceil_div(k - 1, nco) + 1;
      double dw = double(dw_tiles) * dw_cost(q);
      const double per_item = pw_cost(q, chunk);
      double pw = double(k) * per_item, items_busiest = double(k);
      if (items <= kExactItems) {
        // Few items: the workers' contiguous runs of items (share_work) exactly, with the image's
        // last tile (last_px) and the last, narrower chunk of output channels (160 channels in
        // 48-wide panels go 96 + 64: one worker a third busier than the other).
        const int64_t last_chunk = CO - (nco - 1) * chunk;
        dw = pw = items_busiest = 0;
        double worst_load = -1;
        for (int w = 0; w < workers; ++w) {
          const int64_t a = items * w / workers, b = items * (w + 1) / workers;
          double w_pw = 0, w_dw = 0;
          for (int64_t i = a; i < b; ++i) {
            const int64_t tile = (i / nco) % tiles;
            w_pw += pw_cost(tile == tiles - 1 ? last_px : p, i % nco == nco - 1 ? last_chunk : chunk);
          }
          for (int64_t nt = a / nco; b > a && nt <= (b - 1) / nco; ++nt) {
            w_dw += dw_cost(nt % tiles == tiles - 1 ? last_px : p);
          }
          if (w_pw + w_dw > worst_load) {
            worst_load = w_pw + w_dw;
            pw = w_pw;
            dw = w_dw;
            items_busiest = double(b - a);
          }
        }
      }
      const double worst = dw + pw;
      if (worst < best_cost * 0.999) {
        best_cost = worst;
        best = Tiling{p, tiles, chunk, nco, false};
      }
      // Shared depthwise: every tile's depthwise once, spread over the workers, then a second
      // dispatch, and each item reads the part of its tile that other workers computed.
      if (shared_mode != 0 && nco > 1 && shared_fits(p)) {
        const double dw_all = double(g.batch * tiles) * double(q) * C * taps / double(ts.vw);
        const double remote = double(q) * C / double(ts.vw) * double(workers - 1) / workers;
        const double shared = dw_all / workers + kSharedDwOverhead + pw +
                              items_busiest * kSharedDwRemoteCost * remote;
        if (shared < best_cost * 0.999) {
          best_cost = shared;
          best = Tiling{p, tiles, chunk, nco, true};
        }
      }
    }
  };
  for (int64_t nt = base_tiles; nt <= max_tiles; ++nt) {
    const int64_t even = ceil_div(npix, nt);
    consider(round_up(even, gran));  // whole blocks, the last tile takes the rest
    consider(even);                  // equal tiles
  }
  if (best.tile_px == 0) {
    const int64_t p = std::min(npix, pmax);
    best = Tiling{p, ceil_div(npix, p), CO, 1, false};
  }
  if (shared_mode == 1 && shared_fits(best.tile_px)) best.shared_dw = true;
  // Fewer items than workers (a classifier head's pooling: one output pixel per image): in one
  // dispatch the other workers would idle for the whole call; sharing the depthwise gives them
  // its part, which reads the whole map.
  if (shared_mode != 0 && g.batch * best.n_tiles * best.n_co < workers && shared_fits(best.tile_px)) {
    best.shared_dw = true;
  }
  return best;
}

}  // namespace

Tiling choose_tiling(const JointGeometry& g, int64_t elem_size, const TileShape& ts, int threads) {
  // Everything compute_tiling reads, the settings included.
  static thread_local RecentResults<16, Tiling> recent;
  return recent.get({g.out_channels, g.in_channels, g.out_h, g.out_w, g.batch, g.kernel_h, g.kernel_w,
                     elem_size, ts.gran, ts.vw, ts.panel, int64_t(ts.nchw), ts.out_px_elems, int64_t(threads),
                     static_cast<int64_t>(tile_budget_bytes()), int64_t(shared_depthwise())},
                    [&] { return compute_tiling(g, elem_size, ts, threads); });
}

}  // namespace detail
}  // namespace lwk
