// The pointwise side of a work item: register-blocked GEMM micro-kernels that multiply the
// depthwise tile with the packed pointwise panels (ukernel; for the last few NCHW pixel columns
// ukernel_nchw_plus_one or ukernel_thin), and their fused epilogue (scale, shift, residual, output
// activation and the optional per-channel statistics of y) while storing y.
//
// In an anonymous namespace like every kernel header: each ISA translation unit compiles its own
// copy with its own flags (kernel_work_items.h says why).
#pragma once

#include <algorithm>
#include <cstdint>

#include "activation.h"
#include "compiler.h"
#include "joint_block.h"
#include "kernel_common.h"

namespace lwk {
namespace detail {
namespace {

// The NHWC micro-kernels stream a packed weight panel (K x NR) once per block of MR pixels; the
// first block of a panel finds it in L3 when the weights are larger than L2 (the late blocks of
// a model at batch 1, where a panel serves only 49 or 196 pixels), and at NR values per k step
// it outruns the hardware prefetchers. So each call also asks for `lines` cache lines from `next`
// on (a share of the next panel, or of the next row block's output: nhwc_rows_first), one per k
// step. Empty: nothing to ask for.
struct PanelPrefetch {
  const char* next = nullptr;
  int64_t lines = 0;
};

// The share of the panel after `panel` (both panel_bytes long; the caller knows there is one)
// that the call for row block `block` of `blocks` asks for: the next panel in equal parts, so
// that it is on its way before the first block that reads it.
inline PanelPrefetch next_panel_share(const void* panel, int64_t panel_bytes, int64_t block,
                                      int64_t blocks) {
  const int64_t lines = (panel_bytes + 63) / 64;
  const int64_t per_block = (lines + blocks - 1) / blocks;
  const int64_t first = block * per_block;
  PanelPrefetch pf;
  if (first >= lines) return pf;
  pf.next = static_cast<const char*>(panel) + panel_bytes + first * 64;
  pf.lines = std::min(per_block, lines - first);
  return pf;
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

// The epilogue of one element: y[off] = act(acc * scale[ch] + shift[ch] + res[off]) for a
// clamping activation (activation.h); returns it. Its callers leave hardswish and silu to
// store_then_activate and activate_stored, so their loops stay free of calls (and vectorised).
template <typename T>
LWK_INLINE T store_scalar(const Epi<T>& e, T acc, int64_t ch, int64_t off) {
  T v = acc * e.scale[ch] + e.shift[ch];
  if (e.res) v += e.res[off];
  v = activate_clamping(v, e.act);
  e.y[off] = v;
  return v;
}

// e itself for a clamping activation; for hardswish and silu, e without the activation and the
// statistics, which activate_stored then adds.
template <typename T>
LWK_INLINE Epi<T> clamping_part(const Epi<T>& e) {
  Epi<T> c = e;
  if (!is_clamping(e.act)) {
    c.act = Activation::kNone;
    c.part_sum = c.part_sq = c.ch_sum = c.ch_sq = nullptr;
  }
  return c;
}

// hardswish or silu (e.act) of elements an element-wise epilogue stored without it:
// y[(r0 + i) * ldy + c] for i in [0, rows), c in [c0, c1), in place; with sum/sq, element (i, c)'s
// activated value also goes into sum[i * si + (c - c0) * sc] (and its square into sq).
template <typename T>
LWK_NOINLINE void activate_stored(const Epi<T>& e, int64_t r0, int64_t rows, int64_t c0,
                                  int64_t c1, double* sum, double* sq, int64_t si, int64_t sc) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = c0; c < c1; ++c) {
      T* y = e.y + (r0 + i) * e.ldy + c;
      *y = activate(*y, e.act);
      if (sum) stats_add(sum + i * si + (c - c0) * sc, sq + i * si + (c - c0) * sc, *y);
    }
  }
}

template <class V>
LWK_INLINE void stats_add_vec(double* sum, double* sq, typename V::reg s, typename V::reg q) {
  V::add_f64(sum, s);
  V::add_f64(sq, q);
}

// The epilogue of a micro-tile by vectors. kPartial: only `cols` < NV_ * W columns are valid; the
// vector that straddles that edge is loaded and stored masked (load_first/store_first) and those
// past it are skipped, so a tile whose width is not a whole number of micro-kernel columns (24 or 40
// output channels, a 7-pixel row) keeps the vector epilogue instead of going element by element.
template <class V, int MR_, int NV_, bool kNCHW, Activation A, bool kStats, bool kPartial>
LWK_INLINE void store_tile(const typename V::reg (&acc)[MR_][NV_], const Epi<typename V::T>& e,
                           int64_t r0, int64_t c0, int cols) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  // Valid lanes of column vector j (<= 0: none).
  auto lanes = [cols](int j) { return kPartial ? cols - j * W : W; };
  auto load = [](const T* p, int n) { return n >= W ? V::load(p) : V::load_first(p, n); };
  R sc_col[NV_], sh_col[NV_], s_col[NV_], q_col[NV_];
  LWK_UNROLL for (int j = 0; j < NV_; ++j) sc_col[j] = sh_col[j] = s_col[j] = q_col[j] = V::zero();
  if (!kNCHW) {
    LWK_UNROLL for (int j = 0; j < NV_; ++j) {
      if (lanes(j) <= 0) continue;
      sc_col[j] = load(e.scale + c0 + j * W, lanes(j));
      sh_col[j] = load(e.shift + c0 + j * W, lanes(j));
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
      const int n = lanes(j);
      if (n <= 0) continue;
      R v = V::fma(acc[i][j], kNCHW ? sc_row : sc_col[j], kNCHW ? sh_row : sh_col[j]);
      if (e.res) v = V::add(v, load(e.res + off + j * W, n));
      v = activate_vec<V, A>(v);
      if (n >= W) {
        V::store(yr + j * W, v);
      } else {
        V::store_first(yr + j * W, v, n);
        v = V::keep_first(v, n);  // the statistics add only valid lanes
      }
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
      if (lanes(j) <= 0) continue;
      stats_add_vec<V>(e.part_sum + j * W, e.part_sq + j * W, s_col[j], q_col[j]);
    }
  }
}

