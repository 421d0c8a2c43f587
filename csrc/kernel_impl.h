// The fused joint-block tile computation, written once over a small vector-traits struct V and
// instantiated in each ISA translation unit (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp,
// isa_neon.cpp) with that unit's compiler flags.
//
// V provides:
//   using T;            element type          using reg;    vector register type
//   W                   lanes per register    MR, NV        micro-kernel rows, column registers
//   NR = NV * W         micro-kernel columns
//   zero() set1(s) load(p) store(p, v) fma(a, b, c) = a*b + c, add(a, b)
//   keep_first(v, n)    v with lanes n .. W-1 set to zero (0 <= n <= W)
//   set_halves(a, b)    lanes [0, W/2) = a, [W/2, W) = b; only needed when W == 2 * MR
//   max_keep(lo, v) / min_keep(hi, v)     max/min that return v when v is NaN (activation.h)
//   load_s2(p)          {p[0], p[2], ..., p[2W-2]} without reading past p[2W-2]
//   add_f64(p, v)       p[l] += double(v[l]) for the W lanes (double* p)
//
// Per work item (image n, pixel tile, output-channel block), see run_items():
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
// Everything here is in an anonymous namespace on purpose: each ISA translation unit gets its own
// private copy compiled with its own flags, so the linker can never merge, say, an AVX2-compiled
// helper into the scalar path.
#pragma once

#include <cstdint>

#include "activation.h"
#include "compiler.h"
#include "internal.h"

namespace lwk {
namespace detail {
namespace {

LWK_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
LWK_INLINE int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
LWK_INLINE int64_t iceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
//
// With statistics, the stored values are also summed per output channel, in double like
// PyTorch's BatchNorm (batch statistics feed a subtraction, E[y^2] - E[y]^2, that would amplify
// float rounding): micro-kernels add the few values of a register's lanes in T, then add the
// lanes into the current panel's double partials part_sum/part_sq (NCHW: [MR][W], row i's lanes;
// NHWC: [NR], one per column), which run_items folds into the worker's per-channel sums
// ch_sum/ch_sq after each panel; the thin kernel adds into ch_sum/ch_sq directly.
template <typename T>
struct Epi {
  T* y;
  const T* res;  // null: no residual
  int64_t ldy;
  const T* scale;
  const T* shift;
  Activation act;
  double* part_sum = nullptr;  // null: no statistics
  double* part_sq = nullptr;
  double* ch_sum = nullptr;
  double* ch_sq = nullptr;
};

template <typename T>
LWK_INLINE void stats_add(double* sum, double* sq, T v) {
  const double d = double(v);
  *sum += d;
  *sq += d * d;
}

// The epilogue of one element: y[off] = act(acc * scale[ch] + shift[ch] + res[off]); returns it.
template <typename T>
LWK_INLINE T store_scalar(const Epi<T>& e, T acc, int64_t ch, int64_t off) {
  T v = acc * e.scale[ch] + e.shift[ch];
  if (e.res) v += e.res[off];
  v = activate(v, e.act);
  e.y[off] = v;
  return v;
}

template <class V>
LWK_INLINE void stats_add_vec(double* sum, double* sq, typename V::reg s, typename V::reg q) {
  V::add_f64(sum, s);
  V::add_f64(sq, q);
}

template <class V, int MR_, int NV_, bool kNCHW, Activation A, bool kStats>
LWK_INLINE void store_full(const typename V::reg (&acc)[MR_][NV_], const Epi<typename V::T>& e,
                           int64_t r0, int64_t c0) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  R sc_col[NV_], sh_col[NV_], s_col[NV_], q_col[NV_];
  if (!kNCHW) {
    LWK_UNROLL for (int j = 0; j < NV_; ++j) {
      sc_col[j] = V::load(e.scale + c0 + j * W);
      sh_col[j] = V::load(e.shift + c0 + j * W);
      s_col[j] = V::zero();
      q_col[j] = V::zero();
    }
  }
  LWK_UNROLL for (int i = 0; i < MR_; ++i) {
    const int64_t off = (r0 + i) * e.ldy + c0;
    T* yr = e.y + off;
    R sc_row = V::zero(), sh_row = V::zero(), s_row = V::zero(), q_row = V::zero();
    if (kNCHW) {
      sc_row = V::set1(e.scale[r0 + i]);
      sh_row = V::set1(e.shift[r0 + i]);
    }
    LWK_UNROLL for (int j = 0; j < NV_; ++j) {
      R v = V::fma(acc[i][j], kNCHW ? sc_row : sc_col[j], kNCHW ? sh_row : sh_col[j]);
      if (e.res) v = V::add(v, V::load(e.res + off + j * W));
      v = activate_vec<V, A>(v);
      V::store(yr + j * W, v);
      if (kStats && kNCHW) {
        s_row = V::add(s_row, v);
        q_row = V::fma(v, v, q_row);
      } else if (kStats) {
        s_col[j] = V::add(s_col[j], v);
        q_col[j] = V::fma(v, v, q_col[j]);
      }
    }
    if (kStats && kNCHW) stats_add_vec<V>(e.part_sum + i * W, e.part_sq + i * W, s_row, q_row);
  }
  if (kStats && !kNCHW) {
    LWK_UNROLL for (int j = 0; j < NV_; ++j) {
      stats_add_vec<V>(e.part_sum + j * W, e.part_sq + j * W, s_col[j], q_col[j]);
    }
  }
}

template <class V, int MR_, int NV_, bool kNCHW, Activation A>
LWK_INLINE void store_full_dispatch(const typename V::reg (&acc)[MR_][NV_],
                                    const Epi<typename V::T>& e, int64_t r0, int64_t c0) {
  if (e.part_sum) {
    store_full<V, MR_, NV_, kNCHW, A, true>(acc, e, r0, c0);
  } else {
    store_full<V, MR_, NV_, kNCHW, A, false>(acc, e, r0, c0);
  }
}

// The micro-kernel: acc[MR_ x NV_*W] = sum_k A(i, k) * B(k, j), then the epilogue for `cols` valid
// columns (rows are always all valid: callers pick MR_ = remaining rows).
// B is always a packed panel, B(k, j) = B[k * V::NR + j] (NHWC: pointwise weights; NCHW: a column
// block of the depthwise tile).
//   kNCHW: A is a packed pointwise panel, A(i, k) = A[k * V::MR + i] (ld unused).
//   NHWC:  A(i, k) = A[i * ld + k] (depthwise tile rows).
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
      B += V::NR;
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
        store_full_dispatch<V, MR_, NV_, kNCHW, Activation::kNone>(acc, e, r0, c0);
        break;
      case Activation::kRelu:
        store_full_dispatch<V, MR_, NV_, kNCHW, Activation::kRelu>(acc, e, r0, c0);
        break;
      case Activation::kRelu6:
        store_full_dispatch<V, MR_, NV_, kNCHW, Activation::kRelu6>(acc, e, r0, c0);
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
      const T v = store_scalar(e, tmp[i][c], ch, off);
      if (e.part_sum) {
        const int p = kNCHW ? i * W : c;
        stats_add(e.part_sum + p, e.part_sq + p, v);
      }
    }
  }
}

