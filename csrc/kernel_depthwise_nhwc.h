// The depthwise side of a work item in NHWC: tile[pixel][channel], vectorised along channels,
// with the folded weights stored tap-major; runs of pixels whose taps are all inside take a path
// without border tables that shares each weight load between several pixels (unrolled for 3x3).
// The mid activation applied here is a clamping one (none, relu, relu6): depthwise_tile
// (kernel_work_items.h) applies hardswish and silu in a pass over the finished tile.
//
// In an anonymous namespace like every kernel header: each ISA translation unit compiles its own
// copy with its own flags (kernel_work_items.h says why).
#pragma once

#include <cstdint>

#include "activation.h"
#include "compiler.h"
#include "internal.h"
#include "kernel_common.h"

namespace lwk {
namespace detail {
namespace {

// Depthwise, NHWC: tile[j * ldt + c] for the tile's pixels j, vectorised along channels with the
// folded weights stored tap-major ([KH*KW][C]). Each pixel's valid taps come from the tables, so
// the loops carry no bounds checks.

// Vector u of a group of N_ channel vectors from p: the last one masked to `tail` lanes when
// tail > 0 (the inside and the border paths both end a row of channels this way).
template <class V, int N_>
LWK_INLINE typename V::reg load_group_vec(const typename V::T* p, int u, int tail) {
  return u == N_ - 1 && tail > 0 ? V::load_first(p + u * V::W, tail) : V::load(p + u * V::W);
}

template <class V, int N_>
LWK_INLINE void store_group_vec(typename V::T* p, int u, int tail, typename V::reg v) {
  if (u == N_ - 1 && tail > 0) {
    V::store_first(p + u * V::W, v, tail);
  } else {
    V::store(p + u * V::W, v);
  }
}

// NP_ x NV_ accumulators: NP_ horizontally adjacent output pixels whose taps are all inside the
// image, NV_ channel vectors from c (the last one masked to `tail` lanes when tail > 0). Tap t of
// pixel p reads base + p*pstep + off[t] and weight row wt + t*C; each weight load serves the NP_
// pixels. kTaps: the tap count when known at compile time (9: 3x3, unrolled), else 0 and `taps`
// says.
template <class V, int NP_, int NV_, int kTaps>
LWK_INLINE void dw_nhwc_inside_block(const typename V::T* base, int64_t pstep, const int64_t* off,
                                     const typename V::T* wt, int64_t taps_rt,
                                     const Plan<typename V::T>& pl, int64_t c, int tail,
                                     typename V::T* out, int64_t ldt) {
  using R = typename V::reg;
  const int64_t C = pl.C;
  const int64_t taps = kTaps > 0 ? kTaps : taps_rt;
  auto load = [tail](const typename V::T* p, int u) { return load_group_vec<V, NV_>(p, u, tail); };
  R acc[NP_][NV_];
  LWK_UNROLL for (int u = 0; u < NV_; ++u) {
    const R b = load(pl.dw_b + c, u);
    LWK_UNROLL for (int q = 0; q < NP_; ++q) acc[q][u] = b;
  }
  for (int64_t t = 0; t < taps; ++t) {
    const typename V::T* xp = base + off[t] + c;
    const typename V::T* wp = wt + t * C + c;
    LWK_UNROLL for (int u = 0; u < NV_; ++u) {
      const R wv = load(wp, u);
      LWK_UNROLL for (int q = 0; q < NP_; ++q) {
        acc[q][u] = V::fma(wv, load(xp + q * pstep, u), acc[q][u]);
      }
    }
  }
  LWK_UNROLL for (int q = 0; q < NP_; ++q) {
    LWK_UNROLL for (int u = 0; u < NV_; ++u) {
      const typename V::reg v = activate_vec_clamping<V>(acc[q][u], pl.mid_act);
      store_group_vec<V, NV_>(out + q * ldt + c, u, tail, v);
    }
  }
}

// One channel group of NV_ vectors for `count` adjacent inside pixels, NP_ pixels at a time and
// the rest one by one.
template <class V, int NP_, int NV_, int kTaps>
LWK_INLINE void dw_nhwc_inside_group(const typename V::T* base, int64_t pstep, const int64_t* off,
                                     const typename V::T* wt, int64_t taps,
                                     const Plan<typename V::T>& pl, int64_t c, int tail,
                                     typename V::T* out, int64_t ldt, int64_t count) {
  int64_t q = 0;
  for (; q + NP_ <= count; q += NP_) {
    dw_nhwc_inside_block<V, NP_, NV_, kTaps>(base + q * pstep, pstep, off, wt, taps, pl, c, tail,
                                             out + q * ldt, ldt);
  }
  for (; q < count; ++q) {
    dw_nhwc_inside_block<V, 1, NV_, kTaps>(base + q * pstep, pstep, off, wt, taps, pl, c, tail,
                                           out + q * ldt, ldt);
  }
}

// A run of `count` horizontally adjacent output pixels whose taps (off, wt: all of them, or the
// rows of them inside the image) read inside the image, channels [c_lo, c_hi). Each tap's FMA
// chain is 4+ cycles long, so a core needs about 8 independent accumulators to keep its FMA
// units busy: groups of 4 channel vectors take pixels in pairs, 2 vectors in fours, a single or
// masked last vector in eights (a 32-channel image at 112 x 112 ran its depthwise ~3x slower as
// pairs of single vectors: latency-bound).
template <class V, int kTaps>
void dw_nhwc_inside_run(const typename V::T* base, int64_t pstep, const int64_t* off,
                        const typename V::T* wt, int64_t taps, const Plan<typename V::T>& pl,
                        int64_t c_lo, int64_t c_hi, typename V::T* out, int64_t ldt,
                        int64_t count) {
  constexpr int W = V::W;
  int64_t c = c_lo;
  for (; c + 4 * W <= c_hi; c += 4 * W) {
    dw_nhwc_inside_group<V, 2, 4, kTaps>(base, pstep, off, wt, taps, pl, c, 0, out, ldt, count);
  }
  for (; c + 2 * W <= c_hi; c += 2 * W) {
    dw_nhwc_inside_group<V, 4, 2, kTaps>(base, pstep, off, wt, taps, pl, c, 0, out, ldt, count);
  }
  for (; c + W <= c_hi; c += W) {
    dw_nhwc_inside_group<V, 8, 1, kTaps>(base, pstep, off, wt, taps, pl, c, 0, out, ldt, count);
  }
  if (c < c_hi) {  // the last C mod W channels: one masked vector
    dw_nhwc_inside_group<V, 8, 1, kTaps>(base, pstep, off, wt, taps, pl, c,
                                         static_cast<int>(c_hi - c), out, ldt, count);
  }
}

// U_ channel vectors from c of one border pixel (the last one masked to `tail` lanes when
// tail > 0), its valid taps rows [kyl, kyh) x columns [kxl, kxh); tap (ky, kx) reads row
// iy0 + ky*dil_h, column ix0 + kx*dil_w of image xn.
template <class V, int U_>
LWK_INLINE void dw_nhwc_pixel_group(const Plan<typename V::T>& pl, const typename V::T* xn,
                                    int64_t iy0, int64_t ix0, int64_t kyl, int64_t kyh,
                                    int64_t kxl, int64_t kxh, int64_t c, int tail,
                                    typename V::T* out) {
  using T = typename V::T;
  using R = typename V::reg;
  const int64_t C = pl.C;
  auto load = [tail](const T* p, int u) { return load_group_vec<V, U_>(p, u, tail); };
  R acc[U_];
  LWK_UNROLL for (int u = 0; u < U_; ++u) acc[u] = load(pl.dw_b + c, u);
  for (int64_t ky = kyl; ky < kyh; ++ky) {
    const T* xr = xn + ((iy0 + ky * pl.dil_h) * pl.W + ix0) * C + c;
    const T* wr = pl.dw_w + ky * pl.KW * C + c;
    for (int64_t kx = kxl; kx < kxh; ++kx) {
      const T* xp = xr + kx * pl.dil_w * C;
      const T* wp = wr + kx * C;
      LWK_UNROLL for (int u = 0; u < U_; ++u) acc[u] = V::fma(load(wp, u), load(xp, u), acc[u]);
    }
  }
  LWK_UNROLL for (int u = 0; u < U_; ++u) {
    store_group_vec<V, U_>(out + c, u, tail, activate_vec_clamping<V>(acc[u], pl.mid_act));
  }
}

// Any pixel: valid taps from the border tables. Each tap's FMA waits for the one before on the
// same accumulator, so channels go 4 or 2 vectors at a time where they can (a 32-channel border
// pixel as two single vectors ran ~3x slower per pixel than the inside path).
template <class V>
void dw_nhwc_pixel(const Plan<typename V::T>& pl, const typename V::T* xn, int64_t oy,
                   int64_t ox, int64_t c_lo, int64_t c_hi, typename V::T* out) {
  constexpr int W = V::W;
  const int64_t kyl = pl.ky_lo[oy], kyh = pl.ky_hi[oy];
  const int64_t kxl = pl.kx_lo[ox], kxh = pl.kx_hi[ox];
  // (iy0: a row of x, see Plan::x_row0)
  const int64_t iy0 = oy * pl.stride_h - pl.pad_h - pl.x_row0, ix0 = ox * pl.stride_w - pl.pad_w;
  int64_t c = c_lo;
  for (; c + 4 * W <= c_hi; c += 4 * W) {
    dw_nhwc_pixel_group<V, 4>(pl, xn, iy0, ix0, kyl, kyh, kxl, kxh, c, 0, out);
  }
  if (c + 2 * W <= c_hi) {
    dw_nhwc_pixel_group<V, 2>(pl, xn, iy0, ix0, kyl, kyh, kxl, kxh, c, 0, out);
    c += 2 * W;
  }
  if (c + W <= c_hi) {
    dw_nhwc_pixel_group<V, 1>(pl, xn, iy0, ix0, kyl, kyh, kxl, kxh, c, 0, out);
    c += W;
  }
  if (c < c_hi) {  // the last C mod W channels: one masked vector
    dw_nhwc_pixel_group<V, 1>(pl, xn, iy0, ix0, kyl, kyh, kxl, kxh, c, static_cast<int>(c_hi - c),
                              out);
  }
}

// The most taps whose offsets the inside path keeps (7x7); larger kernels take the border path.
constexpr int64_t kInsideMaxTaps = 49;

// Bytes of input rows a sweep over one channel range may keep for reuse by the next pixels: each
// pixel reads (KH-1)*dil+1 rows of its channels, and its right-hand neighbour reads the same rows
// again. Under an L1 data cache's size (32-48 KiB) with room left for weights and outputs: 24 KiB
// measured as fast as 32 on a 48 KiB L1 (faster on 3x3 kernels) and leaves 32 KiB L1s room.
constexpr int64_t kDwWindowBytes = int64_t(24) << 10;

// The channels of one sweep over the tile's pixels: all of [c_lo, c_hi) while their row window fits
// a few times kDwWindowBytes (L2 then serves it well), else the most whole groups of 4 vectors (the
// inside path's widest group; splitting 32-128 channels into single-vector chunks measured 10-25%
// slower on 112x112 images at batch 8) whose window fits kDwWindowBytes. Wide, shallow images at
// batch 8 (1152 channels at 7x7: a 161 KiB window) ran their depthwise up to 30% faster in
// L1-sized channel chunks.
template <class V>
int64_t dw_nhwc_channel_chunk(const Plan<typename V::T>& pl, int64_t channels) {
  constexpr int64_t unit = 4 * V::W;
  const int64_t rows = (pl.KH - 1) * pl.dil_h + 1;
  const int64_t per_channel = rows * pl.W * int64_t(sizeof(typename V::T));
  if (channels * per_channel <= 3 * kDwWindowBytes || unit * per_channel > kDwWindowBytes) return channels;
  return kDwWindowBytes / per_channel / unit * unit;
}

template <class V>
void dw_tile_nhwc_channels(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                           int64_t c_lo, int64_t c_hi, typename V::T* tile) {
  using T = typename V::T;
  const int64_t C = pl.C;
  const T* xn = pl.x + pl.x_image(n);
  const int64_t taps = pl.KH * pl.KW;
  const bool k3 = pl.KH == 3 && pl.KW == 3;
  const bool inside_path = taps <= kInsideMaxTaps;
  int64_t off[kInsideMaxTaps];
  if (inside_path) {
    for (int64_t t = 0; t < taps; ++t) {
      off[t] = ((t / pl.KW) * pl.dil_h * pl.W + (t % pl.KW) * pl.dil_w) * C;
    }
  }
  const int64_t pstep = pl.stride_w * C;
  int64_t oy = p0 / pl.OW, ox = p0 - oy * pl.OW;  // advanced incrementally (no division per pixel)
  for (int64_t j = 0; j < np;) {
    if (ox == pl.OW) {
      ox = 0;
      ++oy;
    }
    T* out = tile + j * pl.ldt;
    const int64_t kyl = pl.ky_lo[oy], kyh = pl.ky_hi[oy];
    if (inside_path && kyh > kyl && ox >= pl.ox_in_lo && ox < pl.ox_in_hi) {
      // Every column tap inside: the rest of the row inside takes the multi-pixel path, with the
      // taps of the rows kyl .. kyh-1 (tap-major: a contiguous run of off and of the weights) in
      // the image's first and last rows.
      const int64_t iy = oy * pl.stride_h - pl.pad_h - pl.x_row0 + kyl * pl.dil_h;
      const T* base = xn + (iy * pl.W + ox * pl.stride_w - pl.pad_w) * C;
      const int64_t count = imin(pl.ox_in_hi - ox, np - j);
      if (kyh - kyl == pl.KH) {
        if (k3) {
          dw_nhwc_inside_run<V, 9>(base, pstep, off, pl.dw_w, 9, pl, c_lo, c_hi, out, pl.ldt,
                                   count);
        } else {
          dw_nhwc_inside_run<V, 0>(base, pstep, off, pl.dw_w, taps, pl, c_lo, c_hi, out, pl.ldt,
                                   count);
        }
      } else {
        const int64_t first = kyl * pl.KW, row_off = kyl * pl.dil_h * pl.W * C;
        int64_t part[kInsideMaxTaps];
        for (int64_t t = first; t < kyh * pl.KW; ++t) part[t - first] = off[t] - row_off;
        dw_nhwc_inside_run<V, 0>(base, pstep, part, pl.dw_w + first * C, (kyh - kyl) * pl.KW, pl,
                                 c_lo, c_hi, out, pl.ldt, count);
      }
      j += count;
      ox += count;
      continue;
    }
    dw_nhwc_pixel<V>(pl, xn, oy, ox, c_lo, c_hi, out);
    ++j;
    ++ox;
  }
}

// Depthwise of the tile p0 .. p0+np-1 of image n, channels [c_lo, c_hi), one sweep over the
// pixels per channel chunk (dw_nhwc_channel_chunk). The last chunk takes what is left when less
// than two chunks remain, so no sweep is narrower than a chunk.
template <class V>
void dw_tile_nhwc(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                  int64_t c_lo, int64_t c_hi, typename V::T* tile) {
  const int64_t chunk = dw_nhwc_channel_chunk<V>(pl, c_hi - c_lo);
  for (int64_t c = c_lo; c < c_hi;) {
    const int64_t end = c_hi - c >= 2 * chunk ? c + chunk : c_hi;
    dw_tile_nhwc_channels<V>(pl, n, p0, np, c, end, tile);
    c = end;
  }
}

}  // namespace
}  // namespace detail
}  // namespace lwk
