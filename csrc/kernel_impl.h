// The fused joint-block tile computation, written once over a small vector-traits struct V and
// instantiated in each ISA translation unit (isa_scalar.cpp, isa_avx2.cpp, isa_neon.cpp) with that
// unit's compiler flags.
//
// V provides:
//   using T;            element type          using reg;    vector register type
//   W                   lanes per register    MR, NV        micro-kernel rows, column registers
//   NR = NV * W         micro-kernel columns
//   zero() set1(s) load(p) store(p, v) fma(a, b, c) = a*b + c, add(a, b)
//   max_keep(lo, v) / min_keep(hi, v)     max/min that return v when v is NaN (like torch.relu)
//   load_s2(p)          {p[0], p[2], ..., p[2W-2]} without reading past p[2W-2]
//
// Per work item (image n, pixel tile, output-channel block), see run_items():
//   1. depthwise: the tile's depthwise output for all C_in channels goes into a per-worker buffer
//      that stays in L1/L2 (NCHW: [C_in][pixels], NHWC: [pixels][C_in]), with the depthwise
//      scale/shift and mid activation applied;
//   2. pointwise: a register-blocked GEMM micro-kernel multiplies that buffer with the packed
//      pointwise panels; its epilogue applies scale, shift, residual and the output activation
//      while storing y. NHWC: rows = pixels, columns = output channels (B = packed W^T panels);
//      NCHW: rows = output channels (A = packed W panels, broadcast), columns = pixels. Either way
//      y is written along contiguous vectors, and the full intermediate is never materialised.
//
// Everything here is in an anonymous namespace on purpose: each ISA translation unit gets its own
// private copy compiled with its own flags, so the linker can never merge, say, an AVX2-compiled
// helper into the scalar path.
#pragma once

#include <cstdint>

#include "internal.h"

#if defined(__GNUC__) || defined(__clang__)
#define LWK_INLINE inline __attribute__((always_inline))
#define LWK_RESTRICT __restrict__
#else
#define LWK_INLINE inline
#define LWK_RESTRICT
#endif

#if defined(__clang__)
#define LWK_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LWK_UNROLL _Pragma("GCC unroll 16")
#else
#define LWK_UNROLL
#endif

