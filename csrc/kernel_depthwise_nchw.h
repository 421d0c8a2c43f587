// The depthwise side of a work item in NCHW: one channel at a time, vectorised along output
// columns, either directly from x (border columns scalar) or through the zero-padded,
// stride-deinterleaved plane (Plan::use_plane), written into the column-blocked tile that the
// NCHW micro-kernels read as packed panels.
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

// Depthwise, NCHW: out[j] for the tile's pixels j, one channel at a time, vectorised along output
// columns. Rows of taps outside the image are skipped through the ky tables; columns whose taps
// are all inside run branch-free with W-wide (x4) vectors, border columns run scalar.

template <typename T>
LWK_INLINE T dw_pixel_nchw(const Plan<T>& pl, const T* xc, const T* wc, T bias, int64_t iy0,
                           int64_t kyl, int64_t kyh, int64_t ox) {
  const int64_t ix0 = ox * pl.stride_w - pl.pad_w;
  const int64_t kxl = pl.kx_lo[ox], kxh = pl.kx_hi[ox];
  T acc = bias;
  for (int64_t ky = kyl; ky < kyh; ++ky) {
    const T* row = xc + (iy0 + ky * pl.dil_h) * pl.W;
    const T* wk = wc + ky * pl.KW;
    for (int64_t kx = kxl; kx < kxh; ++kx) acc += wk[kx] * row[ix0 + kx * pl.dil_w];
  }
  return acc;
}

template <class V, int kS>
void dw_row_nchw(const Plan<typename V::T>& pl, const typename V::T* xc,
                 const typename V::T* wc, typename V::T bias, int64_t oy, int64_t ox0,
                 int64_t ox1, typename V::T* out) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  constexpr int U = 4;
  const Activation act = pl.mid_act;
  const int64_t kyl = pl.ky_lo[oy], kyh = pl.ky_hi[oy];
  const int64_t iy0 = oy * pl.stride_h - pl.pad_h - pl.x_row0;  // row of x (see Plan::x_row0)
  const int64_t a = imax(ox0, imin(ox1, pl.ox_in_lo));
  const int64_t b = imax(a, imin(ox1, pl.ox_in_hi));
  const int64_t S = pl.stride_w, KW = pl.KW, dil = pl.dil_w;
  int64_t ox = ox0;
  for (; ox < a; ++ox) {
    out[ox - ox0] = activate_clamping(dw_pixel_nchw(pl, xc, wc, bias, iy0, kyl, kyh, ox), act);
  }
  const R vb = V::set1(bias);
  for (; ox + U * W <= b; ox += U * W) {
    R acc[U];
    LWK_UNROLL for (int u = 0; u < U; ++u) acc[u] = vb;
    for (int64_t ky = kyl; ky < kyh; ++ky) {
      const T* row = xc + (iy0 + ky * pl.dil_h) * pl.W + ox * S - pl.pad_w;
      const T* wk = wc + ky * KW;
      for (int64_t kx = 0; kx < KW; ++kx) {
        const R w = V::set1(wk[kx]);
        const T* q = row + kx * dil;
        LWK_UNROLL for (int u = 0; u < U; ++u) {
          acc[u] = V::fma(w, load_strided<V, kS>(q + u * W * S, S), acc[u]);
        }
      }
    }
    LWK_UNROLL for (int u = 0; u < U; ++u) V::store(out + (ox - ox0) + u * W, activate_vec_clamping<V>(acc[u], act));
  }
  for (; ox + W <= b; ox += W) {
    R acc = vb;
    for (int64_t ky = kyl; ky < kyh; ++ky) {
      const T* row = xc + (iy0 + ky * pl.dil_h) * pl.W + ox * S - pl.pad_w;
      const T* wk = wc + ky * KW;
      for (int64_t kx = 0; kx < KW; ++kx) {
        acc = V::fma(V::set1(wk[kx]), load_strided<V, kS>(row + kx * dil, S), acc);
      }
    }
    V::store(out + (ox - ox0), activate_vec_clamping<V>(acc, act));
  }
  for (; ox < ox1; ++ox) {
    out[ox - ox0] = activate_clamping(dw_pixel_nchw(pl, xc, wc, bias, iy0, kyl, kyh, ox), act);
  }
}