// A whole tile (kPartial false) or `cols` valid columns of it, for a clamping activation.
template <class V, int MR_, int NV_, bool kNCHW, bool kPartial>
LWK_INLINE void store_clamping(const typename V::reg (&acc)[MR_][NV_], const Epi<typename V::T>& e,
                               int64_t r0, int64_t c0, int cols) {
  const bool stats = e.part_sum != nullptr;
  switch (e.act) {
    case Activation::kNone:
      stats ? store_tile<V, MR_, NV_, kNCHW, Activation::kNone, true, kPartial>(acc, e, r0, c0, cols)
            : store_tile<V, MR_, NV_, kNCHW, Activation::kNone, false, kPartial>(acc, e, r0, c0, cols);
      break;
    case Activation::kRelu:
      stats ? store_tile<V, MR_, NV_, kNCHW, Activation::kRelu, true, kPartial>(acc, e, r0, c0, cols)
            : store_tile<V, MR_, NV_, kNCHW, Activation::kRelu, false, kPartial>(acc, e, r0, c0, cols);
      break;
    case Activation::kRelu6:
      stats ? store_tile<V, MR_, NV_, kNCHW, Activation::kRelu6, true, kPartial>(acc, e, r0, c0, cols)
            : store_tile<V, MR_, NV_, kNCHW, Activation::kRelu6, false, kPartial>(acc, e, r0, c0, cols);
      break;
    default:  // hardswish and silu go to store_then_activate
      break;
  }
}

