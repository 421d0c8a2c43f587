// The fused joint-block tile computation as the ISA translation units instantiate it: work items
// (image, pixel tile, output-channel block) and the table of entry points (isa_ops) of one path.
//
// Per work item, see run_items():
//   1. depthwise: the tile's depthwise output for all C_in channels goes into a per-worker buffer
//      that stays in L1/L2 (NCHW: [C_in][pixels], NHWC: [pixels][C_in]), with the depthwise
//      scale/shift and mid activation applied (in shared-depthwise mode a first phase,
//      run_depthwise(), has computed every tile's buffer already: see Plan::shared_dw);
//   2. pointwise: a register-blocked GEMM micro-kernel multiplies that buffer with the packed
//      pointwise panels; its epilogue applies scale, shift, residual and the output activation
//      while storing y. NHWC: rows = pixels, columns = output channels (B = packed W^T panels);
//      NCHW: rows = output channels (A = packed W panels, broadcast), columns = pixels. Either way
//      y is written along contiguous vectors, and the full intermediate is never materialised.
//
// Everything here and in the kernel headers it includes (kernel_common.h, kernel_gemm.h,
// kernel_depthwise_nchw.h, kernel_depthwise_nhwc.h) is in an anonymous namespace on purpose: each
// ISA translation unit gets its own private copy compiled with its own flags, so the linker can
// never merge, say, an AVX2-compiled helper into the scalar path.
#pragma once

#include <cmath>
#include <cstdint>

#include "activation.h"
#include "compiler.h"
#include "internal.h"
#include "kernel_common.h"
#include "kernel_depthwise_nchw.h"
#include "kernel_depthwise_nhwc.h"
#include "kernel_dense_conv.h"
#include "kernel_expand.h"
#include "kernel_gemm.h"
#include "kernel_transpose.h"