namespace lwk {
namespace detail {
namespace {

LWK_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
LWK_INLINE int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
LWK_INLINE int64_t iceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scalar activation; NaN propagates as in torch.relu / relu6.
template <typename T>
LWK_INLINE T act_scalar(T v, Activation a) {
  if (a == Activation::kNone) return v;
  v = v < T(0) ? T(0) : v;
  if (a == Activation::kRelu6) v = v > T(6) ? T(6) : v;
  return v;
}

template <class V>
LWK_INLINE typename V::reg act_vec(typename V::reg v, Activation a) {
  using T = typename V::T;
  if (a == Activation::kNone) return v;
  v = V::max_keep(V::zero(), v);
  if (a == Activation::kRelu6) v = V::min_keep(V::set1(T(6)), v);
  return v;
}

template <class V, Activation A>
LWK_INLINE typename V::reg act_vec_t(typename V::reg v) {
  using T = typename V::T;
  if (A == Activation::kNone) return v;
  v = V::max_keep(V::zero(), v);
  if (A == Activation::kRelu6) v = V::min_keep(V::set1(T(6)), v);
  return v;
}

// Loads W elements p[0], p[s], p[2s], ... ; kS is the stride when known at compile time (1 or 2),
// 0 for any stride.
template <class V, int kS>
LWK_INLINE typename V::reg load_strided(const typename V::T* p, int64_t s) {
  using T = typename V::T;
  if constexpr (kS == 1) {
    (void)s;
    return V::load(p);
  } else if constexpr (kS == 2) {
    (void)s;
    return V::load_s2(p);
  } else {
    alignas(64) T tmp[V::W];
    for (int i = 0; i < V::W; ++i) tmp[i] = p[i * s];
    return V::load(tmp);
  }
}

// Output side of one micro-tile. Element (r, c) of the tile is y[r * ldy + c] (the pointers are
// already offset to the work item); its per-channel parameters are indexed by r for NCHW (rows
// are output channels) and by c for NHWC (columns are output channels).
template <typename T>
struct Epi {
  T* y;
  const T* res;  // null: no residual
  int64_t ldy;
  const T* scale;
  const T* shift;
  Activation act;
};

template <class V, int MR_, int NV_, bool kNCHW, Activation A>
LWK_INLINE void store_full(const typename V::reg (&acc)[MR_][NV_], const Epi<typename V::T>& e,
                           int64_t r0, int64_t c0) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  R sc_col[NV_], sh_col[NV_];
  if (!kNCHW) {
    LWK_UNROLL for (int j = 0; j < NV_; ++j) {
      sc_col[j] = V::load(e.scale + c0 + j * W);
      sh_col[j] = V::load(e.shift + c0 + j * W);
    }
  }
  LWK_UNROLL for (int i = 0; i < MR_; ++i) {
    const int64_t off = (r0 + i) * e.ldy + c0;
    T* yr = e.y + off;
    R sc_row = V::zero(), sh_row = V::zero();
    if (kNCHW) {
      sc_row = V::set1(e.scale[r0 + i]);
      sh_row = V::set1(e.shift[r0 + i]);
    }
    LWK_UNROLL for (int j = 0; j < NV_; ++j) {
      R v = V::fma(acc[i][j], kNCHW ? sc_row : sc_col[j], kNCHW ? sh_row : sh_col[j]);
      if (e.res) v = V::add(v, V::load(e.res + off + j * W));
      V::store(yr + j * W, act_vec_t<V, A>(v));
    }
  }
}

// The micro-kernel: acc[MR_ x NV_*W] = sum_k A(i, k) * B(k, j), then the epilogue for `cols` valid
// columns (rows are always all valid: callers pick MR_ = remaining rows).
//   kNCHW: A is a packed panel, A(i, k) = A[k * V::MR + i]; B(k, j) = B[k * ld + j] (tile rows).
//   NHWC:  A(i, k) = A[i * ld + k] (tile rows);  B is a packed panel, B(k, j) = B[k * V::NR + j].
template <class V, int MR_, int NV_, bool kNCHW>
void ukernel(int64_t K, const typename V::T* LWK_RESTRICT A, const typename V::T* LWK_RESTRICT B,
             int64_t ld, const Epi<typename V::T>& e, int64_t r0, int64_t c0, int cols) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  R acc[MR_][NV_];
  LWK_UNROLL for (int i = 0; i < MR_; ++i) {
    LWK_UNROLL for (int j = 0; j < NV_; ++j) acc[i][j] = V::zero();
  }
  if (kNCHW) {
    for (int64_t k = 0; k < K; ++k) {
      R b[NV_];
      LWK_UNROLL for (int j = 0; j < NV_; ++j) b[j] = V::load(B + j * W);
      LWK_UNROLL for (int i = 0; i < MR_; ++i) {
        const R a = V::set1(A[i]);
        LWK_UNROLL for (int j = 0; j < NV_; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
      }
      A += V::MR;
      B += ld;
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      R b[NV_];
      LWK_UNROLL for (int j = 0; j < NV_; ++j) b[j] = V::load(B + j * W);
      LWK_UNROLL for (int i = 0; i < MR_; ++i) {
        const R a = V::set1(A[i * ld + k]);
        LWK_UNROLL for (int j = 0; j < NV_; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
      }
      B += V::NR;
    }
  }

  if (cols == NV_ * W) {
    switch (e.act) {
      case Activation::kNone:
        store_full<V, MR_, NV_, kNCHW, Activation::kNone>(acc, e, r0, c0);
        break;
      case Activation::kRelu:
        store_full<V, MR_, NV_, kNCHW, Activation::kRelu>(acc, e, r0, c0);
        break;
      case Activation::kRelu6:
        store_full<V, MR_, NV_, kNCHW, Activation::kRelu6>(acc, e, r0, c0);
        break;
    }
    return;
  }
  // Partial tile: spill the accumulators, finish the valid part element by element.
  alignas(64) T tmp[MR_][NV_ * W];
  LWK_UNROLL for (int i = 0; i < MR_; ++i) {
    LWK_UNROLL for (int j = 0; j < NV_; ++j) V::store(&tmp[i][j * W], acc[i][j]);
  }
  for (int i = 0; i < MR_; ++i) {
    for (int c = 0; c < cols; ++c) {
      const int64_t ch = kNCHW ? r0 + i : c0 + c;
      const int64_t off = (r0 + i) * e.ldy + c0 + c;
      T v = tmp[i][c] * e.scale[ch] + e.shift[ch];
      if (e.res) v += e.res[off];
      e.y[off] = act_scalar(v, e.act);
    }
  }
}

template <typename T>
using KernelFn = void (*)(int64_t, const T*, const T*, int64_t, const Epi<T>&, int64_t, int64_t,
                          int);

// table[r - 1][v - 1] = micro-kernel with r rows and v column registers.
template <class V, bool kNCHW, int R_, int N_>
void fill_kernels(KernelFn<typename V::T> (&table)[V::MR][V::NV]) {
  table[R_ - 1][N_ - 1] = &ukernel<V, R_, N_, kNCHW>;
  if constexpr (N_ > 1) {
    fill_kernels<V, kNCHW, R_, N_ - 1>(table);
  } else if constexpr (R_ > 1) {
    fill_kernels<V, kNCHW, R_ - 1, V::NV>(table);
  }
}

// ----------------------------------------------------------------------------------------------
// Depthwise, NCHW: out[j] for the tile's pixels j, one channel at a time, vectorised along output
// columns. Rows of taps outside the image are skipped through the ky tables; columns whose taps
// are all inside run branch-free with W-wide (x4) vectors, border columns run scalar.

template <typename T>
LWK_INLINE T dw_pixel_nchw(const Plan<T>& pl, const T* xc, const T* wc, T bias, int64_t iy0,
                           int64_t kyl, int64_t kyh, int64_t ox) {
  const int64_t ix0 = ox * pl.SW - pl.PW;
  const int64_t kxl = pl.kx_lo[ox], kxh = pl.kx_hi[ox];
  T acc = bias;
  for (int64_t ky = kyl; ky < kyh; ++ky) {
    const T* row = xc + (iy0 + ky * pl.DH) * pl.W;
    const T* wk = wc + ky * pl.KW;
    for (int64_t kx = kxl; kx < kxh; ++kx) acc += wk[kx] * row[ix0 + kx * pl.DW];
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
  const int64_t iy0 = oy * pl.SH - pl.PH;
  const int64_t a = imax(ox0, imin(ox1, pl.ox_in_lo));
  const int64_t b = imax(a, imin(ox1, pl.ox_in_hi));
  const int64_t S = pl.SW, KW = pl.KW, DWi = pl.DW;
  int64_t ox = ox0;
  for (; ox < a; ++ox) {
    out[ox - ox0] = act_scalar(dw_pixel_nchw(pl, xc, wc, bias, iy0, kyl, kyh, ox), act);
  }
  const R vb = V::set1(bias);
  for (; ox + U * W <= b; ox += U * W) {
    R acc[U];
    LWK_UNROLL for (int u = 0; u < U; ++u) acc[u] = vb;
    for (int64_t ky = kyl; ky < kyh; ++ky) {
      const T* row = xc + (iy0 + ky * pl.DH) * pl.W + ox * S - pl.PW;
      const T* wk = wc + ky * KW;
      for (int64_t kx = 0; kx < KW; ++kx) {
        const R w = V::set1(wk[kx]);
        const T* q = row + kx * DWi;
        LWK_UNROLL for (int u = 0; u < U; ++u) {
          acc[u] = V::fma(w, load_strided<V, kS>(q + u * W * S, S), acc[u]);
        }
      }
    }
    LWK_UNROLL for (int u = 0; u < U; ++u) V::store(out + (ox - ox0) + u * W, act_vec<V>(acc[u], act));
  }
  for (; ox + W <= b; ox += W) {
    R acc = vb;
    for (int64_t ky = kyl; ky < kyh; ++ky) {
      const T* row = xc + (iy0 + ky * pl.DH) * pl.W + ox * S - pl.PW;
      const T* wk = wc + ky * KW;
      for (int64_t kx = 0; kx < KW; ++kx) {
        acc = V::fma(V::set1(wk[kx]), load_strided<V, kS>(row + kx * DWi, S), acc);
      }
    }
    V::store(out + (ox - ox0), act_vec<V>(acc, act));
  }
  for (; ox < ox1; ++ox) {
    out[ox - ox0] = act_scalar(dw_pixel_nchw(pl, xc, wc, bias, iy0, kyl, kyh, ox), act);
  }
}

// Fills tile[c * ldt + j], j < np (zero up to the next multiple of W), for pixels p0 + j of image n.
template <class V, int kS>
void dw_tile_nchw(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                  typename V::T* tile) {
  using T = typename V::T;
  const int64_t HW = pl.H * pl.W, taps = pl.KH * pl.KW;
  const int64_t npad = iceil_div(np, V::W) * V::W;
  for (int64_t c = 0; c < pl.C; ++c) {
    const T* xc = pl.x + (n * pl.C + c) * HW;
    const T* wc = pl.dw_w + c * taps;
    const T bias = pl.dw_b[c];
    T* out = tile + c * pl.ldt;
    int64_t p = p0;
    const int64_t pend = p0 + np;
    while (p < pend) {
      const int64_t oy = p / pl.OW, ox0 = p - oy * pl.OW;
      const int64_t ox1 = imin(pl.OW, ox0 + (pend - p));
      dw_row_nchw<V, kS>(pl, xc, wc, bias, oy, ox0, ox1, out + (p - p0));
      p += ox1 - ox0;
    }
    for (int64_t j = np; j < npad; ++j) out[j] = T(0);
  }
}

// ----------------------------------------------------------------------------------------------
// Depthwise, NHWC: tile[j * ldt + c] for the tile's pixels j, vectorised along channels with the
// folded weights stored tap-major ([KH*KW][C]). Each pixel's valid taps come from the tables, so
// the loops carry no bounds checks.

template <class V>
void dw_tile_nhwc(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                  typename V::T* tile) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  constexpr int U = 4;
  const int64_t C = pl.C;
  const T* xn = pl.x + n * pl.H * pl.W * C;
  const Activation act = pl.mid_act;
  for (int64_t j = 0; j < np; ++j) {
    const int64_t p = p0 + j;
    const int64_t oy = p / pl.OW, ox = p - oy * pl.OW;
    const int64_t kyl = pl.ky_lo[oy], kyh = pl.ky_hi[oy];
    const int64_t kxl = pl.kx_lo[ox], kxh = pl.kx_hi[ox];
    const int64_t iy0 = oy * pl.SH - pl.PH, ix0 = ox * pl.SW - pl.PW;
    T* out = tile + j * pl.ldt;
    int64_t c = 0;
    for (; c + U * W <= C; c += U * W) {
      R acc[U];
      LWK_UNROLL for (int u = 0; u < U; ++u) acc[u] = V::load(pl.dw_b + c + u * W);
      for (int64_t ky = kyl; ky < kyh; ++ky) {
        const T* xr = xn + ((iy0 + ky * pl.DH) * pl.W + ix0) * C + c;
        const T* wr = pl.dw_w + ky * pl.KW * C + c;
        for (int64_t kx = kxl; kx < kxh; ++kx) {
          const T* xp = xr + kx * pl.DW * C;
          const T* wp = wr + kx * C;
          LWK_UNROLL for (int u = 0; u < U; ++u) {
            acc[u] = V::fma(V::load(wp + u * W), V::load(xp + u * W), acc[u]);
          }
        }
      }
      LWK_UNROLL for (int u = 0; u < U; ++u) V::store(out + c + u * W, act_vec<V>(acc[u], act));
    }
    for (; c + W <= C; c += W) {
      R acc = V::load(pl.dw_b + c);
      for (int64_t ky = kyl; ky < kyh; ++ky) {
        const T* xr = xn + ((iy0 + ky * pl.DH) * pl.W + ix0) * C + c;
        const T* wr = pl.dw_w + ky * pl.KW * C + c;
        for (int64_t kx = kxl; kx < kxh; ++kx) {
          acc = V::fma(V::load(wr + kx * C), V::load(xr + kx * pl.DW * C), acc);
        }
      }
      V::store(out + c, act_vec<V>(acc, act));
    }
    for (; c < C; ++c) {
      T acc = pl.dw_b[c];
      for (int64_t ky = kyl; ky < kyh; ++ky) {
        const T* xr = xn + ((iy0 + ky * pl.DH) * pl.W + ix0) * C + c;
        const T* wr = pl.dw_w + ky * pl.KW * C + c;
        for (int64_t kx = kxl; kx < kxh; ++kx) acc += wr[kx * C] * xr[kx * pl.DW * C];
      }
      out[c] = act_scalar(acc, act);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Work items.

template <class V>
void run_items(const Plan<typename V::T>& pl, int64_t begin, int64_t end, void* scratch) {
  using T = typename V::T;
  constexpr int MR = V::MR, NR = V::NR, W = V::W;
  const bool nchw = pl.layout == Layout::kNCHW;
  KernelFn<T> kern[V::MR][V::NV];
  if (nchw) {
    fill_kernels<V, true, V::MR, V::NV>(kern);
  } else {
    fill_kernels<V, false, V::MR, V::NV>(kern);
  }
  T* tile = static_cast<T*>(scratch);
  const T* packed = pl.packed->data();
  const int64_t npix = pl.OH * pl.OW;
  const int64_t C = pl.C, CO = pl.CO;
  int64_t last = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t cob = item % pl.n_co;
    const int64_t nt = item / pl.n_co;
    const int64_t n = nt / pl.n_tiles;
    const int64_t p0 = (nt % pl.n_tiles) * pl.tile_px;
    const int64_t np = imin(pl.tile_px, npix - p0);
    if (nt != last) {  // consecutive items of one tile share its depthwise output
      if (nchw) {
        if (pl.SW == 1) {
          dw_tile_nchw<V, 1>(pl, n, p0, np, tile);
        } else if (pl.SW == 2) {
          dw_tile_nchw<V, 2>(pl, n, p0, np, tile);
        } else {
          dw_tile_nchw<V, 0>(pl, n, p0, np, tile);
        }
      } else {
        dw_tile_nhwc<V>(pl, n, p0, np, tile);
      }
      last = nt;
    }
    const int64_t co_a = cob * pl.co_chunk;
    const int64_t co_b = imin(CO, co_a + pl.co_chunk);
    if (nchw) {
      const int64_t off = n * CO * npix + p0;
      const Epi<T> e{pl.y + off, pl.residual ? pl.residual + off : nullptr, npix,
                     pl.pw_scale, pl.pw_shift, pl.out_act};
      for (int64_t co = co_a; co < co_b; co += MR) {
        const int rows = static_cast<int>(imin(MR, co_b - co));
        const T* A = packed + (co / MR) * C * MR;
        for (int64_t c0 = 0; c0 < np; c0 += NR) {
          const int cols = static_cast<int>(imin(NR, np - c0));
          kern[rows - 1][(cols + W - 1) / W - 1](C, A, tile + c0, pl.ldt, e, co, c0, cols);
        }
      }
    } else {
      const int64_t off = (n * npix + p0) * CO;
      const Epi<T> e{pl.y + off, pl.residual ? pl.residual + off : nullptr, CO,
                     pl.pw_scale, pl.pw_shift, pl.out_act};
      for (int64_t co = co_a; co < co_b; co += NR) {
        const int cols = static_cast<int>(imin(NR, co_b - co));
        const int nv = (cols + W - 1) / W;
        const T* B = packed + (co / NR) * C * NR;
        for (int64_t r0 = 0; r0 < np; r0 += MR) {
          const int rows = static_cast<int>(imin(MR, np - r0));
          kern[rows - 1][nv - 1](C, tile + r0 * pl.ldt, B, pl.ldt, e, r0, co, cols);
        }
      }
    }
  }
}

}  // namespace
}  // namespace detail
}  // namespace lwk