// hardswish and silu share this one out-of-line epilogue per micro-kernel shape instead of an
// inline instance each (build time; the clamping activations' epilogues stay as they were). The
// accumulators come spilled to `spilled` ([MR_][NV_ * W]): passing the register array by reference
// would let its address escape the micro-kernel and keep it out of registers. A full tile stores
// y = acc * scale + shift (+ residual) by vectors, then activates it in place (still in L1) and
// adds the statistics of the activated values; a partial one goes element by element.
template <class V, int MR_, int NV_, bool kNCHW>
LWK_NOINLINE void store_then_activate(const typename V::T* spilled, const Epi<typename V::T>& e,
                                      int64_t r0, int64_t c0, int cols) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  if (cols < NV_ * W) {
    for (int i = 0; i < MR_; ++i) {
      for (int c = 0; c < cols; ++c) {
        const int64_t ch = kNCHW ? r0 + i : c0 + c;
        const int64_t off = (r0 + i) * e.ldy + c0 + c;
        T v = spilled[i * NV_ * W + c] * e.scale[ch] + e.shift[ch];
        if (e.res) v += e.res[off];
        v = activate(v, e.act);
        e.y[off] = v;
        if (e.part_sum) {
          const int p = kNCHW ? i * W : c;
          stats_add(e.part_sum + p, e.part_sq + p, v);
        }
      }
    }
    return;
  }
  R acc[MR_][NV_];
  for (int i = 0; i < MR_; ++i) {
    for (int j = 0; j < NV_; ++j) acc[i][j] = V::load(spilled + (i * NV_ + j) * W);
  }
  store_tile<V, MR_, NV_, kNCHW, Activation::kNone, false, false>(acc, e, r0, c0, NV_ * W);
  R s_col[NV_], q_col[NV_];
  for (int j = 0; j < NV_; ++j) s_col[j] = q_col[j] = V::zero();
  for (int i = 0; i < MR_; ++i) {
    T* yr = e.y + (r0 + i) * e.ldy + c0;
    activate_array<V>(yr, NV_ * W, e.act);
    if (!e.part_sum) continue;
    R s_row = V::zero(), q_row = V::zero();
    for (int j = 0; j < NV_; ++j) {
      const R v = V::load(yr + j * W);
      if (kNCHW) {
        s_row = V::add(s_row, v);
        q_row = V::fma(v, v, q_row);
      } else {
        s_col[j] = V::add(s_col[j], v);
        q_col[j] = V::fma(v, v, q_col[j]);
      }
    }
    if (kNCHW) stats_add_vec<V>(e.part_sum + i * W, e.part_sq + i * W, s_row, q_row);
  }
  if (e.part_sum && !kNCHW) {
    for (int j = 0; j < NV_; ++j) {
      stats_add_vec<V>(e.part_sum + j * W, e.part_sq + j * W, s_col[j], q_col[j]);
    }
  }
}