namespace lwk {
namespace detail {
namespace {

// Depthwise output of channels [c_lo, c_hi) of the tile p0 .. p0+np-1 of image n into `tile`,
// with a clamping mid activation (activation.h); `scratch` is the worker's (its row, plane and
// job-list buffers).
template <class V>
void depthwise_tile_clamping(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                             int64_t c_lo, int64_t c_hi, typename V::T* tile, void* scratch) {
  using T = typename V::T;
  if (pl.layout == Layout::kNHWC) {
    dw_tile_nhwc<V>(pl, n, p0, np, c_lo, c_hi, tile);
    return;
  }
  T* row = reinterpret_cast<T*>(static_cast<char*>(scratch) + pl.row_offset);
  if (pl.use_plane) {
    T* plane = reinterpret_cast<T*>(static_cast<char*>(scratch) + pl.plane_offset);
    void* jobs = static_cast<char*>(scratch) + pl.job_offset;
    if (pl.stride_w == 1) {
      dw_tile_nchw_plane<V, 1>(pl, n, p0, np, c_lo, c_hi, tile, row, plane, jobs);
    } else if (pl.stride_w == 2) {
      dw_tile_nchw_plane<V, 2>(pl, n, p0, np, c_lo, c_hi, tile, row, plane, jobs);
    } else {
      dw_tile_nchw_plane<V, 0>(pl, n, p0, np, c_lo, c_hi, tile, row, plane, jobs);
    }
  } else if (pl.stride_w == 1) {
    dw_tile_nchw<V, 1>(pl, n, p0, np, c_lo, c_hi, tile, row);
  } else if (pl.stride_w == 2) {
    dw_tile_nchw<V, 2>(pl, n, p0, np, c_lo, c_hi, tile, row);
  } else {
    dw_tile_nchw<V, 0>(pl, n, p0, np, c_lo, c_hi, tile, row);
  }
}

// The depthwise kernels apply clamping mid activations as they store (activation.h); hardswish
// and silu follow in a pass over the channels [c_lo, c_hi) of the finished tile, still in cache
// (NCHW: every column block's rows, padding columns included, where they stay 0).
template <class V>
void depthwise_tile(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                    int64_t c_lo, int64_t c_hi, typename V::T* tile, void* scratch) {
  if (is_clamping(pl.mid_act)) {
    depthwise_tile_clamping<V>(pl, n, p0, np, c_lo, c_hi, tile, scratch);
    return;
  }
  Plan<typename V::T> affine_only = pl;
  affine_only.mid_act = Activation::kNone;
  depthwise_tile_clamping<V>(affine_only, n, p0, np, c_lo, c_hi, tile, scratch);
  const Activation act = pl.mid_act;
  if (pl.layout == Layout::kNHWC) {
    for (int64_t j = 0; j < np; ++j) activate_array<V>(tile + j * pl.ldt + c_lo, c_hi - c_lo, act);
    return;
  }
  for (int64_t b = 0; b < iceil_div(np, V::NR); ++b) {
    for (int64_t c = c_lo; c < c_hi; ++c) activate_array<V>(tile + (b * pl.C + c) * V::NR, V::NR, act);
  }
}

// The depthwise output of channels [c_lo, c_hi) of a tile of image n, from x or, for an
// inverted residual, from the band of expanded rows computed for it first (kernel_expand.h).
template <class V>
void compute_tile_depthwise(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                    int64_t c_lo, int64_t c_hi, typename V::T* tile, void* scratch) {
  if (pl.expand == nullptr) {
    depthwise_tile<V>(pl, n, p0, np, c_lo, c_hi, tile, scratch);
    return;
  }
  const Plan<typename V::T> band = expanded_input<V>(pl, n, p0, np, c_lo, c_hi, scratch);
  depthwise_tile<V>(band, 0, p0, np, c_lo, c_hi, tile, scratch);
}

// Shared-depthwise mode, first phase: depthwise items [begin, end), item = (n * n_tiles + tile)
// * n_dw_chunks + chunk, each a range of dw_chunk input channels of one tile, into the shared
// tile of that (image, tile).
template <class V>
void run_depthwise(const Plan<typename V::T>& pl, int64_t begin, int64_t end, void* scratch) {
  const int64_t npix = pl.OH * pl.OW;
  if (pl.expand != nullptr && pl.expand->whole_images) {
    // Inverted residual, item = n * n_dw_chunks + chunk: the chunk's channels of the whole image
    // expanded once, then every tile's depthwise from that band.
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / pl.n_dw_chunks;
      const int64_t c_lo = (item % pl.n_dw_chunks) * pl.dw_chunk;
      const int64_t c_hi = imin(pl.C, c_lo + pl.dw_chunk);
      const Plan<typename V::T> band = expanded_rows<V>(pl, n, 0, pl.H, c_lo, c_hi, scratch);
      for (int64_t t = 0; t < pl.n_tiles; ++t) {
        const int64_t p0 = t * pl.tile_px;
        depthwise_tile<V>(band, 0, p0, imin(pl.tile_px, npix - p0), c_lo, c_hi,
                          pl.shared_dw + (n * pl.n_tiles + t) * pl.tile_elems, scratch);
      }
    }
    return;
  }
  for (int64_t item = begin; item < end; ++item) {
    const int64_t chunk = item % pl.n_dw_chunks;
    const int64_t nt = item / pl.n_dw_chunks;
    const int64_t p0 = (nt % pl.n_tiles) * pl.tile_px;
    const int64_t c_lo = chunk * pl.dw_chunk;
    compute_tile_depthwise<V>(pl, nt / pl.n_tiles, p0, imin(pl.tile_px, npix - p0), c_lo,
               imin(pl.C, c_lo + pl.dw_chunk), pl.shared_dw + nt * pl.tile_elems, scratch);
  }
}

// NHWC items whose weight panels fit in L1 together (few input channels): each block of MR
// pixel rows takes every panel in turn, so the tile's output pixels are written whole, in one
// ascending stream, where one pass per panel would write each pixel's channels in separate
// passes (32 -> 64 at 112x112, 2 threads, `bench_kernels`: batch 8 2.01 -> 1.80 ms, batch 1
// 0.207 -> 0.192). With a large output (Plan::prefetch_output) the lines a row block will write
// are asked for while the block before it computes: with K = 32 a row block's FMAs take less
// time than fetching its 24-32 output lines for writing from L3.
template <class V>
void nhwc_rows_first(const KernelFn<typename V::T> (&kern)[V::MR][V::NV], int64_t C,
                     const typename V::T* tile, int64_t ldt, const typename V::T* packed,
                     const Epi<typename V::T>& e, const EvenRowBlocks& blocks, int64_t co_a,
                     int64_t co_b, bool prefetch_output) {
  constexpr int NR = V::NR, W = V::W;
  const int64_t panels = iceil_div(co_b - co_a, NR);
  int64_t r0 = 0;
  for (int64_t b = 0; b < blocks.count; ++b) {
    const int rows = static_cast<int>(blocks.rows(b));
    // The next row block's output lines, requested in equal shares by this block's calls.
    int64_t lines = 0, per_call = 0;
    const char* next = nullptr;
    if (prefetch_output && b + 1 < blocks.count) {
      const int64_t r1 = r0 + rows;
      const char* lo = reinterpret_cast<const char*>(e.y + r1 * e.ldy + co_a);
      // (with a channel chunk, co_b - co_a < ldy, the span also covers other chunks' lines)
      const char* hi =
          reinterpret_cast<const char*>(e.y + (r1 + blocks.rows(b + 1) - 1) * e.ldy + co_b);
      next = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(lo) & ~uintptr_t(63));
      lines = (hi - next + 63) / 64;
      per_call = iceil_div(lines, panels);
    }
    for (int64_t co = co_a, j = 0; co < co_b; co += NR, ++j) {
      const int cols = static_cast<int>(imin(NR, co_b - co));
      PanelPrefetch pf;
      if (j * per_call < lines) {
        pf.next = next + j * per_call * 64;
        pf.lines = imin(per_call, lines - j * per_call);
      }
      kern[rows - 1][(cols + W - 1) / W - 1](C, tile + r0 * ldt, packed + (co / NR) * C * NR, ldt,
                                             e, r0, co, cols, pf);
    }
    r0 += rows;
  }
}

template <class V>
void run_items(const Plan<typename V::T>& pl, int64_t begin, int64_t end, void* scratch,
               int64_t* dw_tile) {
  using T = typename V::T;
  constexpr int MR = V::MR, NR = V::NR, W = V::W;
  // Up to this many trailing NCHW pixel columns go to ukernel_thin (worth it when a full-width
  // kernel would leave at least three quarters of its lanes idle).
  constexpr int kThinCols = W / 4;
  // NHWC items whose weight panels take at most this many bytes in all run rows first (L1d is
  // 32-48 KiB on the x86 cores measured; 64 KiB measured slower on 128 -> 128).
  constexpr int64_t kRowsFirstBytes = 32 * 1024;
  static_assert(kThinCols <= 4, "thin_dispatch covers up to 4 columns");
  const bool nchw = pl.layout == Layout::kNCHW;
  KernelFn<T> kern[V::MR][V::NV];
  if (nchw) {
    fill_kernels<V, true, V::MR, V::NV>(kern);
  } else {
    fill_kernels<V, false, V::MR, V::NV>(kern);
  }
  T* const own_tile = static_cast<T*>(scratch);
  const T* tile = own_tile;
  const T* packed = pl.packed->data();
  const int64_t npix = pl.OH * pl.OW;
  const int64_t C = pl.C, CO = pl.CO;
  // Statistics: the current panel's partial sums and the worker's per-channel sums (both double).
  constexpr int kPart = MR * W > NR ? MR * W : NR;
  alignas(64) double part_sum[kPart], part_sq[kPart];
  double* const ch_sum =
      pl.stats ? reinterpret_cast<double*>(static_cast<char*>(scratch) + pl.stats_offset)
               : nullptr;
  double* const ch_sq = pl.stats ? ch_sum + CO : nullptr;
  // y_transposed: the item's outputs in this layout, transposed into y afterwards (Plan).
  T* const out_buf =
      pl.y_transposed ? reinterpret_cast<T*>(static_cast<char*>(scratch) + pl.out_offset) : nullptr;
  auto panel_begin = [&] {
    for (int i = 0; i < kPart; ++i) part_sum[i] = part_sq[i] = 0.0;
  };
  // Adds part[p * lanes .. + lanes) into channel co + p, for p < count.
  auto panel_end = [&](int64_t co, int count, int lanes) {
    for (int p = 0; p < count; ++p) {
      double s = 0, q = 0;
      for (int l = 0; l < lanes; ++l) {
        s += part_sum[p * lanes + l];
        q += part_sq[p * lanes + l];
      }
      ch_sum[co + p] += s;
      ch_sq[co + p] += q;
    }
  };
  int64_t last = *dw_tile;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t cob = item % pl.n_co;
    const int64_t nt = item / pl.n_co;
    const int64_t n = nt / pl.n_tiles;
    const int64_t p0 = (nt % pl.n_tiles) * pl.tile_px;
    const int64_t np = imin(pl.tile_px, npix - p0);
    if (pl.shared_dw) {  // the first phase computed every tile's depthwise output
      tile = pl.shared_dw + nt * pl.tile_elems;
    } else if (nt != last) {  // consecutive items of one tile share its depthwise output
      compute_tile_depthwise<V>(pl, n, p0, np, 0, C, own_tile, scratch);
      last = nt;
    }
    const int64_t co_a = cob * pl.co_chunk;
    const int64_t co_b = imin(CO, co_a + pl.co_chunk);
    if (nchw) {
      const int64_t off = n * CO * npix + p0;
      const Epi<T> e{out_buf ? out_buf : pl.y + off, pl.residual ? pl.residual + off : nullptr,
                     out_buf ? pl.ldo : npix,
                     pl.pw_scale, pl.pw_shift, pl.out_act,
                     ch_sum ? part_sum : nullptr, ch_sum ? part_sq : nullptr, ch_sum, ch_sq};
      // A last column block of at most kThinCols pixels goes to the thin kernel, for each group
      // of panels right after their wide blocks.
      const int64_t last_cols = np - (np - 1) / NR * NR;
      const int64_t wide_np = last_cols <= kThinCols ? np - last_cols : np;
      const int tc = static_cast<int>(np - wide_np);
      const T* B_thin = tile + (wide_np / NR) * C * NR;
      const int64_t group = MR * thin_group_of<V>(tc);
      // The last tc pixels, when there are at most as many as whole column blocks before them
      // (7x7 and 14x14 images), ride along with those blocks' full panels, one pixel per block
      // (inference with a clamping activation).
      const int64_t wide_blocks = wide_np / NR;
      const bool plus_one =
          has_nchw_plus_one<V>() && tc > 0 && tc <= wide_blocks && !ch_sum && is_clamping(e.act);
      for (int64_t cg = co_a; cg < co_b; cg += group) {
        const int64_t cg_end = imin(co_b, cg + group);
        const bool tail_inline = plus_one && (cg_end - cg) % MR == 0;
        for (int64_t co = cg; co < cg_end; co += MR) {
          const int rows = static_cast<int>(imin(MR, co_b - co));
          const T* A = packed + (co / MR) * C * MR;
          if (ch_sum) panel_begin();
          for (int64_t c0 = 0; c0 < wide_np; c0 += NR) {
            const int cols = static_cast<int>(imin(NR, wide_np - c0));
            const T* B = tile + (c0 / NR) * C * NR;
            if constexpr (has_nchw_plus_one<V>()) {
              const int64_t t = c0 / NR - (wide_blocks - tc);  // the tail column this block takes
              if (tail_inline && t >= 0) {
                ukernel_nchw_plus_one<V>(C, A, B, B_thin + t, e, co, c0, wide_np + t);
                continue;
              }
            }
            kern[rows - 1][(cols + W - 1) / W - 1](C, A, B, 0, e, co, c0, cols, PanelPrefetch{});
          }
          if (ch_sum) panel_end(co, rows, W);
        }
        if (tc > 0 && !tail_inline) {  // (hardswish and silu: activated and counted afterwards)
          thin_dispatch<V>(tc, C, packed, B_thin, clamping_part(e), cg, cg_end, wide_np);
          if (!is_clamping(e.act)) {
            activate_stored(e, cg, cg_end - cg, wide_np, wide_np + tc, ch_sum ? ch_sum + cg : nullptr,
                            ch_sq ? ch_sq + cg : nullptr, 1, 0);
          }
        }
      }
      if (out_buf) {  // [co][pixel] -> y's [pixel][co]
        transpose_matrix<V>(out_buf + co_a * pl.ldo, pl.ldo, pl.y + (n * npix + p0) * CO + co_a, CO,
                            co_b - co_a, np);
      }
    } else {
      const int64_t off = (n * npix + p0) * CO;
      const Epi<T> e{out_buf ? out_buf : pl.y + off, pl.residual ? pl.residual + off : nullptr,
                     out_buf ? pl.ldo : CO,
                     pl.pw_scale, pl.pw_shift, pl.out_act,
                     ch_sum ? part_sum : nullptr, ch_sum ? part_sq : nullptr, ch_sum, ch_sq};
      const EvenRowBlocks blocks(np, MR);
      const int64_t panel_bytes = C * NR * int64_t(sizeof(T));
      if (!ch_sum && (co_b - co_a) * C * int64_t(sizeof(T)) <= kRowsFirstBytes) {
        nhwc_rows_first<V>(kern, C, tile, pl.ldt, packed, e, blocks, co_a, co_b,
                           pl.prefetch_output);
      } else {
        // Each panel in turn over all row blocks, while it stays in cache; the next panel's
        // lines are requested along the way.
        for (int64_t co = co_a; co < co_b; co += NR) {
          const int cols = static_cast<int>(imin(NR, co_b - co));
          const int nv = (cols + W - 1) / W;
          const T* B = packed + (co / NR) * C * NR;
          const bool more = co + NR < co_b;  // a next panel in this item's chunk
          if (ch_sum) panel_begin();
          int64_t r0 = 0;
          for (int64_t b = 0; b < blocks.count; ++b) {
            const int rows = static_cast<int>(blocks.rows(b));
            const PanelPrefetch pf =
                more ? next_panel_share(B, panel_bytes, b, blocks.count) : PanelPrefetch{};
            kern[rows - 1][nv - 1](C, tile + r0 * pl.ldt, B, pl.ldt, e, r0, co, cols, pf);
            r0 += rows;
          }
          if (ch_sum) panel_end(co, cols, 1);
        }
      }
      if (out_buf) {  // [pixel][co] -> y's [co][pixel]
        transpose_matrix<V>(out_buf + co_a, pl.ldo, pl.y + (n * CO + co_a) * npix + p0, npix, np,
                            co_b - co_a);
      }
    }
  }
  *dw_tile = last;
}