// Moves one channel's depthwise row (np pixels) into the column-blocked tile: block b holds
// [C][NR], so tile[(b * C + c) * NR + j] = row[b * NR + j]; columns past np are zero (masked in
// registers: zeroing the row's tail first, element by element, made the boundary vector's load
// wait on stores it could not forward from).
template <class V>
LWK_INLINE void scatter_row(const typename V::T* row, int64_t np, int64_t C, int64_t c,
                            typename V::T* tile) {
  using T = typename V::T;
  constexpr int NR = V::NR, W = V::W;
  const int64_t full = np / NR;
  for (int64_t b = 0; b < full; ++b) {
    T* dst = tile + (b * C + c) * NR;
    LWK_UNROLL for (int v = 0; v < V::NV; ++v) V::store(dst + v * W, V::load(row + b * NR + v * W));
    LWK_NO_IDIOM();
  }
  const int64_t rest = np - full * NR;
  if (rest == 0) return;
  T* dst = tile + (full * C + c) * NR;
  const T* src = row + full * NR;
  LWK_UNROLL for (int v = 0; v < V::NV; ++v) {
    const int64_t lanes = imin(W, imax(0, rest - v * W));
    V::store(dst + v * W, V::keep_first(V::load(src + v * W), static_cast<int>(lanes)));
  }
}

// Depthwise output of channels [c_lo, c_hi) for the tile's pixels p0 .. p0+np-1 of image n into
// the column-blocked tile.
template <class V, int kS>
void dw_tile_nchw(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                  int64_t c_lo, int64_t c_hi, typename V::T* tile, typename V::T* row) {
  using T = typename V::T;
  const int64_t taps = pl.KH * pl.KW;
  for (int64_t c = c_lo; c < c_hi; ++c) {
    const T* xc = pl.x + pl.x_channel(n, c);
    const T* wc = pl.dw_w + c * taps;
    const T bias = pl.dw_b[c];
    int64_t p = p0;
    const int64_t pend = p0 + np;
    T* const cur_row = row + (c & 1) * pl.row_stride;  // see dw_tile_nchw_plane
    while (p < pend) {
      const int64_t oy = p / pl.OW, ox0 = p - oy * pl.OW;
      const int64_t ox1 = imin(pl.OW, ox0 + (pend - p));
      dw_row_nchw<V, kS>(pl, xc, wc, bias, oy, ox0, ox1, cur_row + (p - p0));
      p += ox1 - ox0;
    }
    if (c > c_lo) scatter_row<V>(row + ((c - 1) & 1) * pl.row_stride, np, pl.C, c - 1, tile);
  }
  scatter_row<V>(row + ((c_hi - 1) & 1) * pl.row_stride, np, pl.C, c_hi - 1, tile);
}

// NCHW through the plane (see Plan::use_plane). The plane of input rows iy_base ..
// iy_base + rows - 1 holds, for phase r of row iy,
// plane[(iy - iy_base) * stride_w * lp + phase_off[r] + m] = x[iy][m * stride_w + r - pad_w],
// 0 outside the image. Which elements are inside is the same for every channel of a tile, so
// zero_plane() clears a plane once per tile and fill_plane() then only writes the inside elements
// of each channel.
template <class V>
void zero_plane(typename V::T* plane, int64_t elems) {
  const typename V::reg z = V::zero();
  for (int64_t i = 0; i < elems; i += V::W) {
    V::store(plane + i, z);
    LWK_NO_IDIOM();
  }
}