// One k step of the NCHW micro-kernel: acc[i][j] += A(i, k) * B(k, j) for A = the packed panel's
// row k (MR_ values) and B = the column block's row k (NV_ vectors). Shared by ukernel and
// ukernel_nchw_plus_one, whose wide sums must match bit for bit.
template <class V, int MR_, int NV_>
LWK_INLINE void nchw_k_step(typename V::reg (&acc)[MR_][NV_], const typename V::T* LWK_RESTRICT A,
                            const typename V::T* LWK_RESTRICT B) {
  using R = typename V::reg;
  R b[NV_];
  LWK_UNROLL for (int j = 0; j < NV_; ++j) b[j] = V::load(B + j * V::W);
  LWK_UNROLL for (int i = 0; i < MR_; ++i) {
    const R a = V::set1(A[i]);
    LWK_UNROLL for (int j = 0; j < NV_; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
  }
}

// The micro-kernel: acc[MR_ x NV_*W] = sum_k A(i, k) * B(k, j), then the epilogue for `cols` valid
// columns (rows are always all valid: callers pick MR_ = remaining rows).
// B is always a packed panel, B(k, j) = B[k * V::NR + j] (NHWC: pointwise weights; NCHW: a column
// block of the depthwise tile).
//   kNCHW: A is a packed pointwise panel, A(i, k) = A[k * V::MR + i] (ld unused).
//   NHWC:  A(i, k) = A[i * ld + k] (depthwise tile rows).
//
// NHWC only: `pf` asks for cache lines the caller will touch next (see PanelPrefetch), one per k
// step, while the FMAs run.
template <class V, int MR_, int NV_, bool kNCHW>
void ukernel(int64_t K, const typename V::T* LWK_RESTRICT A, const typename V::T* LWK_RESTRICT B,
             int64_t ld, const Epi<typename V::T>& e, int64_t r0, int64_t c0, int cols,
             PanelPrefetch pf) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  R acc[MR_][NV_];
  LWK_UNROLL for (int i = 0; i < MR_; ++i) {
    LWK_UNROLL for (int j = 0; j < NV_; ++j) acc[i][j] = V::zero();
  }
  if (kNCHW) {
    (void)pf;  // (no gain measured: a weight panel streams 8 values per k step, which the
               // hardware prefetchers keep up with)
    for (int64_t k = 0; k < K; ++k) {
      nchw_k_step<V, MR_, NV_>(acc, A, B);
      A += V::MR;
      B += V::NR;
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      if (k < pf.lines) LWK_PREFETCH(pf.next + k * 64);
      R b[NV_];
      LWK_UNROLL for (int j = 0; j < NV_; ++j) b[j] = V::load(B + j * W);
      LWK_UNROLL for (int i = 0; i < MR_; ++i) {
        const R a = V::set1(A[i * ld + k]);
        LWK_UNROLL for (int j = 0; j < NV_; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
      }
      B += V::NR;
    }
  }

  if (!is_clamping(e.act)) {  // hardswish, silu
    alignas(64) T spilled[MR_ * NV_ * W];
    LWK_UNROLL for (int i = 0; i < MR_; ++i) {
      LWK_UNROLL for (int j = 0; j < NV_; ++j) V::store(spilled + (i * NV_ + j) * W, acc[i][j]);
    }
    store_then_activate<V, MR_, NV_, kNCHW>(spilled, e, r0, c0, cols);
    return;
  }
  if (cols == NV_ * W) {
    store_clamping<V, MR_, NV_, kNCHW, false>(acc, e, r0, c0, cols);
  } else {
    store_clamping<V, MR_, NV_, kNCHW, true>(acc, e, r0, c0, cols);
  }
}

// NCHW thin micro-kernel for the last few pixel columns of a tile (7x7 images leave a single
// one, 14x14 four; where it can, AVX-512 fp32 takes them in ukernel_nchw_plus_one instead), where
// a full-width kernel would waste most of its lanes: the output channels run along vectors
// instead, y(i, j) = sum_k A_g[k*MR + i] * B[k*NR + j] for G consecutive packed
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

// Whether ukernel_nchw_plus_one exists for V: where a vector holds two panel rows (AVX-512 fp32,
// whose 32 registers leave room for its extra accumulator and operands).
template <class V>
constexpr bool has_nchw_plus_one() {
  return V::W == 2 * V::MR;
}

// NCHW: a full panel times a full column block B (ukernel<V, MR, NV, true>'s sums) plus one of
// the tile's last few pixel columns, column Bt[k * NR] of the last column block (pixel ct): the
// single pixel a 7x7 image leaves after 48, or one of the four a 14x14 image leaves after four
// blocks. Here a column costs one FMA per two k steps on panel values just loaded into L1, where
// ukernel_thin, afterwards, streams the panels again from L2 (6% of a 1024 -> 1024 block at 7x7,
// batch 1, for 2% of its FMAs). Both parts' sums run in the same order as in ukernel and
// ukernel_thin (the extra column: even k in lanes [0, MR), odd k in [MR, 2 MR)), so the results
// are theirs, bit for bit. Clamping activations and no statistics (the caller checks).
template <class V>
LWK_NOINLINE void ukernel_nchw_plus_one(int64_t K, const typename V::T* LWK_RESTRICT A,
                                        const typename V::T* LWK_RESTRICT B,
                                        const typename V::T* LWK_RESTRICT Bt,
                                        const Epi<typename V::T>& e, int64_t r0, int64_t c0,
                                        int64_t ct) {
  static_assert(has_nchw_plus_one<V>(), "needs two panel rows per vector");
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W, MR = V::MR, NV = V::NV, NR = V::NR;
  R acc[MR][NV];
  LWK_UNROLL for (int i = 0; i < MR; ++i) {
    LWK_UNROLL for (int j = 0; j < NV; ++j) acc[i][j] = V::zero();
  }
  R extra = V::zero();
  auto step = [&](int64_t k) { nchw_k_step<V, MR, NV>(acc, A + k * MR, B + k * NR); };
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    extra = V::fma(V::set_halves(Bt[k * NR], Bt[(k + 1) * NR]), V::load(A + k * MR), extra);
    step(k);
    step(k + 1);
  }
  if (k < K) {  // odd K: the upper lanes (past the panel) must add exactly zero
    extra = V::fma(V::set_halves(Bt[k * NR], T(0)), V::keep_first(V::load(A + k * MR), MR), extra);
    step(k);
  }
  store_clamping<V, MR, NV, true, false>(acc, e, r0, c0, NR);
  alignas(64) T tmp[W];
  V::store(tmp, extra);
  for (int i = 0; i < MR; ++i) {
    const int64_t ch = r0 + i;
    store_scalar(e, tmp[i] + tmp[i + MR], ch, ch * e.ldy + ct);
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
                          int, PanelPrefetch);

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

}  // namespace
}  // namespace detail
}  // namespace lwk
