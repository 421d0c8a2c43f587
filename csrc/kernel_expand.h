// The expand step of an inverted residual (ExpandStage in internal.h): one tile's band of expanded
// rows, act(scale * (W_expand . x) + shift), computed by the pointwise GEMM micro-kernels and their
// epilogue straight into the worker's scratch, where the tile's depthwise then reads it.
//
// In an anonymous namespace like every kernel header: each ISA translation unit compiles its own
// copy with its own flags (kernel_work_items.h says why).
#pragma once

#include <cstdint>

#include "compiler.h"
#include "internal.h"
#include "kernel_common.h"
#include "kernel_gemm.h"

namespace lwk {
namespace detail {
namespace {

// Expanded channels [c_lo, c_hi) (c_lo on a panel boundary) of input rows [iy_a, iy_b) of image n
// into `band` (NCHW [C][rows][W], NHWC [rows][W][C]); `scratch` is the worker's.
template <class V>
void expand_band(const Plan<typename V::T>& pl, int64_t n, int64_t iy_a, int64_t iy_b,
                 int64_t c_lo, int64_t c_hi, typename V::T* band, void* scratch) {
  using T = typename V::T;
  constexpr int MR = V::MR, NR = V::NR, W = V::W;
  const ExpandStage<T>& ex = *pl.expand;
  const int64_t cin = ex.in_channels, C = pl.C, HW = pl.H * pl.W;
  const int64_t P = (iy_b - iy_a) * pl.W;  // the band's pixels
  const T* packed = ex.packed->data();
  const Epi<T> e{band, nullptr, pl.layout == Layout::kNHWC ? C : P, ex.scale, ex.shift, ex.act};
  KernelFn<T> kern[V::MR][V::NV];
  if (pl.layout == Layout::kNHWC) {
    // Rows = pixels, read in place (lda = C_in); columns = expanded channels (packed panels).
    fill_kernels<V, false, V::MR, V::NV>(kern);
    const T* A = ex.x + (n * HW + iy_a * pl.W) * cin;
    const EvenRowBlocks blocks(P, MR);
    const int64_t panel_bytes = cin * NR * int64_t(sizeof(T));
    for (int64_t co = c_lo / NR * NR; co < c_hi; co += NR) {
      const int cols = static_cast<int>(imin(NR, C - co));
      const T* B = packed + (co / NR) * cin * NR;
      const bool more = co + NR < c_hi;
      int64_t r0 = 0;
      for (int64_t b = 0; b < blocks.count; ++b) {
        const int rows = static_cast<int>(blocks.rows(b));
        const PanelPrefetch pf =
            more ? next_panel_share(B, panel_bytes, b, blocks.count) : PanelPrefetch{};
        kern[rows - 1][(cols + W - 1) / W - 1](cin, A + r0 * cin, B, cin, e, r0, co, cols, pf);
        r0 += rows;
      }
    }
    return;
  }
  // NCHW: rows = expanded channels (packed panels, broadcast), columns = pixels, which the
  // micro-kernel reads as packed [C_in][NR] blocks: the band's input pixels are copied into them
  // once (C_in is the narrow side of an inverted residual), zero past the last pixel.
  fill_kernels<V, true, V::MR, V::NV>(kern);
  T* blocks = reinterpret_cast<T*>(static_cast<char*>(scratch) + ex.pack_offset);
  const T* xin = ex.x + n * cin * HW + iy_a * pl.W;
  const int64_t nb = iceil_div(P, NR);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t p0 = b * NR, np = imin(NR, P - p0);
    T* dst = blocks + b * cin * NR;
    for (int64_t k = 0; k < cin; ++k) {
      const T* src = xin + k * HW + p0;
      T* d = dst + k * NR;
      for (int64_t j = 0; j < np; ++j) d[j] = src[j];
      for (int64_t j = np; j < NR; ++j) d[j] = T(0);
    }
  }
  for (int64_t ce = c_lo / MR * MR; ce < c_hi; ce += MR) {
    const int rows = static_cast<int>(imin(MR, C - ce));
    const T* A = packed + (ce / MR) * cin * MR;
    for (int64_t b = 0; b < nb; ++b) {
      const int cols = static_cast<int>(imin(NR, P - b * NR));
      kern[rows - 1][(cols + W - 1) / W - 1](cin, A, blocks + b * cin * NR, 0, e, ce, b * NR, cols,
                                             PanelPrefetch{});
    }
  }
}

// The plan that reads input rows [iy_a, iy_b) of image n, expanded (channels [c_lo, c_hi) of
// them computed here into the worker's band), as image 0.
template <class V>
Plan<typename V::T> expanded_rows(const Plan<typename V::T>& pl, int64_t n, int64_t iy_a,
                                  int64_t iy_b, int64_t c_lo, int64_t c_hi, void* scratch) {
  using T = typename V::T;
  const ExpandStage<T>& ex = *pl.expand;
  T* band = reinterpret_cast<T*>(static_cast<char*>(scratch) + ex.band_offset);
  if (iy_b > iy_a) expand_band<V>(pl, n, iy_a, iy_b, c_lo, c_hi, band, scratch);
  Plan<T> in = pl;
  in.x = band;
  in.x_row0 = iy_a;
  in.x_rows = iy_b - iy_a;
  in.x_end = band + ex.band_elems;
  return in;
}

// The plan that reads the depthwise input of tile p0 .. p0+np-1 of image n: the input rows its
// taps reach inside the image (rows outside are zero padding), expanded.
template <class V>
Plan<typename V::T> expanded_input(const Plan<typename V::T>& pl, int64_t n, int64_t p0,
                                   int64_t np, int64_t c_lo, int64_t c_hi, void* scratch) {
  const int64_t oy_a = p0 / pl.OW, oy_b = (p0 + np - 1) / pl.OW;
  const int64_t iy_a = imax(0, oy_a * pl.stride_h - pl.pad_h);
  const int64_t iy_b =
      imax(iy_a, imin(pl.H, oy_b * pl.stride_h - pl.pad_h + (pl.KH - 1) * pl.dil_h + 1));
  return expanded_rows<V>(pl, n, iy_a, iy_b, c_lo, c_hi, scratch);
}

}  // namespace
}  // namespace detail
}  // namespace lwk