// One phase of one plane row, as far as it lies inside the image: n elements of the channel,
// from its element `src` on (stride stride_w), to plane element `dst` on. The same for every
// channel of a tile, so they are listed once per tile and each channel's fill is a short loop
// over the list (on 7x7 and 14x14 images a row is a single vector: the per-row table lookups
// and index arithmetic cost more than the copy).
struct FillJob {
  int64_t src, dst, n;
};

// One W-wide vector of a tile's depthwise outputs: the plane offset its taps are relative to
// (its output row's origin plus its first column) and its offset in the tile's row buffer.
// Listed once per tile; each channel runs them in groups of independent accumulators, so short
// rows (7 or 14 outputs: one vector each) no longer wait on one dependent chain of FMAs each.
struct DwJob {
  int64_t plane, out;
};

template <class V, int kS>
void fill_plane(const Plan<typename V::T>& pl, const typename V::T* xc, const FillJob* jobs,
                int64_t njobs, typename V::T* plane) {
  using T = typename V::T;
  constexpr int W = V::W;
  const int64_t S = pl.stride_w;
  for (int64_t f = 0; f < njobs; ++f) {
    const int64_t n = jobs[f].n;
    T* d = plane + jobs[f].dst;
    const T* s0 = xc + jobs[f].src;
    if (n >= W) {  // whole vectors, the last one overlapping: nothing past the n elements written
      int64_t m = 0;
      for (; m + W < n; m += W) {
        V::store(d + m, load_strided<V, kS>(s0 + m * S, S));
        LWK_NO_IDIOM();
      }
      V::store(d + n - W, load_strided<V, kS>(s0 + (n - W) * S, S));
    } else if (s0 + (W - 1) * S < pl.x_end) {
      // A short row: one vector (reading on into the next row) with the lanes past the row
      // zeroed, as the padding they land on must be. (Scalar zero stores after a whole-vector
      // store cost more than the rest of the fill on 7- and 14-wide images.)
      V::store(d, V::keep_first(load_strided<V, kS>(s0, S), static_cast<int>(n)));
    } else {  // the very end of x: no vector may read past it
      for (int64_t m = 0; m < n; ++m) {
        d[m] = s0[m * S];
        LWK_NO_IDIOM();
      }
    }
  }
}

// N jobs of one channel: acc = bias + sum over taps t of w[t] * plane[job.plane + off[t] ...].
// kTaps > 0: tap count known at compile time, weights preloaded in wv; kTaps == 0: any tap
// count, weights broadcast from wc. Stores in job order: a job's vector may run past its row's
// end into the next job's outputs, which that job (later in the list) overwrites.
template <class V, int N, int kTaps>
LWK_INLINE void dw_jobs_plane(const typename V::T* plane, const DwJob* jobs, const int64_t* off,
                              int64_t taps, const typename V::reg* wv, const typename V::T* wc,
                              typename V::reg vb, Activation act, typename V::T* row) {
  using T = typename V::T;
  using R = typename V::reg;
  const T* base[N];
  R acc[N];
  LWK_UNROLL for (int u = 0; u < N; ++u) {
    base[u] = plane + jobs[u].plane;
    acc[u] = vb;
  }
  if constexpr (kTaps > 0) {
    (void)taps;
    (void)wc;
    LWK_UNROLL for (int t = 0; t < kTaps; ++t) {
      const int64_t o = off[t];
      LWK_UNROLL for (int u = 0; u < N; ++u) acc[u] = V::fma(wv[t], V::load(base[u] + o), acc[u]);
    }
  } else {
    (void)wv;
    for (int64_t t = 0; t < taps; ++t) {
      const R w = V::set1(wc[t]);
      const int64_t o = off[t];
      LWK_UNROLL for (int u = 0; u < N; ++u) acc[u] = V::fma(w, V::load(base[u] + o), acc[u]);
    }
  }
  LWK_UNROLL for (int u = 0; u < N; ++u) {
    V::store(row + jobs[u].out, activate_vec_clamping<V>(acc[u], act));
  }
}