template <class V>
void activate_n(Activation a, typename V::T* p, int64_t n) {
  activate_array<V>(p, n, a);
}

template <class V>
void exp_n(const typename V::T* x, typename V::T* y, int64_t n) {
  using T = typename V::T;
  if constexpr (V::W == 1) {
    for (int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i]);
  } else {
    int64_t i = 0;
    for (; i + V::W <= n; i += V::W) V::store(y + i, exp_vec<V>(V::load(x + i)));
    if (i < n) {  // the rest through one whole vector too
      alignas(64) T tmp[V::W] = {};
      for (int64_t j = i; j < n; ++j) tmp[j - i] = x[j];
      V::store(tmp, exp_vec<V>(V::load(tmp)));
      for (int64_t j = i; j < n; ++j) y[j] = tmp[j - i];
    }
  }
}

// The entry points of the path whose vector traits are V (one table per ISA translation unit).
template <class V>
const IsaOps<typename V::T>* isa_ops(Isa isa) {
  static const IsaOps<typename V::T> ops{isa,           V::MR,           V::NR,
                                         V::W,          &run_items<V>,   &run_depthwise<V>,
                                         &run_dense_rows<V>, &activate_n<V>, &exp_n<V>,
                                         &transpose_matrix<V>};
  return &ops;
}

}  // namespace
}  // namespace detail
}  // namespace lwk
