// The dense convolution's rows (dense_conv.h) for one instruction set: work item = one output row
// (image, oy). The C_in * kh input rows it needs are copied, zero-padded, into the worker's
// scratch; then for each run of kDenseVecs vectors of output pixels the C_in * kh * kw tap vectors
// are gathered once (plain or stride-2 loads) and every output channel is their weighted sum, four
// channels at a time, stored with its shift and activation.
//
// In an anonymous namespace like every kernel header (kernel_work_items.h says why).
#pragma once

#include <cstdint>
#include <cstring>

#include "activation.h"
#include "compiler.h"
#include "internal.h"
#include "kernel_common.h"

namespace lwk {
namespace detail {
namespace {

// Pixel vectors per pass: each weight broadcast feeds kDenseVecs FMAs and each tap vector four
// channels' (4 x kDenseVecs accumulators), so the loop is not bound by its loads.
constexpr int kDenseVecs = kDenseConvVectors;

// Output channels [co, co + NC) of pixels [ox0, ox0 + valid) of row `oy` (valid <= kDenseVecs * W),
// from the tap vectors `taps` ([t][kDenseVecs * W]).
template <class V, int NC>
LWK_INLINE void dense_conv_channels(const DensePlan<typename V::T>& p, int64_t co, const typename V::T* taps,
                                    typename V::T* yrow, int64_t valid) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W, P = kDenseVecs;
  const int64_t nt = p.taps, plane = p.OH * p.OW;
  const T* w = p.w + co * nt;
  R acc[NC][P];
  LWK_UNROLL for (int j = 0; j < NC; ++j) {
    LWK_UNROLL for (int v = 0; v < P; ++v) acc[j][v] = V::zero();
  }
  for (int64_t t = 0; t < nt; ++t) {
    R tv[P];
    LWK_UNROLL for (int v = 0; v < P; ++v) tv[v] = V::load(taps + (t * P + v) * W);
    LWK_UNROLL for (int j = 0; j < NC; ++j) {
      const R wj = V::set1(w[j * nt + t]);
      LWK_UNROLL for (int v = 0; v < P; ++v) acc[j][v] = V::fma(wj, tv[v], acc[j][v]);
    }
  }
  // Clamping activations in registers as the vectors are stored (the row's last one masked:
  // 112-pixel rows end in a partial pass, whose element-wise copy once cost a fifth of the stem);
  // hardswish and silu in a pass over the stored row.
  const bool clamping = is_clamping(p.act);
  LWK_UNROLL for (int j = 0; j < NC; ++j) {
    const R sh = V::set1(p.shift ? p.shift[co + j] : T(0));
    T* out = yrow + (co + j) * plane;
    LWK_UNROLL for (int v = 0; v < P; ++v) {
      const int64_t left = valid - int64_t(v) * W;
      if (left <= 0) continue;
      R r = V::add(acc[j][v], sh);
      if (clamping) r = activate_vec_clamping<V>(r, p.act);
      if (left >= W) {
        V::store(out + v * W, r);
      } else {
        V::store_first(out + v * W, r, static_cast<int>(left));
      }
    }
    if (!clamping) activate_array<V>(out, valid, p.act);
  }
}

// Every output channel of pixels [ox0, ox0 + kDenseVecs * W) of row `oy` (fewer at the row's end).
template <class V>
void dense_conv_vectors(const DensePlan<typename V::T>& p, int64_t n, int64_t oy, int64_t ox0,
                        const typename V::T* taps) {
  using T = typename V::T;
  const int64_t valid = imin(kDenseVecs * V::W, p.OW - ox0);
  T* yrow = p.y + n * p.CO * p.OH * p.OW + oy * p.OW + ox0;
  int64_t co = 0;
  for (; co + 4 <= p.CO; co += 4) dense_conv_channels<V, 4>(p, co, taps, yrow, valid);
  switch (p.CO - co) {
    case 3: dense_conv_channels<V, 3>(p, co, taps, yrow, valid); break;
    case 2: dense_conv_channels<V, 2>(p, co, taps, yrow, valid); break;
    case 1: dense_conv_channels<V, 1>(p, co, taps, yrow, valid); break;
    default: break;
  }
}

template <class V, int kS>
void dense_conv_row(const DensePlan<typename V::T>& p, int64_t n, int64_t oy, typename V::T* rows,
                    typename V::T* taps) {
  using T = typename V::T;
  constexpr int W = V::W, P = kDenseVecs;
  const int64_t KH = p.KH, KW = p.KW, Wp = p.row_len;
  // The input rows, zero-padded: rows[(c * KH + ky) * Wp + j] = x[n, c, iy, j - pad_w].
  for (int64_t c = 0; c < p.C; ++c) {
    for (int64_t ky = 0; ky < KH; ++ky) {
      T* rb = rows + (c * KH + ky) * Wp;
      const int64_t iy = oy * p.stride_h - p.pad_h + ky * p.dil_h;
      if (iy < 0 || iy >= p.H) {
        std::memset(rb, 0, sizeof(T) * Wp);
        continue;
      }
      std::memset(rb, 0, sizeof(T) * p.pad_w);
      std::memcpy(rb + p.pad_w, p.x + ((n * p.C + c) * p.H + iy) * p.Wd, sizeof(T) * p.Wd);
      std::memset(rb + p.pad_w + p.Wd, 0, sizeof(T) * (Wp - p.pad_w - p.Wd));
    }
  }
  for (int64_t ox0 = 0; ox0 < p.OW; ox0 += P * W) {
    int64_t t = 0;
    for (int64_t r = 0; r < p.C * KH; ++r) {
      const T* rb = rows + r * Wp + ox0 * p.stride_w;
      for (int64_t kx = 0; kx < KW; ++kx, ++t) {
        LWK_UNROLL for (int v = 0; v < P; ++v) {
          V::store(taps + (t * P + v) * W, load_strided<V, kS>(rb + kx * p.dil_w + v * W * p.stride_w, p.stride_w));
        }
      }
    }
    dense_conv_vectors<V>(p, n, oy, ox0, taps);
  }
}

// Output rows [begin, end) (row = n * OH + oy); `scratch` holds p.scratch_elems elements.
template <class V>
void run_dense_rows(const DensePlan<typename V::T>& p, int64_t begin, int64_t end,
                    typename V::T* scratch) {
  using T = typename V::T;
  T* taps = scratch;
  T* rows = scratch + p.taps * kDenseVecs * V::W;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / p.OH, oy = r % p.OH;
    if (p.stride_w == 1) {
      dense_conv_row<V, 1>(p, n, oy, rows, taps);
    } else if (p.stride_w == 2) {
      dense_conv_row<V, 2>(p, n, oy, rows, taps);
    } else {
      dense_conv_row<V, 0>(p, n, oy, rows, taps);
    }
  }
}

}  // namespace
}  // namespace detail
}  // namespace lwk