// NCHW thin micro-kernel for the last few pixel columns of a tile (7x7 images leave a single
// one, 14x14 four), where a full-width kernel would waste most of its lanes: the output channels
// run along vectors instead, y(i, j) = sum_k A_g[k*MR + i] * B[k*NR + j] for G consecutive packed
// panels A_g and TC consecutive columns j at once. Each load of A feeds TC FMAs and each
// broadcast of B feeds G*RV, and the G*RV*TC independent accumulator chains cover the FMA
// latency. run_items calls it for a group of panels right after their wide blocks, while those
// weights are still in cache: a separate pass per column would stream every weight again (from
// L3 for the largest late-network weights). Reads up to RV*W - MR elements
// past a panel row (the packed weights carry slack for that). `rows` is the valid row count of
// the last panel.
template <class V>
constexpr int thin_rv() {
  return (V::MR + V::W - 1) / V::W;
}

// 2 when a vector holds exactly two panel rows (AVX-512: 16 lanes, 8-row panels): then one load
// covers two k.
template <class V>
constexpr int thin_kpair() {
  return V::W == 2 * V::MR ? 2 : 1;
}

// Panels per thin call for TC columns: about eight accumulator chains.
template <class V, int TC>
constexpr int thin_group() {
  return (8 / TC) / thin_rv<V>() > 1 ? (8 / TC) / thin_rv<V>() : 1;
}