// One channel: the tile's depthwise outputs into row[0 .. np) (whole vectors, so up to W-1
// elements past a row's end are written too; they belong to the next job, written afterwards,
// or to the row's slack).
template <class V, int kTaps>
void dw_channel_plane(const Plan<typename V::T>& pl, const typename V::T* plane,
                      const DwJob* jobs, int64_t njobs, const typename V::T* wc,
                      typename V::T bias, typename V::T* row) {
  using R = typename V::reg;
  constexpr int U = 4;
  static_assert(U == 4, "the remainder switch below covers U == 4");
  const Activation act = pl.mid_act;
  const int64_t taps = pl.KH * pl.KW;
  constexpr int kWv = kTaps > 0 ? kTaps : 1;
  R wv[kWv];
  int64_t off_local[kWv];
  const int64_t* off = pl.tap_off;
  if constexpr (kTaps > 0) {
    LWK_UNROLL for (int t = 0; t < kTaps; ++t) {
      wv[t] = V::set1(wc[t]);
      off_local[t] = pl.tap_off[t];
    }
    off = off_local;
  } else {
    wv[0] = V::zero();
    off_local[0] = 0;
  }
  const R vb = V::set1(bias);
  int64_t j = 0;
  for (; j + U <= njobs; j += U) {
    dw_jobs_plane<V, U, kTaps>(plane, jobs + j, off, taps, wv, wc, vb, act, row);
  }
  switch (njobs - j) {
    case 1:
      dw_jobs_plane<V, 1, kTaps>(plane, jobs + j, off, taps, wv, wc, vb, act, row);
      break;
    case 2:
      dw_jobs_plane<V, 2, kTaps>(plane, jobs + j, off, taps, wv, wc, vb, act, row);
      break;
    case 3:
      dw_jobs_plane<V, 3, kTaps>(plane, jobs + j, off, taps, wv, wc, vb, act, row);
      break;
    default:  // nothing left
      break;
  }
}

// The tile's fill and depthwise job lists (FillJob, DwJob) into `fill` and `jobs`, their counts
// into *nfill and *njobs. The plane holds input rows iy_base .. iy_base + rows - 1.
template <class V>
void list_tile_jobs(const Plan<typename V::T>& pl, int64_t p0, int64_t np, int64_t iy_base,
                    int64_t rows, FillJob* fill, int64_t* nfill, DwJob* jobs, int64_t* njobs) {
  constexpr int W = V::W;
  const int64_t S = pl.stride_w, rowsz = S * pl.lp;
  int64_t nf = 0, nj = 0;
  const int64_t i_a = imax(0, -iy_base), i_b = imin(rows, pl.H - iy_base);
  for (int64_t i = i_a; i < i_b; ++i) {
    for (int64_t r = 0; r < S; ++r) {
      // Phase elements m in [ma, mb) are inside the image (0 <= m*S + r - P < W).
      const int64_t ma = pl.phase_lo[r], mb = pl.phase_hi[r];
      if (mb <= ma) continue;
      fill[nf++] = FillJob{(iy_base + i - pl.x_row0) * pl.W + ma * S + r - pl.pad_w,
                           i * rowsz + pl.phase_off[r] + ma, mb - ma};
    }
  }
  for (int64_t p = p0, pend = p0 + np; p < pend;) {
    const int64_t oy = p / pl.OW, ox0 = p - oy * pl.OW;
    const int64_t len = imin(pl.OW - ox0, pend - p);
    const int64_t origin = (oy * pl.stride_h - pl.pad_h - iy_base) * rowsz + ox0;
    for (int64_t j = 0; j < len; j += W) jobs[nj++] = DwJob{origin + j, p - p0 + j};
    p += len;
  }
  *nfill = nf;
  *njobs = nj;
}

// Channels ahead of the one being filled whose input rows are prefetched (see dw_tile_nchw_plane).
constexpr int64_t kPrefetchChannels = 2;

