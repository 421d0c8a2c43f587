// The dense convolution's rows (dense_conv.h) for one instruction set: work item = one output row
// (image, oy). The C_in * kh input rows it needs are copied, zero-padded, into the worker's
// scratch; then for each run of kDenseVecs vectors of output pixels the C_in * kh * kw tap vectors
// are gathered once (plain or stride-2 loads) and every output channel is their weighted sum, four
// channels at a time, stored with its shift and activation.
//
// NHWC output (a model's channels-last blocks then need no transpose of the whole map after the
// stem) turns the loop around: groups of kNhwcPixels pixels by two vectors of output channels, each
// tap's input value broadcast from the padded rows against the weights transposed to
// [tap][channel] (zero-padded to whole pairs of vectors), stored pixel by pixel. Each output sums
// the same products in the same order as the NCHW loop, so both layouts give the same values
// (activate_array's tail rule aside: hardswish and silu may round differently there).
//
// In an anonymous namespace like every kernel header (kernel_work_items.h says why).
#pragma once

#include <cstdint>
#include <cstring>

#include "activation.h"
#include "compiler.h"
#include "dense_conv.h"
#include "internal.h"
#include "kernel_common.h"

namespace lwk {
namespace detail {
namespace {

// Pixel vectors per pass: each weight broadcast feeds kDenseVecs FMAs and each tap vector four
// channels' (4 x kDenseVecs accumulators), so the loop is not bound by its loads. A row's last
// pass takes only the vectors its pixels fill (112-pixel rows: 64 + 48 with 16-lane vectors, where
// a fourth vector of nothing cost an eighth of the stem's FMAs).
constexpr int kDenseVecs = kDenseConvVectors;

// Output channels [co, co + NC) of `valid` pixels (valid <= P * W) from the tap vectors `taps`
// ([t][P * W]), channel c's at yrow + c * plane.
template <class V, int NC, int P>
LWK_INLINE void dense_conv_channels(const DensePlan<typename V::T>& p, int64_t co, const typename V::T* taps,
                                    typename V::T* yrow, int64_t plane, int64_t valid) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W;
  const int64_t nt = p.taps;
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

// Every output channel of pixels [ox0, ox0 + P * W) of row `oy` (fewer at the row's end), the tap
// vectors gathered first from the padded input rows.
template <class V, int kS, int P>
void dense_conv_pass(const DensePlan<typename V::T>& p, int64_t n, int64_t oy, int64_t ox0,
                     const typename V::T* rows, typename V::T* taps) {
  using T = typename V::T;
  constexpr int W = V::W;
  int64_t t = 0;
  for (int64_t r = 0; r < p.C * p.KH; ++r) {
    const T* rb = rows + r * p.row_len + ox0 * p.stride_w;
    for (int64_t kx = 0; kx < p.KW; ++kx, ++t) {
      LWK_UNROLL for (int v = 0; v < P; ++v) {
        V::store(taps + (t * P + v) * W, load_strided<V, kS>(rb + kx * p.dil_w + v * W * p.stride_w, p.stride_w));
      }
    }
  }
  const int64_t valid = imin(P * W, p.OW - ox0);
  T* yrow = p.y + n * p.CO * p.OH * p.OW + oy * p.OW + ox0;
  const int64_t plane = p.OH * p.OW;
  int64_t co = 0;
  for (; co + 4 <= p.CO; co += 4) dense_conv_channels<V, 4, P>(p, co, taps, yrow, plane, valid);
  switch (p.CO - co) {
    case 3: dense_conv_channels<V, 3, P>(p, co, taps, yrow, plane, valid); break;
    case 2: dense_conv_channels<V, 2, P>(p, co, taps, yrow, plane, valid); break;
    case 1: dense_conv_channels<V, 1, P>(p, co, taps, yrow, plane, valid); break;
    default: break;
  }
}

constexpr int kNhwcPixels = kDenseNhwcPixels;

// NHWC output row `oy` of image n from the padded input rows.
template <class V>
void dense_conv_row_nhwc(const DensePlan<typename V::T>& p, int64_t n, int64_t oy, const typename V::T* rows) {
  using T = typename V::T;
  using R = typename V::reg;
  constexpr int W = V::W, P = kNhwcPixels;
  const int64_t sw = p.stride_w, nt = p.taps, co_pad = p.co_pad;
  const T* wt = p.w_nhwc;
  const T* shift = p.shift_nhwc;
  const bool clamping = is_clamping(p.act);
  T* yrow = p.y + (n * p.OH + oy) * p.OW * p.CO;
  // Every tap's offset in the padded rows, so that the taps run as one flat loop (3 x 3 x 3 taps
  // as three nested loops spent about as long on loop control as on FMAs).
  int64_t off[kDenseConvMaxTaps];
  for (int64_t r = 0, t = 0; r < p.C * p.KH; ++r) {
    for (int64_t kx = 0; kx < p.KW; ++kx, ++t) off[t] = r * p.row_len + kx * p.dil_w;
  }
  for (int64_t ox0 = 0; ox0 < p.OW; ox0 += P) {
    const int64_t np = imin(P, p.OW - ox0);
    for (int64_t co = 0; co < p.CO; co += 2 * W) {
      R acc[P][2];
      LWK_UNROLL for (int i = 0; i < P; ++i) acc[i][0] = acc[i][1] = V::zero();
      const T* group = rows + ox0 * sw;  // (the padded rows cover every pixel of the group)
      const T* wc = wt + co;
      for (int64_t t = 0; t < nt; ++t, wc += co_pad) {
        const T* xt = group + off[t];
        const R w0 = V::load(wc), w1 = V::load(wc + W);
        LWK_UNROLL for (int i = 0; i < P; ++i) {
          const R xv = V::set1(xt[i * sw]);
          acc[i][0] = V::fma(w0, xv, acc[i][0]);
          acc[i][1] = V::fma(w1, xv, acc[i][1]);
        }
      }
      const R sh0 = V::load(shift + co), sh1 = V::load(shift + co + W);
      for (int64_t i = 0; i < np; ++i) {
        T* out = yrow + (ox0 + i) * p.CO + co;
        LWK_UNROLL for (int v = 0; v < 2; ++v) {
          const int64_t left = p.CO - co - int64_t(v) * W;
          if (left <= 0) continue;
          R y = V::add(acc[i][v], v == 0 ? sh0 : sh1);
          if (clamping) y = activate_vec_clamping<V>(y, p.act);
          if (left >= W) {
            V::store(out + v * W, y);
          } else {
            V::store_first(out + v * W, y, static_cast<int>(left));
          }
        }
      }
    }
  }
  if (!clamping) activate_array<V>(yrow, p.OW * p.CO, p.act);
}

template <class V, int kS>
void dense_conv_row(const DensePlan<typename V::T>& p, int64_t n, int64_t oy, typename V::T* rows,
                    typename V::T* taps) {
  using T = typename V::T;
  constexpr int W = V::W, P = kDenseVecs;
  const int64_t KH = p.KH, Wp = p.row_len;
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
  if (p.nhwc_out) {
    dense_conv_row_nhwc<V>(p, n, oy, rows);
    return;
  }
  int64_t ox0 = 0;
  for (; ox0 + P * W <= p.OW; ox0 += P * W) dense_conv_pass<V, kS, P>(p, n, oy, ox0, rows, taps);
  static_assert(P == 4, "the tail pass below takes 1 to 4 vectors");
  switch ((p.OW - ox0 + W - 1) / W) {
    case 4: dense_conv_pass<V, kS, 4>(p, n, oy, ox0, rows, taps); break;
    case 3: dense_conv_pass<V, kS, 3>(p, n, oy, ox0, rows, taps); break;
    case 2: dense_conv_pass<V, kS, 2>(p, n, oy, ox0, rows, taps); break;
    case 1: dense_conv_pass<V, kS, 1>(p, n, oy, ox0, rows, taps); break;
    default: break;
  }
}

// Output rows [begin, end) (row = n * OH + oy); `scratch` holds p.scratch_elems elements.
template <class V>
void run_dense_rows(const DensePlan<typename V::T>& p, int64_t begin, int64_t end,
                    typename V::T* scratch) {
  using T = typename V::T;
  // (the layout dense_conv_forward sizes the scratch for: tap vectors, padded input rows)
  T* taps = scratch;
  T* rows = taps + p.taps * kDenseVecs * V::W;
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