// Not inlined: inside run_items the compiler ran out of registers and spilled in the k loop.
template <class V, int G, int TC>
LWK_NOINLINE void ukernel_thin(int64_t K, const typename V::T* LWK_RESTRICT A, int64_t panel_stride,
                  const typename V::T* LWK_RESTRICT B, int64_t j, const Epi<typename V::T>& e,
                  int64_t r0, int64_t c0, int rows) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W, MR = V::MR, NR = V::NR;
  constexpr int RV = thin_rv<V>();
  constexpr int KP = thin_kpair<V>();
  R acc[G][RV][TC];
  LWK_UNROLL for (int g = 0; g < G; ++g) {
    LWK_UNROLL for (int v = 0; v < RV; ++v) {
      LWK_UNROLL for (int t = 0; t < TC; ++t) acc[g][v][t] = V::zero();
    }
  }
  int64_t k = 0;
  if constexpr (KP == 2) {
    // Lanes [0, MR) accumulate even k, lanes [MR, 2*MR) odd k: a vector load of A covers the
    // panel rows of k and k + 1, so no lane is idle.
    for (; k + 2 <= K; k += 2) {
      R b[TC];
      LWK_UNROLL for (int t = 0; t < TC; ++t) {
        b[t] = V::set_halves(B[k * NR + j + t], B[(k + 1) * NR + j + t]);
      }
      LWK_UNROLL for (int g = 0; g < G; ++g) {
        const R a = V::load(A + g * panel_stride + k * MR);
        LWK_UNROLL for (int t = 0; t < TC; ++t) acc[g][0][t] = V::fma(b[t], a, acc[g][0][t]);
      }
    }
    if (k < K) {  // odd K: the upper lanes (past the panel) must add exactly zero
      R b[TC];
      LWK_UNROLL for (int t = 0; t < TC; ++t) b[t] = V::set_halves(B[k * NR + j + t], T(0));
      LWK_UNROLL for (int g = 0; g < G; ++g) {
        const R a = V::keep_first(V::load(A + g * panel_stride + k * MR), MR);
        LWK_UNROLL for (int t = 0; t < TC; ++t) acc[g][0][t] = V::fma(b[t], a, acc[g][0][t]);
      }
    }
  } else {
    for (; k < K; ++k) {
      R b[TC];
      LWK_UNROLL for (int t = 0; t < TC; ++t) b[t] = V::set1(B[k * NR + j + t]);
      LWK_UNROLL for (int g = 0; g < G; ++g) {
        LWK_UNROLL for (int v = 0; v < RV; ++v) {
          const R a = V::load(A + g * panel_stride + k * MR + v * W);
          LWK_UNROLL for (int t = 0; t < TC; ++t) acc[g][v][t] = V::fma(b[t], a, acc[g][v][t]);
        }
      }
    }
  }
  alignas(64) T tmp[RV * W];
  for (int g = 0; g < G; ++g) {
    const int valid = g + 1 < G ? MR : rows;
    for (int t = 0; t < TC; ++t) {
      LWK_UNROLL for (int v = 0; v < RV; ++v) V::store(tmp + v * W, acc[g][v][t]);
      if constexpr (KP == 2) {
        for (int i = 0; i < MR; ++i) tmp[i] += tmp[i + MR];
      }
      for (int i = 0; i < valid; ++i) {
        const int64_t ch = r0 + g * MR + i;
        const int64_t off = ch * e.ldy + c0 + j + t;
        const T y = store_scalar(e, tmp[i], ch, off);
        if (e.ch_sum) stats_add(e.ch_sum + ch, e.ch_sq + ch, y);
      }
    }
  }
}

// Panels [0, n) of TC columns, the last panel with `rows` valid rows, 1 <= n <= G: one call.
template <class V, int G, int TC>
LWK_INLINE void thin_tail(int64_t n, int64_t K, const typename V::T* A, int64_t panel_stride,
                          const typename V::T* B, int64_t j, const Epi<typename V::T>& e,
                          int64_t r0, int64_t c0, int rows) {
  if constexpr (G > 1) {
    if (n < G) {
      thin_tail<V, G - 1, TC>(n, K, A, panel_stride, B, j, e, r0, c0, rows);
      return;
    }
  }
  ukernel_thin<V, G, TC>(K, A, panel_stride, B, j, e, r0, c0, rows);
}

// Columns j .. j+TC-1 of the column block B (whose first column is pixel c0) for output
// channels [co, co_end), co a panel boundary and at most thin_group<V, TC>() panels.
template <class V, int TC>
void thin_columns(int64_t K, const typename V::T* packed, const typename V::T* B, int64_t j,
                  const Epi<typename V::T>& e, int64_t co, int64_t co_end, int64_t c0) {
  constexpr int MR = V::MR;
  const int64_t panel_stride = K * MR;
  const int64_t panels = iceil_div(co_end - co, MR);
  const int rows = static_cast<int>(co_end - co - (panels - 1) * MR);
  thin_tail<V, thin_group<V, TC>(), TC>(panels, K, packed + (co / MR) * panel_stride,
                                        panel_stride, B, j, e, co, c0, rows);
}