// Requests the n elements at p, a channel's input rows for one tile (contiguous in NCHW).
template <class T>
LWK_INLINE void prefetch_span(const T* p, int64_t n) {
  const char* b = reinterpret_cast<const char*>(p);
  const char* const e = b + n * int64_t(sizeof(T));
  for (; b < e; b += 64) LWK_PREFETCH(b);
}

template <class V, int kS>
void dw_tile_nchw_plane(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                        int64_t c_lo, int64_t c_hi, typename V::T* tile, typename V::T* row,
                        typename V::T* plane, void* job_lists) {
  using T = typename V::T;
  const int64_t taps = pl.KH * pl.KW;
  const int64_t oy_a = p0 / pl.OW, oy_b = (p0 + np - 1) / pl.OW;
  const int64_t iy_base = oy_a * pl.stride_h - pl.pad_h;
  const int64_t rows = (oy_b - oy_a) * pl.stride_h + (pl.KH - 1) * pl.dil_h + 1;
  FillJob* fill = static_cast<FillJob*>(job_lists);
  DwJob* jobs = reinterpret_cast<DwJob*>(fill + pl.max_fill_jobs);
  int64_t nfill = 0, njobs = 0;
  list_tile_jobs<V>(pl, p0, np, iy_base, rows, fill, &nfill, jobs, &njobs);
  const bool k3 = taps == 9;
  // Software pipeline over channels: fill the plane of c+1, compute c, scatter c-1, with two
  // planes and two rows, so every load reads data stored one channel earlier. The rows of channel
  // c+1+kPrefetchChannels are requested meanwhile: each channel's few rows are too short a stream
  // for the hardware prefetchers, and inside a model x (the previous block's output) has left L2.
  const int64_t span_a = imax(0, -iy_base), span_b = imin(rows, pl.H - iy_base);
  const int64_t span_off = (iy_base + span_a - pl.x_row0) * pl.W;
  const int64_t span_len = imax(0, span_b - span_a) * pl.W;
  auto prefetch_channel = [&](int64_t c) { prefetch_span(pl.x + pl.x_channel(n, c) + span_off, span_len); };
  for (int64_t c = c_lo + 1; c < imin(c_hi, c_lo + 1 + kPrefetchChannels); ++c) prefetch_channel(c);

  const int64_t plane_elems = rows * pl.stride_w * pl.lp;
  zero_plane<V>(plane, plane_elems);
  zero_plane<V>(plane + pl.plane_stride, plane_elems);
  fill_plane<V, kS>(pl, pl.x + pl.x_channel(n, c_lo), fill, nfill,
                    plane + (c_lo & 1) * pl.plane_stride);
  for (int64_t c = c_lo; c < c_hi; ++c) {
    T* const cur_plane = plane + (c & 1) * pl.plane_stride;
    T* const cur_row = row + (c & 1) * pl.row_stride;
    if (c + 1 + kPrefetchChannels < c_hi) prefetch_channel(c + 1 + kPrefetchChannels);
    if (c + 1 < c_hi) {
      fill_plane<V, kS>(pl, pl.x + pl.x_channel(n, c + 1), fill, nfill,
                        plane + ((c + 1) & 1) * pl.plane_stride);
    }
    const T* wc = pl.dw_w + c * taps;
    if (k3) {
      dw_channel_plane<V, 9>(pl, cur_plane, jobs, njobs, wc, pl.dw_b[c], cur_row);
    } else {
      dw_channel_plane<V, 0>(pl, cur_plane, jobs, njobs, wc, pl.dw_b[c], cur_row);
    }
    if (c > c_lo) scatter_row<V>(row + ((c - 1) & 1) * pl.row_stride, np, pl.C, c - 1, tile);
  }
  scatter_row<V>(row + ((c_hi - 1) & 1) * pl.row_stride, np, pl.C, c_hi - 1, tile);
}

}  // namespace
}  // namespace detail
}  // namespace lwk
