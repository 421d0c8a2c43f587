// The inverted residual's forward call (inverted_residual.h): the joint block's call (depthwise ->
// pointwise work items, forward_call.h) whose depthwise input is produced per tile by the expand
// step (ExpandStage, kernel_expand.h). This file checks the call, chooses tiles of whole output
// rows whose band of expanded rows fits the cache budget, and lays out the band's scratch.
#include "inverted_residual.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "conv_geometry.h"
#include "forward_call.h"
#include "internal.h"
#include "recent_results.h"
#include "tiling.h"
#include "transpose.h"
#include "work_sharing.h"

namespace lwk {
namespace detail {
namespace {

std::atomic<std::size_t> g_band_budget{0};

// A tile's band of expanded rows and its depthwise output each stay within this (per worker): the
// two together fit the per-core L2 of the CPUs the kernels meet (1-2 MiB; Zen 3's 512 KiB spills
// into its large L3).
std::size_t band_budget_bytes() {
  const std::size_t b = g_band_budget.load();
  return b ? b : std::size_t(512) * 1024;
}

// The most the shared-depthwise mode's buffer of depthwise outputs may take (it is written and read
// back once, from L2 or L3).
constexpr int64_t kSharedTilesBytes = int64_t(16) << 20;

// The most expanded rows row tiles may compute per row of the image before whole images split by
// channels are preferred (1.3: 30% of the expand recomputed).
constexpr double kMaxExpandRecompute = 1.3;

// The depthwise -> project part, as a joint block over the expanded channels.
JointGeometry depthwise_part(const InvertedResidualGeometry& g) {
  JointGeometry j;
  j.batch = g.batch;
  j.in_channels = g.expanded_channels;
  j.in_h = g.in_h;
  j.in_w = g.in_w;
  j.out_channels = g.out_channels;
  j.out_h = g.out_h;
  j.out_w = g.out_w;
  j.kernel_h = g.kernel_h;
  j.kernel_w = g.kernel_w;
  j.stride_h = g.stride_h;
  j.stride_w = g.stride_w;
  j.pad_h = g.pad_h;
  j.pad_w = g.pad_w;
  j.dil_h = g.dil_h;
  j.dil_w = g.dil_w;
  j.layout = g.layout;
  return j;
}

template <typename T>
const PackedImpl<T>& packed_for(const PackedPointwise<T>& base, const char* which, Layout layout,
                                int64_t c_out, int64_t c_in) {
  const auto* packed = dynamic_cast<const PackedImpl<T>*>(&base);
  // (the message is only built for an error: this runs twice per call, and a native sequence of a
  // fused MNASNet spent ~0.8 us of each inverted residual's set-up on the two strings)
  auto name = [which] { return std::string("inverted_residual_forward: the ") + which + " weights "; };
  if (packed == nullptr) throw std::invalid_argument(name() + "must come from pack_pointwise");
  if (packed->layout() != layout) {
    throw std::invalid_argument(name() + "were packed for layout " + layout_name(packed->layout()) +
                                " but the geometry says " + layout_name(layout));
  }
  if (packed->out_channels() != c_out || packed->in_channels() != c_in) {
    throw std::invalid_argument(name() + "were packed for " + std::to_string(packed->out_channels()) +
                                " x " + std::to_string(packed->in_channels()) +
                                " (out x in) channels but the geometry needs " +
                                std::to_string(c_out) + " x " + std::to_string(c_in));
  }
  if (ops_for<T>(packed->isa()) == nullptr || !isa_supported(packed->isa())) {
    throw std::invalid_argument(name() + "have an ISA this build or CPU does not support");
  }
  return *packed;
}

// How a call is tiled: the work items' tiling, and whether the expand runs by whole images.
struct BandTiling {
  Tiling tiling;
  bool whole_images = false;  // ExpandStage::whole_images (shared-depthwise mode)
  int64_t band_rows = 0;      // the most input rows a band holds
};

// Row tiles of equal height, as tall as the band budget allows: rows shared by two tiles (the
// kernel's reach, (k - 1) * dilation rows) are expanded once per tile, so taller tiles recompute
// less. With fewer than two tiles per thread they are cut so that every thread gets one (within
// the budget), else two. When that would expand more than kMaxExpandRecompute times the image's
// rows (small images, large dilations) or still leave a thread idle, shared-depthwise mode by
// whole images instead (if their depthwise outputs fit kSharedTilesBytes): the first phase expands
// each image once, split by channels, and runs every tile's depthwise; the second runs the
// projection on the joint block's own tiling (choose_tiling). When they do not fit, row tiles grow
// past the budget until little is recomputed.
//
// One tile per thread rather than two, or than the shared mode's two phases, on MobileNetV2's and
// MNASNet's 28 x 28 and 14 x 14 blocks at batch 1 (2 threads): 5-18% faster per block
// (docs/performance.md).
BandTiling compute_band_tiling(const JointGeometry& g, int64_t block_in_channels, int64_t elem_size,
                               const TileShape& ts, int threads) {
  const int64_t C = g.in_channels, OH = g.out_h, OW = g.out_w;
  auto rows_read = [&](int64_t r) {
    return std::min(g.in_h, (r - 1) * g.stride_h + (g.kernel_h - 1) * g.dil_h + 1);
  };
  // The busiest thread's work with tiles of r output rows, the tiles split in equal contiguous
  // runs (share_work): a tile costs its expanded rows (C_in multiply-adds per pixel and expanded
  // channel) and its output rows (the depthwise's taps and the projection's CO), its last rows
  // may be fewer. Per expanded channel, in multiply-adds.
  const double in_row = double(block_in_channels) * double(g.in_w);
  const double out_row = double(g.kernel_h * g.kernel_w + g.out_channels) * double(OW);
  auto busiest = [&](int64_t r) {
    const int64_t per_image = ceil_div(OH, r), last_rows = OH - (per_image - 1) * r;
    return busiest_share(g.batch * per_image, std::max(1, threads), per_image,
                         in_row * double(rows_read(r)) + out_row * double(r),
                         in_row * double(rows_read(last_rows)) + out_row * double(last_rows));
  };
  // Expanded rows computed per row of the image, for tiles of r output rows.
  auto recompute = [&](int64_t r) {
    return double(ceil_div(OH, r) * rows_read(r)) / double(std::max<int64_t>(1, g.in_h));
  };
  const int64_t budget = static_cast<int64_t>(band_budget_bytes());
  int64_t r = OH;
  const int64_t tile_px_max = tile_pixels_within(budget, C, ts, elem_size);
  while (r > 1 && (C * rows_read(r) * g.in_w * elem_size > budget || r * OW > tile_px_max)) {
    --r;
  }
  // The height whose busiest thread has the least to do, the tallest of equals (at batch 1, 56
  // rows at most 5 a tile went 11 x 5 + 1, six tiles for one thread and five and a sliver for the
  // other; 14 x 4 splits evenly and expands fewer rows per thread).
  int64_t best_r = r;
  double best_load = busiest(r);
  for (int64_t h = r - 1; h >= 1 && h * 2 >= r; --h) {
    const double load = busiest(h);
    if (load < best_load * 0.999) {
      best_r = h;
      best_load = load;
    }
  }
  r = ceil_div(OH, ceil_div(OH, best_r));  // equal heights
  const int64_t t = std::max(1, threads);
  if (g.batch * ceil_div(OH, r) < 2 * t) {
    // Fewer than two tiles per thread: one tile per thread where the budget allows it and the
    // rows split evenly (half the halo rows of two each; 4 + 3 rows would idle a thread for a
    // seventh of the call), else two per thread.
    auto rows_for = [&](int64_t tiles_per_thread) {  // tile height giving each thread that many
      return ceil_div(OH, std::min(OH, ceil_div(tiles_per_thread * t, g.batch)));
    };
    const int64_t rows_one_each = rows_for(1), rows_two_each = rows_for(2);
    // (their tiles cover at most 10% more rows than the image has)
    const bool even = 10 * ceil_div(OH, rows_one_each) * rows_one_each <= 11 * OH;
    if (rows_one_each <= r && even && recompute(rows_one_each) <= kMaxExpandRecompute) {
      r = rows_one_each;
    } else if (recompute(rows_two_each) <= kMaxExpandRecompute) {
      r = rows_two_each;
    }
  }
  const bool shared_fits = g.batch * OH * OW * C * elem_size <= kSharedTilesBytes;
  if (t > 1 && shared_fits && (recompute(r) > kMaxExpandRecompute || g.batch * ceil_div(OH, r) < t)) {
    BandTiling bt;
    bt.tiling = choose_tiling(g, elem_size, ts, threads);
    bt.tiling.shared_dw = true;
    bt.whole_images = true;
    bt.band_rows = g.in_h;
    return bt;
  }
  // Too many images to share: taller tiles than the budget allows (the band then spills to L3),
  // which costs less than expanding every row several times over.
  while (r < OH && recompute(r) > kMaxExpandRecompute) ++r;
  r = ceil_div(OH, ceil_div(OH, r));
  BandTiling bt;
  bt.tiling = Tiling{r * OW, ceil_div(OH, r), g.out_channels, 1, false};
  bt.band_rows = rows_read(r);
  return bt;
}

// compute_band_tiling, remembered per calling thread (recent_results.h) by everything it and
// choose_tiling read, the budgets and the shared-depthwise setting included.
BandTiling choose_band_tiling(const JointGeometry& g, int64_t block_in_channels, int64_t elem_size,
                              const TileShape& ts, int threads) {
  static thread_local RecentResults<22, BandTiling> recent;
  return recent.get({g.out_channels, g.in_channels, block_in_channels, g.out_h, g.out_w, g.in_h, g.in_w,
                     g.batch, g.kernel_h, g.kernel_w, g.stride_h, g.dil_h, elem_size, ts.gran, ts.vw,
                     ts.panel, int64_t(ts.nchw), ts.out_px_elems, int64_t(threads),
                     static_cast<int64_t>(band_budget_bytes()),
                     static_cast<int64_t>(tile_budget_bytes()), int64_t(shared_depthwise())},
                    [&] { return compute_band_tiling(g, block_in_channels, elem_size, ts, threads); });
}

// The expand step's scale and shift, with a vector of slack (the epilogue loads whole vectors of
// per-channel parameters): the calling thread's, reused across calls.
template <typename T>
struct ExpandAffine {
  std::vector<T> scale, shift;
};
template <typename T>
thread_local ExpandAffine<T> t_expand_affine;

// The calling thread's NHWC copies of x, the residual and y for transpose_io calls.
template <typename T>
struct TransposedIo {
  std::vector<T> x, residual, y;
};
template <typename T>
thread_local TransposedIo<T> t_transposed;

template <typename T>
void forward_impl(const PackedPointwise<T>& expand_base, const PackedPointwise<T>& project_base,
                  const InvertedResidualGeometry& g, const InvertedResidualTensors<T>& t,
                  int num_threads);

// transpose_io: the NCHW tensors through NHWC scratch around an NHWC run.
template <typename T>
void forward_transposed(const PackedPointwise<T>& expand, const PackedPointwise<T>& project,
                        const InvertedResidualGeometry& g, const InvertedResidualTensors<T>& t,
                        int num_threads) {
  if (t.x == nullptr || t.y == nullptr) {
    throw std::invalid_argument(std::string("inverted_residual_forward: ") +
                                (t.x == nullptr ? "x" : "y") + " is null");
  }
  TransposedIo<T>& io = t_transposed<T>;
  const int64_t in_px = g.in_h * g.in_w, out_px = g.out_h * g.out_w;
  io.x.resize(static_cast<std::size_t>(g.batch * g.in_channels * in_px));
  io.y.resize(static_cast<std::size_t>(g.batch * g.out_channels * out_px));
  transpose_images(t.x, io.x.data(), g.batch, g.in_channels, in_px, true, expand.isa(), num_threads);
  InvertedResidualTensors<T> nhwc = t;
  nhwc.x = io.x.data();
  nhwc.y = io.y.data();
  if (t.residual == t.x) {
    nhwc.residual = io.x.data();
  } else if (t.residual != nullptr) {
    io.residual.resize(io.y.size());
    transpose_images(t.residual, io.residual.data(), g.batch, g.out_channels, out_px, true, expand.isa(),
                     num_threads);
    nhwc.residual = io.residual.data();
  }
  InvertedResidualGeometry inner = g;
  inner.transpose_io = false;
  forward_impl(expand, project, inner, nhwc, num_threads);
  transpose_images(io.y.data(), t.y, g.batch, g.out_channels, out_px, false, expand.isa(), num_threads);
}

template <typename T>
void forward_impl(const PackedPointwise<T>& expand_base, const PackedPointwise<T>& project_base,
                  const InvertedResidualGeometry& g, const InvertedResidualTensors<T>& t,
                  int num_threads) {
  const std::string err = validate(g);
  if (!err.empty()) throw std::invalid_argument("inverted_residual_forward: " + err);
  if (t.y_transposed && (t.residual != nullptr || g.transpose_io)) {
    throw std::invalid_argument("inverted_residual_forward: y_transposed takes neither a residual nor transpose_io");
  }
  if (g.transpose_io) {
    if (g.layout != Layout::kNHWC) {
      throw std::invalid_argument("inverted_residual_forward: transpose_io needs layout NHWC");
    }
    if (g.batch > 0) forward_transposed(expand_base, project_base, g, t, num_threads);
    return;
  }
  const PackedImpl<T>& expand =
      packed_for(expand_base, "expand", g.layout, g.expanded_channels, g.in_channels);
  const PackedImpl<T>& project =
      packed_for(project_base, "project", g.layout, g.out_channels, g.expanded_channels);
  if (expand.isa() != project.isa()) {
    throw std::invalid_argument(
        std::string("inverted_residual_forward: the expand weights were packed for ") +
        isa_name(expand.isa()) + " but the project weights for " + isa_name(project.isa()));
  }
  for (Activation a : {t.expand_act, t.mid_act, t.out_act}) {
    if (!valid_act(a)) throw std::invalid_argument("inverted_residual_forward: unknown activation value");
  }
  if (g.batch == 0) return;
  if (t.x == nullptr) throw std::invalid_argument("inverted_residual_forward: x is null");
  if (t.dw_weight == nullptr) throw std::invalid_argument("inverted_residual_forward: dw_weight is null");
  if (t.dw_folded && t.dw_shift == nullptr) {
    throw std::invalid_argument("inverted_residual_forward: folded depthwise weights need their folded shift");
  }
  if (t.y == nullptr) throw std::invalid_argument("inverted_residual_forward: y is null");

  const IsaOps<T>* ops = ops_for<T>(project.isa());
  const JointGeometry jg = depthwise_part(g);
  const int threads = std::max(1, num_threads);
  const bool nhwc = g.layout == Layout::kNHWC;
  const TileShape ts{nhwc ? ops->mr : ops->nr, ops->vw, project.panel(), !nhwc,
                     t.y_transposed ? g.out_channels : 0};
  const BandTiling bt = choose_band_tiling(jg, g.in_channels, sizeof(T), ts, threads);
  const Tiling& tl = bt.tiling;
  const int64_t band_rows = bt.band_rows;

  JointTensors<T> jt;
  jt.x = t.x;  // (each tile's plan reads its band instead: see ExpandStage)
  jt.dw_weight = t.dw_weight;
  jt.dw_scale = t.dw_scale;
  jt.dw_shift = t.dw_shift;
  jt.dw_folded = t.dw_folded;
  jt.mid_act = t.mid_act;
  jt.pw_scale = t.project_scale;
  jt.pw_shift = t.project_shift;
  jt.residual = t.residual;
  jt.out_act = t.out_act;
  jt.y = t.y;
  jt.y_transposed = t.y_transposed;
  Plan<T> plan = plan_call(jg, jt, project, tl);
  lay_out_worker_scratch(plan, jg, tl, *ops);

  const int64_t C = g.expanded_channels;
  ExpandAffine<T>& affine = t_expand_affine<T>;
  affine.scale.resize(static_cast<std::size_t>(round_up(C, 64)));
  affine.shift.resize(affine.scale.size());
  for (int64_t c = 0; c < C; ++c) {
    affine.scale[c] = t.expand_scale ? t.expand_scale[c] : T(1);
    affine.shift[c] = t.expand_shift ? t.expand_shift[c] : T(0);
  }
  ExpandStage<T> ex;
  ex.x = t.x;
  ex.in_channels = g.in_channels;
  ex.packed = &expand;
  ex.scale = affine.scale.data();
  ex.shift = affine.shift.data();
  ex.act = t.expand_act;
  ex.whole_images = bt.whole_images;
  // + two vectors of slack: the NCHW plane fill reads whole (stride-2: two) vectors of a short row.
  ex.band_elems = C * band_rows * g.in_w + 2 * ops->vw;
  ex.band_offset = plan.scratch_bytes;
  plan.scratch_bytes += aligned_bytes(ex.band_elems * int64_t(sizeof(T)));
  if (g.layout == Layout::kNCHW) {
    ex.pack_offset = plan.scratch_bytes;
    plan.scratch_bytes +=
        aligned_bytes(g.in_channels * round_up(band_rows * g.in_w, ops->nr) * int64_t(sizeof(T)));
  }
  plan.expand = &ex;

  // Channel chunks start on the expand weights' panel boundaries (kernel_expand.h); by whole
  // images, one unit per image.
  execute_call(plan, jg, jt, ops, threads, tl.shared_dw,
               bt.whole_images ? g.batch : g.batch * plan.n_tiles, int64_t(expand.panel()));
}

}  // namespace
}  // namespace detail

std::string validate(const InvertedResidualGeometry& g) {
  if (g.in_channels < 1) return "in_channels must be >= 1, got " + std::to_string(g.in_channels);
  if (g.expanded_channels < 1) {
    return "expanded_channels must be >= 1, got " + std::to_string(g.expanded_channels);
  }
  if (g.in_channels > detail::kConvDimMax) return "a size, stride, padding or dilation exceeds 2^30";
  if (!detail::fits_int64_index({g.batch, g.in_channels, g.in_h, g.in_w})) {
    return "tensor sizes overflow 64-bit indexing";
  }
  return validate(detail::depthwise_part(g));
}

void set_expand_band_budget_bytes(std::size_t bytes) { detail::g_band_budget.store(bytes); }

template <typename T>
void inverted_residual_forward(const PackedPointwise<T>& expand, const PackedPointwise<T>& project,
                               const InvertedResidualGeometry& g,
                               const InvertedResidualTensors<T>& t, int num_threads) {
  detail::forward_impl<T>(expand, project, g, t, num_threads);
}

template void inverted_residual_forward<float>(const PackedPointwise<float>&,
                                               const PackedPointwise<float>&,
                                               const InvertedResidualGeometry&,
                                               const InvertedResidualTensors<float>&, int);
template void inverted_residual_forward<double>(const PackedPointwise<double>&,
                                                const PackedPointwise<double>&,
                                                const InvertedResidualGeometry&,
                                                const InvertedResidualTensors<double>&, int);

}  // namespace lwk