// thin_group<V, tc>() for a run-time column count (1 when there are no thin columns), and
// thin_columns for columns 0 .. tc-1 of B, 1 <= tc <= 4.
template <class V>
int thin_group_of(int tc) {
  switch (tc) {
    case 1: return thin_group<V, 1>();
    case 2: return thin_group<V, 2>();
    case 3: return thin_group<V, 3>();
    case 4: return thin_group<V, 4>();
    default: return 1;
  }
}

template <class V>
void thin_dispatch(int tc, int64_t K, const typename V::T* packed, const typename V::T* B,
                   const Epi<typename V::T>& e, int64_t co, int64_t co_end, int64_t c0) {
  switch (tc) {
    case 1: thin_columns<V, 1>(K, packed, B, 0, e, co, co_end, c0); break;
    case 2: thin_columns<V, 2>(K, packed, B, 0, e, co, co_end, c0); break;
    case 3: thin_columns<V, 3>(K, packed, B, 0, e, co, co_end, c0); break;
    default: thin_columns<V, 4>(K, packed, B, 0, e, co, co_end, c0); break;
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
  const int64_t iy0 = oy * pl.stride_h - pl.pad_h;
  const int64_t a = imax(ox0, imin(ox1, pl.ox_in_lo));
  const int64_t b = imax(a, imin(ox1, pl.ox_in_hi));
  const int64_t S = pl.stride_w, KW = pl.KW, dil = pl.dil_w;
  int64_t ox = ox0;
  for (; ox < a; ++ox) {
    out[ox - ox0] = activate(dw_pixel_nchw(pl, xc, wc, bias, iy0, kyl, kyh, ox), act);
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
    LWK_UNROLL for (int u = 0; u < U; ++u) V::store(out + (ox - ox0) + u * W, activate_vec<V>(acc[u], act));
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
    V::store(out + (ox - ox0), activate_vec<V>(acc, act));
  }
  for (; ox < ox1; ++ox) {
    out[ox - ox0] = activate(dw_pixel_nchw(pl, xc, wc, bias, iy0, kyl, kyh, ox), act);
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
  const int64_t HW = pl.H * pl.W, taps = pl.KH * pl.KW;
  for (int64_t c = c_lo; c < c_hi; ++c) {
    const T* xc = pl.x + (n * pl.C + c) * HW;
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

template <class V, int kS>
void fill_plane(const Plan<typename V::T>& pl, const typename V::T* xc, int64_t iy_base,
                int64_t rows, typename V::T* plane) {
  using T = typename V::T;
  constexpr int W = V::W;
  const int64_t S = pl.stride_w, lp = pl.lp, Win = pl.W, P = pl.pad_w;
  const int64_t i_a = imax(0, -iy_base), i_b = imin(rows, pl.H - iy_base);
  for (int64_t i = i_a; i < i_b; ++i) {
    const T* src = xc + (iy_base + i) * Win;
    T* row = plane + i * S * lp;
    for (int64_t r = 0; r < S; ++r) {
      // Phase elements m in [ma, mb) are inside the image (0 <= m*S + r - P < Win).
      const int64_t ma = pl.phase_lo[r], mb = pl.phase_hi[r];
      const int64_t n = mb - ma;
      if (n <= 0) continue;
      T* d = row + pl.phase_off[r] + ma;
      const T* s0 = src + (ma * S + r - P);
      if (n >= W) {  // whole vectors, the last one overlapping: nothing outside [ma, mb) written
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
}

// N output vectors (N*W columns) of one output row: base points at the row's plane origin plus
// the first column; taps at base + off[t]. kTaps > 0: tap count known at compile time, weights
// preloaded in wv; kTaps == 0: any tap count, weights broadcast from wc.
template <class V, int N, int kTaps>
LWK_INLINE void dw_group_plane(const typename V::T* base, const int64_t* off, int64_t taps,
                               const typename V::reg* wv, const typename V::T* wc,
                               typename V::reg vb, Activation act, typename V::T* out) {
  using R = typename V::reg;
  constexpr int W = V::W;
  R acc[N];
  LWK_UNROLL for (int u = 0; u < N; ++u) acc[u] = vb;
  if constexpr (kTaps > 0) {
    (void)taps;
    (void)wc;
    LWK_UNROLL for (int t = 0; t < kTaps; ++t) {
      LWK_UNROLL for (int u = 0; u < N; ++u) {
        acc[u] = V::fma(wv[t], V::load(base + off[t] + u * W), acc[u]);
      }
    }
  } else {
    (void)wv;
    for (int64_t t = 0; t < taps; ++t) {
      const R w = V::set1(wc[t]);
      LWK_UNROLL for (int u = 0; u < N; ++u) {
        acc[u] = V::fma(w, V::load(base + off[t] + u * W), acc[u]);
      }
    }
  }
  LWK_UNROLL for (int u = 0; u < N; ++u) V::store(out + u * W, activate_vec<V>(acc[u], act));
}

// A tile's output-row segments: plane offset of the segment's first output (row origin plus
// first column), its offset in the tile's row buffer, and its length.
struct Segment {
  int64_t plane, out, len;
};

// One channel: the tile's depthwise outputs into row[0 .. np) (whole vectors, so up to W-1
// elements past a segment's end are written too; they belong to the next segment, written
// afterwards, or to the row's slack).
template <class V, int kTaps>
void dw_channel_plane(const Plan<typename V::T>& pl, const typename V::T* plane,
                      const Segment* segs, int64_t nsegs, const typename V::T* wc,
                      typename V::T bias, typename V::T* row) {
  using R = typename V::reg;
  constexpr int W = V::W;
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
  for (int64_t s = 0; s < nsegs; ++s) {
    const auto* base = plane + segs[s].plane;
    auto* out = row + segs[s].out;
    const int64_t len = segs[s].len;
    int64_t j = 0;
    for (; j + U * W <= len; j += U * W) {
      dw_group_plane<V, U, kTaps>(base + j, off, taps, wv, wc, vb, act, out + j);
    }
    switch (iceil_div(len - j, W)) {
      case 1:
        dw_group_plane<V, 1, kTaps>(base + j, off, taps, wv, wc, vb, act, out + j);
        break;
      case 2:
        dw_group_plane<V, 2, kTaps>(base + j, off, taps, wv, wc, vb, act, out + j);
        break;
      case 3:
        dw_group_plane<V, 3, kTaps>(base + j, off, taps, wv, wc, vb, act, out + j);
        break;
      case 4:
        dw_group_plane<V, 4, kTaps>(base + j, off, taps, wv, wc, vb, act, out + j);
        break;
      default:  // nothing left
        break;
    }
  }
}

template <class V, int kS>
void dw_tile_nchw_plane(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                        int64_t c_lo, int64_t c_hi, typename V::T* tile, typename V::T* row,
                        typename V::T* plane, Segment* segs) {
  using T = typename V::T;
  const int64_t HW = pl.H * pl.W, taps = pl.KH * pl.KW;
  const int64_t oy_a = p0 / pl.OW, oy_b = (p0 + np - 1) / pl.OW;
  const int64_t iy_base = oy_a * pl.stride_h - pl.pad_h;
  const int64_t rows = (oy_b - oy_a) * pl.stride_h + (pl.KH - 1) * pl.dil_h + 1;
  const int64_t rowsz = pl.stride_w * pl.lp;
  int64_t nsegs = 0;
  for (int64_t p = p0, pend = p0 + np; p < pend;) {
    const int64_t oy = p / pl.OW, ox0 = p - oy * pl.OW;
    const int64_t len = imin(pl.OW - ox0, pend - p);
    segs[nsegs++] = Segment{(oy * pl.stride_h - pl.pad_h - iy_base) * rowsz + ox0, p - p0, len};
    p += len;
  }
  const bool k3 = taps == 9;
  // Software pipeline over channels: fill the plane of c+1, compute c, scatter c-1, with two
  // planes and two rows, so every load reads data stored one channel earlier.
  const T* const xn = pl.x + n * pl.C * HW;
  const int64_t plane_elems = rows * pl.stride_w * pl.lp;
  zero_plane<V>(plane, plane_elems);
  zero_plane<V>(plane + pl.plane_stride, plane_elems);
  fill_plane<V, kS>(pl, xn + c_lo * HW, iy_base, rows, plane + (c_lo & 1) * pl.plane_stride);
  for (int64_t c = c_lo; c < c_hi; ++c) {
    T* const cur_plane = plane + (c & 1) * pl.plane_stride;
    T* const cur_row = row + (c & 1) * pl.row_stride;
    if (c + 1 < c_hi) {
      fill_plane<V, kS>(pl, xn + (c + 1) * HW, iy_base, rows,
                        plane + ((c + 1) & 1) * pl.plane_stride);
    }
    const T* wc = pl.dw_w + c * taps;
    if (k3) {
      dw_channel_plane<V, 9>(pl, cur_plane, segs, nsegs, wc, pl.dw_b[c], cur_row);
    } else {
      dw_channel_plane<V, 0>(pl, cur_plane, segs, nsegs, wc, pl.dw_b[c], cur_row);
    }
    if (c > c_lo) scatter_row<V>(row + ((c - 1) & 1) * pl.row_stride, np, pl.C, c - 1, tile);
  }
  scatter_row<V>(row + ((c_hi - 1) & 1) * pl.row_stride, np, pl.C, c_hi - 1, tile);
}

// ----------------------------------------------------------------------------------------------
// Depthwise, NHWC: tile[j * ldt + c] for the tile's pixels j, vectorised along channels with the
// folded weights stored tap-major ([KH*KW][C]). Each pixel's valid taps come from the tables, so
// the loops carry no bounds checks.

// NP_ horizontally adjacent output pixels whose 9 taps (3x3) are all inside the image: tap t of
// pixel p reads base + p*pstep + off[t]. Sharing each weight load between the pixels keeps the
// loop closer to one load per FMA.
template <class V, int NP_>
LWK_INLINE void dw_nhwc_inside9(const typename V::T* base, int64_t pstep, const int64_t* off,
                                const Plan<typename V::T>& pl, int64_t c_lo, int64_t c_hi,
                                typename V::T* out, int64_t ldt) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  constexpr int U = 4;
  const int64_t C = pl.C;
  const T* w = pl.dw_w;
  const Activation act = pl.mid_act;
  int64_t c = c_lo;
  for (; c + U * W <= c_hi; c += U * W) {
    R acc[NP_][U];
    LWK_UNROLL for (int u = 0; u < U; ++u) {
      const R b = V::load(pl.dw_b + c + u * W);
      LWK_UNROLL for (int q = 0; q < NP_; ++q) acc[q][u] = b;
    }
    LWK_UNROLL for (int t = 0; t < 9; ++t) {
      const T* xp = base + off[t] + c;
      const T* wp = w + t * C + c;
      LWK_UNROLL for (int u = 0; u < U; ++u) {
        const R wv = V::load(wp + u * W);
        LWK_UNROLL for (int q = 0; q < NP_; ++q) {
          acc[q][u] = V::fma(wv, V::load(xp + q * pstep + u * W), acc[q][u]);
        }
      }
    }
    LWK_UNROLL for (int q = 0; q < NP_; ++q) {
      LWK_UNROLL for (int u = 0; u < U; ++u) {
        V::store(out + q * ldt + c + u * W, activate_vec<V>(acc[q][u], act));
      }
    }
  }
  for (; c + W <= c_hi; c += W) {
    R acc[NP_];
    LWK_UNROLL for (int q = 0; q < NP_; ++q) acc[q] = V::load(pl.dw_b + c);
    LWK_UNROLL for (int t = 0; t < 9; ++t) {
      const R wv = V::load(w + t * C + c);
      LWK_UNROLL for (int q = 0; q < NP_; ++q) {
        acc[q] = V::fma(wv, V::load(base + q * pstep + off[t] + c), acc[q]);
      }
    }
    LWK_UNROLL for (int q = 0; q < NP_; ++q) V::store(out + q * ldt + c, activate_vec<V>(acc[q], act));
  }
  for (; c < c_hi; ++c) {
    LWK_UNROLL for (int q = 0; q < NP_; ++q) {
      T acc = pl.dw_b[c];
      for (int t = 0; t < 9; ++t) acc += w[t * C + c] * base[q * pstep + off[t] + c];
      out[q * ldt + c] = activate(acc, act);
    }
  }
}

// Any pixel: valid taps from the border tables.
template <class V>
void dw_nhwc_pixel(const Plan<typename V::T>& pl, const typename V::T* xn, int64_t oy,
                   int64_t ox, int64_t c_lo, int64_t c_hi, typename V::T* out) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  constexpr int U = 4;
  const int64_t C = pl.C;
  const Activation act = pl.mid_act;
  const int64_t kyl = pl.ky_lo[oy], kyh = pl.ky_hi[oy];
  const int64_t kxl = pl.kx_lo[ox], kxh = pl.kx_hi[ox];
  const int64_t iy0 = oy * pl.stride_h - pl.pad_h, ix0 = ox * pl.stride_w - pl.pad_w;
  int64_t c = c_lo;
  for (; c + U * W <= c_hi; c += U * W) {
    R acc[U];
    LWK_UNROLL for (int u = 0; u < U; ++u) acc[u] = V::load(pl.dw_b + c + u * W);
    for (int64_t ky = kyl; ky < kyh; ++ky) {
      const T* xr = xn + ((iy0 + ky * pl.dil_h) * pl.W + ix0) * C + c;
      const T* wr = pl.dw_w + ky * pl.KW * C + c;
      for (int64_t kx = kxl; kx < kxh; ++kx) {
        const T* xp = xr + kx * pl.dil_w * C;
        const T* wp = wr + kx * C;
        LWK_UNROLL for (int u = 0; u < U; ++u) {
          acc[u] = V::fma(V::load(wp + u * W), V::load(xp + u * W), acc[u]);
        }
      }
    }
    LWK_UNROLL for (int u = 0; u < U; ++u) V::store(out + c + u * W, activate_vec<V>(acc[u], act));
  }
  for (; c + W <= c_hi; c += W) {
    R acc = V::load(pl.dw_b + c);
    for (int64_t ky = kyl; ky < kyh; ++ky) {
      const T* xr = xn + ((iy0 + ky * pl.dil_h) * pl.W + ix0) * C + c;
      const T* wr = pl.dw_w + ky * pl.KW * C + c;
      for (int64_t kx = kxl; kx < kxh; ++kx) {
        acc = V::fma(V::load(wr + kx * C), V::load(xr + kx * pl.dil_w * C), acc);
      }
    }
    V::store(out + c, activate_vec<V>(acc, act));
  }
  for (; c < c_hi; ++c) {
    T acc = pl.dw_b[c];
    for (int64_t ky = kyl; ky < kyh; ++ky) {
      const T* xr = xn + ((iy0 + ky * pl.dil_h) * pl.W + ix0) * C + c;
      const T* wr = pl.dw_w + ky * pl.KW * C + c;
      for (int64_t kx = kxl; kx < kxh; ++kx) acc += wr[kx * C] * xr[kx * pl.dil_w * C];
    }
    out[c] = activate(acc, act);
  }
}

template <class V>
void dw_tile_nhwc(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                  int64_t c_lo, int64_t c_hi, typename V::T* tile) {
  using T = typename V::T;
  const int64_t C = pl.C;
  const T* xn = pl.x + n * pl.H * pl.W * C;
  const bool k3 = pl.KH == 3 && pl.KW == 3;
  int64_t off[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
  if (k3) {
    for (int t = 0; t < 9; ++t) off[t] = ((t / 3) * pl.dil_h * pl.W + (t % 3) * pl.dil_w) * C;
  }
  const int64_t pstep = pl.stride_w * C;
  int64_t oy = p0 / pl.OW, ox = p0 - oy * pl.OW;  // advanced incrementally (no division per pixel)
  for (int64_t j = 0; j < np;) {
    if (ox == pl.OW) {
      ox = 0;
      ++oy;
    }
    T* out = tile + j * pl.ldt;
    const bool rows_inside = pl.ky_hi[oy] - pl.ky_lo[oy] == 3;
    if (k3 && rows_inside && ox >= pl.ox_in_lo && ox < pl.ox_in_hi) {
      const T* base = xn + ((oy * pl.stride_h - pl.pad_h) * pl.W + ox * pl.stride_w - pl.pad_w) * C;
      if (ox + 1 < pl.ox_in_hi && j + 1 < np) {
        dw_nhwc_inside9<V, 2>(base, pstep, off, pl, c_lo, c_hi, out, pl.ldt);
        j += 2;
        ox += 2;
        continue;
      }
      dw_nhwc_inside9<V, 1>(base, pstep, off, pl, c_lo, c_hi, out, pl.ldt);
    } else {
      dw_nhwc_pixel<V>(pl, xn, oy, ox, c_lo, c_hi, out);
    }
    ++j;
    ++ox;
  }
}

// ----------------------------------------------------------------------------------------------
// Work items.

// Depthwise output of channels [c_lo, c_hi) of the tile p0 .. p0+np-1 of image n into `tile`;
// `scratch` is the worker's (its row, plane and segment buffers).
template <class V>
void depthwise_tile(const Plan<typename V::T>& pl, int64_t n, int64_t p0, int64_t np,
                    int64_t c_lo, int64_t c_hi, typename V::T* tile, void* scratch) {
  using T = typename V::T;
  if (pl.layout == Layout::kNHWC) {
    dw_tile_nhwc<V>(pl, n, p0, np, c_lo, c_hi, tile);
    return;
  }
  T* row = reinterpret_cast<T*>(static_cast<char*>(scratch) + pl.row_offset);
  if (pl.use_plane) {
    T* plane = reinterpret_cast<T*>(static_cast<char*>(scratch) + pl.plane_offset);
    Segment* segs = reinterpret_cast<Segment*>(static_cast<char*>(scratch) + pl.seg_offset);
    if (pl.stride_w == 1) {
      dw_tile_nchw_plane<V, 1>(pl, n, p0, np, c_lo, c_hi, tile, row, plane, segs);
    } else if (pl.stride_w == 2) {
      dw_tile_nchw_plane<V, 2>(pl, n, p0, np, c_lo, c_hi, tile, row, plane, segs);
    } else {
      dw_tile_nchw_plane<V, 0>(pl, n, p0, np, c_lo, c_hi, tile, row, plane, segs);
    }
  } else if (pl.stride_w == 1) {
    dw_tile_nchw<V, 1>(pl, n, p0, np, c_lo, c_hi, tile, row);
  } else if (pl.stride_w == 2) {
    dw_tile_nchw<V, 2>(pl, n, p0, np, c_lo, c_hi, tile, row);
  } else {
    dw_tile_nchw<V, 0>(pl, n, p0, np, c_lo, c_hi, tile, row);
  }
}

// Shared-depthwise mode, first phase: depthwise items [begin, end), item = (n * n_tiles + tile)
// * n_dw_chunks + chunk, each a range of dw_chunk input channels of one tile, into the shared
// tile of that (image, tile).
template <class V>
void run_depthwise(const Plan<typename V::T>& pl, int64_t begin, int64_t end, void* scratch) {
  const int64_t npix = pl.OH * pl.OW;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t chunk = item % pl.n_dw_chunks;
    const int64_t nt = item / pl.n_dw_chunks;
    const int64_t p0 = (nt % pl.n_tiles) * pl.tile_px;
    const int64_t c_lo = chunk * pl.dw_chunk;
    depthwise_tile<V>(pl, nt / pl.n_tiles, p0, imin(pl.tile_px, npix - p0), c_lo,
               imin(pl.C, c_lo + pl.dw_chunk), pl.shared_dw + nt * pl.tile_elems, scratch);
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
      depthwise_tile<V>(pl, n, p0, np, 0, C, own_tile, scratch);
      last = nt;
    }
    const int64_t co_a = cob * pl.co_chunk;
    const int64_t co_b = imin(CO, co_a + pl.co_chunk);
    if (nchw) {
      const int64_t off = n * CO * npix + p0;
      const Epi<T> e{pl.y + off, pl.residual ? pl.residual + off : nullptr, npix,
                     pl.pw_scale, pl.pw_shift, pl.out_act,
                     ch_sum ? part_sum : nullptr, ch_sum ? part_sq : nullptr, ch_sum, ch_sq};
      // A last column block of at most kThinCols pixels goes to the thin kernel, for each group
      // of panels right after their wide blocks.
      const int64_t last_cols = np - (np - 1) / NR * NR;
      const int64_t wide_np = last_cols <= kThinCols ? np - last_cols : np;
      const int tc = static_cast<int>(np - wide_np);
      const T* B_thin = tile + (wide_np / NR) * C * NR;
      const int64_t group = MR * thin_group_of<V>(tc);
      for (int64_t cg = co_a; cg < co_b; cg += group) {
        const int64_t cg_end = imin(co_b, cg + group);
        for (int64_t co = cg; co < cg_end; co += MR) {
          const int rows = static_cast<int>(imin(MR, co_b - co));
          const T* A = packed + (co / MR) * C * MR;
          if (ch_sum) panel_begin();
          for (int64_t c0 = 0; c0 < wide_np; c0 += NR) {
            const int cols = static_cast<int>(imin(NR, wide_np - c0));
            const T* B = tile + (c0 / NR) * C * NR;
            kern[rows - 1][(cols + W - 1) / W - 1](C, A, B, 0, e, co, c0, cols);
          }
          if (ch_sum) panel_end(co, rows, W);
        }
        if (tc > 0) thin_dispatch<V>(tc, C, packed, B_thin, e, cg, cg_end, wide_np);
      }
    } else {
      const int64_t off = (n * npix + p0) * CO;
      const Epi<T> e{pl.y + off, pl.residual ? pl.residual + off : nullptr, CO,
                     pl.pw_scale, pl.pw_shift, pl.out_act,
                     ch_sum ? part_sum : nullptr, ch_sum ? part_sq : nullptr, ch_sum, ch_sq};
      for (int64_t co = co_a; co < co_b; co += NR) {
        const int cols = static_cast<int>(imin(NR, co_b - co));
        const int nv = (cols + W - 1) / W;
        const T* B = packed + (co / NR) * C * NR;
        if (ch_sum) panel_begin();
        for (int64_t r0 = 0; r0 < np; r0 += MR) {
          const int rows = static_cast<int>(imin(MR, np - r0));
          kern[rows - 1][nv - 1](C, tile + r0 * pl.ldt, B, pl.ldt, e, r0, co, cols);
        }
        if (ch_sum) panel_end(co, cols, 1);
      }
    }
  }
  *dw_tile = last;
}

// The entry points of the path whose vector traits are V (one table per ISA translation unit).
template <class V>
const IsaOps<typename V::T>* isa_ops(Isa isa) {
  static const IsaOps<typename V::T> ops{isa, V::MR, V::NR, V::W, &run_items<V>, &run_depthwise<V>};
  return &ops;
}

}  // namespace
}  // namespace detail
}  // namespace lwk
