// Loop bodies of the training kernels (train_kernels.h), written once as plain C++ that the
// compiler vectorises, and compiled in one translation unit per instruction set: each includes
// this file with LWK_TRAIN_NS set to its own namespace (train_kernels.cpp: baseline,
// train_kernels_avx2.cpp: -mavx2 -mfma). Not part of the public API.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "activation.h"
#include "compiler.h"
#include "conv_geometry.h"
#include "train_kernels.h"
#include "work_sharing.h"

#ifndef LWK_TRAIN_NS
#error "define LWK_TRAIN_NS before including train_impl.h"
#endif

namespace lwk {
namespace train {

// One instruction-set variant's kernels (tables built at the end of this file).
template <typename T>
struct TrainOps {
  void (*dw_forward)(const DwGeometry&, const DwForwardArgs<T>&, int);
  void (*dw_backward)(const DwGeometry&, const T*, const T*, const T*, T*, T*, int);
  void (*affine_act)(const ChannelGeometry&, const T*, const T*, const T*, const T*, Activation, T*,
                     int);
  void (*act_backward_reduce)(const ChannelGeometry&, const T*, const T*, Activation,
                              const ActInput<T>&, const T*, const T*, T*, double*, double*, int);
  void (*affine_backward_apply)(const ChannelGeometry&, const T*, const T*, const T*, const T*,
                                const T*, T*, int);
};

const TrainOps<float>* baseline_train_ops_f32();
const TrainOps<double>* baseline_train_ops_f64();
#if defined(LWK_HAVE_AVX2)
const TrainOps<float>* avx2_train_ops_f32();
#endif

namespace LWK_TRAIN_NS {

// ---- work sharing: lwk::detail::share_work (work_sharing.h) ---------------------------------
using lwk::detail::share_work;
using lwk::detail::tasks_for;

// The input of an activation, written once: the forward (dw_forward, affine_act) and the backward
// (act_backward_reduce, which recomputes it for hardswish and silu) compute it alike.
template <typename T>
LWK_INLINE T affine(T z, T scale, T shift) {
  return z * scale + shift;
}

// Per-task double accumulators [tasks][len], summed into out[len] at the end.
struct Partials {
  int tasks;
  int64_t len;
  std::vector<double> data;
  Partials(int t, int64_t l) : tasks(t), len(l), data(static_cast<size_t>(t) * l, 0.0) {}
  double* of(int task) { return data.data() + static_cast<size_t>(task) * len; }
  void reduce_into(double* out) const {
    for (int64_t i = 0; i < len; ++i) out[i] = 0.0;
    for (int t = 0; t < tasks; ++t)
      for (int64_t i = 0; i < len; ++i) out[i] += data[static_cast<size_t>(t) * len + i];
  }
};

// Sum of a[i] and of a[i]^2 in double, 8 independent lanes (vectorisable without reassociation).
template <typename T>
inline void span_stats(const T* LWK_RESTRICT a, int64_t n, double& s, double& ss) {
  double ls[8] = {0}, lq[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) {
      const double v = static_cast<double>(a[i + l]);
      ls[l] += v;
      lq[l] += v * v;
    }
  double rs = 0, rq = 0;
  for (; i < n; ++i) {
    const double v = static_cast<double>(a[i]);
    rs += v;
    rq += v * v;
  }
  for (int l = 0; l < 8; ++l) {
    rs += ls[l];
    rq += lq[l];
  }
  s += rs;
  ss += rq;
}

// sum a[i] * b[i] with T lanes.
template <typename T>
inline T dot(const T* LWK_RESTRICT a, const T* LWK_RESTRICT b, int64_t n) {
  T lanes[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += a[i + l] * b[i + l];
  T r = 0;
  for (; i < n; ++i) r += a[i] * b[i];
  for (int l = 0; l < 8; ++l) r += lanes[l];
  return r;
}

// Column phases of a strided row (NCHW backward, horizontal stride S > 1): a row of W inputs is
// stored as S runs, run p holding columns p, p + S, p + 2S, ... from offset start[p]. The inputs
// that output columns ox = lo..hi-1 touch at tap offset `off` (column ox * S + off) then sit
// contiguous in one run, from shift(off) + lo on, so the strided scatter into grad_x and gather
// for grad_w become unit-stride loops that vectorise. (The forward keeps its strided gather: the
// split's extra pass over x cost more there than it saved.) With S == 1 the phased row is the row
// itself and shift(off) == off.
struct ColumnPhases {
  int64_t S, W;
  std::vector<int64_t> start;
  ColumnPhases(int64_t stride, int64_t width) : S(stride), W(width), start(static_cast<size_t>(stride)) {
    int64_t at = 0;
    for (int64_t p = 0; p < S; ++p) {
      start[p] = at;
      at += p < W ? (W - p + S - 1) / S : 0;
    }
  }
  int64_t shift(int64_t off) const {
    const int64_t p = ((off % S) + S) % S;
    return start[p] + (off - p) / S;  // exact: off - p is a multiple of S
  }
  template <typename T>
  void split(const T* LWK_RESTRICT row, T* LWK_RESTRICT phased) const {
    for (int64_t p = 0; p < S && p < W; ++p) {
      T* LWK_RESTRICT dst = phased + start[p];
      for (int64_t j = 0, ix = p; ix < W; ++j, ix += S) dst[j] = row[ix];
    }
  }
  template <typename T>
  void merge(const T* LWK_RESTRICT phased, T* LWK_RESTRICT row) const {
    for (int64_t p = 0; p < S && p < W; ++p) {
      const T* LWK_RESTRICT src = phased + start[p];
      for (int64_t j = 0, ix = p; ix < W; ++j, ix += S) row[ix] = src[j];
    }
  }
};

// ---- depthwise forward -------------------------------------------------------------------------
template <typename T>
void dw_forward(const DwGeometry& g, const DwForwardArgs<T>& a, int threads) {
  const int64_t K = g.KH * g.KW, OHW = g.OH * g.OW, HW = g.H * g.W, C = g.C;
  std::vector<int64_t> kx_lo(g.KW), kx_hi(g.KW);
  for (int64_t kx = 0; kx < g.KW; ++kx) {
    lwk::detail::outputs_inside(kx, g.stride_w, g.pad_w, g.dil_w, g.W, g.OW, &kx_lo[kx], &kx_hi[kx]);
  }
  const bool stats = a.sum != nullptr;

  if (g.layout == Layout::kNCHW) {
    const int64_t n_items = g.N * C;
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, OHW));
    const int tasks = tasks_for(n_items, grain, threads);
    Partials ps(tasks, stats ? 2 * C : 0);
    auto body = [&](int task, int64_t b, int64_t e) {
      std::vector<T> row(static_cast<size_t>(g.OW));
      double* part = stats ? ps.of(task) : nullptr;
      for (int64_t item = b; item < e; ++item) {
        const int64_t c = item % C;
        const T* xp = a.x + item * HW;
        const T* wp = a.w + c * K;
        const T sc = a.scale ? a.scale[c] : T(1), sh = a.shift ? a.shift[c] : T(0);
        double s = 0, ss = 0;
        for (int64_t oy = 0; oy < g.OH; ++oy) {
          T* LWK_RESTRICT r = row.data();
          std::fill(r, r + g.OW, T(0));
          for (int64_t ky = 0; ky < g.KH; ++ky) {
            const int64_t iy = oy * g.stride_h - g.pad_h + ky * g.dil_h;
            if (iy < 0 || iy >= g.H) continue;
            const T* xr = xp + iy * g.W;
            for (int64_t kx = 0; kx < g.KW; ++kx) {
              const T wv = wp[ky * g.KW + kx];
              const int64_t off = kx * g.dil_w - g.pad_w;
              const int64_t lo = kx_lo[kx], hi = kx_hi[kx];
              if (g.stride_w == 1) {
                const T* LWK_RESTRICT src = xr + off;
                for (int64_t ox = lo; ox < hi; ++ox) r[ox] += wv * src[ox];
              } else {
                for (int64_t ox = lo; ox < hi; ++ox) r[ox] += wv * xr[ox * g.stride_w + off];
              }
            }
          }
          const int64_t o = item * OHW + oy * g.OW;
          if (a.raw) std::copy(r, r + g.OW, a.raw + o);
          if (stats) span_stats(r, g.OW, s, ss);
          if (a.out) {
            T* LWK_RESTRICT dst = a.out + o;
            with_activation(a.act, [&](auto act) {
              constexpr Activation A = decltype(act)::value;
              for (int64_t ox = 0; ox < g.OW; ++ox) dst[ox] = activate<A>(affine(r[ox], sc, sh));
            });
          }
        }
        if (stats) {
          part[c] += s;
          part[C + c] += ss;
        }
      }
    };
    share_work(n_items, grain, tasks, body);
    if (stats) {
      std::vector<double> out(2 * C);
      ps.reduce_into(out.data());
      std::copy(out.begin(), out.begin() + C, a.sum);
      std::copy(out.begin() + C, out.end(), a.sumsq);
    }
    return;
  }

  // NHWC: item = one output row of one image; channels run along vectors.
  std::vector<T> wt(static_cast<size_t>(K * C));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < K; ++k) wt[k * C + c] = a.w[c * K + k];
  std::vector<T> scale(C, T(1)), shift(C, T(0));
  if (a.scale) std::copy(a.scale, a.scale + C, scale.begin());
  if (a.shift) std::copy(a.shift, a.shift + C, shift.begin());
  const int64_t n_items = g.N * g.OH;
  const int tasks = tasks_for(n_items, 1, threads);
  Partials ps(tasks, stats ? 2 * C : 0);
  auto body = [&](int task, int64_t b, int64_t e) {
    std::vector<T> acc(static_cast<size_t>(C));
    double* part = stats ? ps.of(task) : nullptr;
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / g.OH, oy = item % g.OH;
      for (int64_t ox = 0; ox < g.OW; ++ox) {
        T* LWK_RESTRICT ac = acc.data();
        std::fill(ac, ac + C, T(0));
        for (int64_t ky = 0; ky < g.KH; ++ky) {
          const int64_t iy = oy * g.stride_h - g.pad_h + ky * g.dil_h;
          if (iy < 0 || iy >= g.H) continue;
          for (int64_t kx = 0; kx < g.KW; ++kx) {
            const int64_t ix = ox * g.stride_w - g.pad_w + kx * g.dil_w;
            if (ix < 0 || ix >= g.W) continue;
            const T* LWK_RESTRICT xp = a.x + ((n * g.H + iy) * g.W + ix) * C;
            const T* LWK_RESTRICT wp = wt.data() + (ky * g.KW + kx) * C;
            for (int64_t c = 0; c < C; ++c) ac[c] += wp[c] * xp[c];
          }
        }
        const int64_t o = ((n * g.OH + oy) * g.OW + ox) * C;
        if (a.raw) std::copy(ac, ac + C, a.raw + o);
        if (stats) {
          double* LWK_RESTRICT s = part;
          double* LWK_RESTRICT ss = part + C;
          for (int64_t c = 0; c < C; ++c) {
            const double v = static_cast<double>(ac[c]);
            s[c] += v;
            ss[c] += v * v;
          }
        }
        if (a.out) {
          T* LWK_RESTRICT dst = a.out + o;
          const T* LWK_RESTRICT sc = scale.data();
          const T* LWK_RESTRICT sh = shift.data();
          with_activation(a.act, [&](auto act) {
            constexpr Activation A = decltype(act)::value;
            for (int64_t c = 0; c < C; ++c) dst[c] = activate<A>(affine(ac[c], sc[c], sh[c]));
          });
        }
      }
    }
  };
  share_work(n_items, 1, tasks, body);
  if (stats) {
    std::vector<double> out(2 * C);
    ps.reduce_into(out.data());
    std::copy(out.begin(), out.begin() + C, a.sum);
    std::copy(out.begin() + C, out.end(), a.sumsq);
  }
}

// ---- depthwise backward ------------------------------------------------------------------------
// Stride-1 planes with short rows (7x7 and 14x14 maps): per row, every tap was a loop of at most W
// elements, so loop overhead dominated. Here each tap is one loop over the whole plane. x and
// grad_x live in zero-padded planes of pitch P = W + 2*pad_w, grad in a plane of the same pitch whose
// columns past OW are zero: output j = oy*P + ox then meets padded input j + ky*dil_h*P + kx*dil_w for
// every tap, and the zero columns make the terms that wrap into the next row vanish.
struct FlatPlanes {
  int64_t pitch, span, len;     // row pitch, grad elements (OH * pitch), padded plane + slack
  std::vector<int64_t> tap_at;  // per tap: its offset in the padded plane
  static bool applies(const DwGeometry& g) { return g.stride_h == 1 && g.stride_w == 1 && g.W < 64; }
  explicit FlatPlanes(const DwGeometry& g)
      : pitch(g.W + 2 * g.pad_w), span(g.OH * pitch),
        // Stride 1: OH + (KH-1)*dil_h == H + 2*pad_h rows; the last tap reads (KW-1)*dil_w past the end.
        len((g.H + 2 * g.pad_h) * pitch + (g.KW - 1) * g.dil_w), tap_at(static_cast<size_t>(g.KH * g.KW)) {
    for (int64_t ky = 0; ky < g.KH; ++ky)
      for (int64_t kx = 0; kx < g.KW; ++kx) tap_at[ky * g.KW + kx] = ky * g.dil_h * pitch + kx * g.dil_w;
  }
};

// One (image, channel) plane: grad_w[k] += sum over the plane, gx_plane = its grad_x (either may
// be null). xpad, gpad: len elements; gflat: span elements (scratch). xpad and gflat must be
// zero-filled once before the first plane: only their insides are written here, so their padding
// and the columns past OW stay zero from plane to plane.
template <typename T>
void backward_flat_plane(const DwGeometry& g, const FlatPlanes& f, const T* x_plane, const T* grad_plane,
                         const T* w, double* grad_w, T* gx_plane, T* xpad, T* gpad, T* gflat) {
  for (int64_t oy = 0; oy < g.OH; ++oy)
    std::copy(grad_plane + oy * g.OW, grad_plane + (oy + 1) * g.OW, gflat + oy * f.pitch);
  if (grad_w) {
    for (int64_t iy = 0; iy < g.H; ++iy)
      std::copy(x_plane + iy * g.W, x_plane + (iy + 1) * g.W, xpad + (iy + g.pad_h) * f.pitch + g.pad_w);
  }
  if (gx_plane) std::fill(gpad, gpad + f.len, T(0));
  const T* LWK_RESTRICT gr = gflat;
  for (size_t k = 0; k < f.tap_at.size(); ++k) {
    const int64_t at = f.tap_at[k];
    if (grad_w) grad_w[k] += static_cast<double>(dot(gr, xpad + at, f.span));
    if (gx_plane) {
      const T wv = w[k];
      T* LWK_RESTRICT dst = gpad + at;
      for (int64_t j = 0; j < f.span; ++j) dst[j] += wv * gr[j];
    }
  }
  if (gx_plane) {
    for (int64_t iy = 0; iy < g.H; ++iy) {
      const T* src = gpad + (iy + g.pad_h) * f.pitch + g.pad_w;
      std::copy(src, src + g.W, gx_plane + iy * g.W);
    }
  }
}

template <typename T>
void dw_backward(const DwGeometry& g, const T* x, const T* w, const T* grad, T* grad_x, T* grad_w,
                 int threads) {
  const int64_t K = g.KH * g.KW, OHW = g.OH * g.OW, HW = g.H * g.W, C = g.C;
  std::vector<int64_t> kx_lo(g.KW), kx_hi(g.KW);
  for (int64_t kx = 0; kx < g.KW; ++kx) {
    lwk::detail::outputs_inside(kx, g.stride_w, g.pad_w, g.dil_w, g.W, g.OW, &kx_lo[kx], &kx_hi[kx]);
  }

  if (g.layout == Layout::kNCHW) {
    // One channel per item (all images): grad_w[c] needs no merging, grad_x planes are disjoint.
    // With a horizontal stride, x and grad_x are handled as column phases (ColumnPhases).
    const int tasks = tasks_for(C, 1, threads);
    const ColumnPhases phases(g.stride_w, g.W);
    std::vector<int64_t> kx_shift(g.KW);
    for (int64_t kx = 0; kx < g.KW; ++kx) kx_shift[kx] = phases.shift(kx * g.dil_w - g.pad_w);
    const bool phased = g.stride_w > 1;
    const bool flat = FlatPlanes::applies(g);
    const FlatPlanes fp(flat ? g : DwGeometry{});
    auto body = [&](int, int64_t b, int64_t e) {
      std::vector<double> gw(static_cast<size_t>(K));
      std::vector<T> x_phased(phased && grad_w ? static_cast<size_t>(HW) : 0);
      std::vector<T> gx_phased(phased && grad_x ? static_cast<size_t>(HW) : 0);
      // Zero-filled here once (backward_flat_plane keeps xpad's and gflat's borders zero).
      std::vector<T> xpad(flat ? static_cast<size_t>(fp.len) : 0), gpad(xpad.size());
      std::vector<T> gflat(flat ? static_cast<size_t>(fp.span) : 0);
      for (int64_t c = b; c < e; ++c) {
        std::fill(gw.begin(), gw.end(), 0.0);
        const T* wp = w + c * K;
        for (int64_t n = 0; n < g.N; ++n) {
          const T* xp = x + (n * C + c) * HW;
          const T* gp = grad + (n * C + c) * OHW;
          T* gx_plane = grad_x ? grad_x + (n * C + c) * HW : nullptr;
          if (flat) {
            backward_flat_plane(g, fp, xp, gp, wp, grad_w ? gw.data() : nullptr, gx_plane, xpad.data(),
                                gpad.data(), gflat.data());
            continue;
          }
          if (phased && grad_w) {
            for (int64_t iy = 0; iy < g.H; ++iy) phases.split(xp + iy * g.W, x_phased.data() + iy * g.W);
            xp = x_phased.data();
          }
          T* gx = phased && gx_plane ? gx_phased.data() : gx_plane;
          if (gx) std::fill(gx, gx + HW, T(0));
          for (int64_t oy = 0; oy < g.OH; ++oy) {
            const T* LWK_RESTRICT gr = gp + oy * g.OW;
            for (int64_t ky = 0; ky < g.KH; ++ky) {
              const int64_t iy = oy * g.stride_h - g.pad_h + ky * g.dil_h;
              if (iy < 0 || iy >= g.H) continue;
              for (int64_t kx = 0; kx < g.KW; ++kx) {
                const int64_t lo = kx_lo[kx], hi = kx_hi[kx];
                if (hi <= lo) continue;
                const int64_t k = ky * g.KW + kx;
                const int64_t at = iy * g.W + kx_shift[kx];
                if (grad_w) gw[k] += static_cast<double>(dot(gr + lo, xp + at + lo, hi - lo));
                if (gx) {
                  const T wv = wp[k];
                  T* LWK_RESTRICT dst = gx + at;
                  for (int64_t ox = lo; ox < hi; ++ox) dst[ox] += wv * gr[ox];
                }
              }
            }
          }
          if (phased && gx_plane) {
            for (int64_t iy = 0; iy < g.H; ++iy) phases.merge(gx + iy * g.W, gx_plane + iy * g.W);
          }
        }
        if (grad_w)
          for (int64_t k = 0; k < K; ++k) grad_w[c * K + k] = static_cast<T>(gw[k]);
      }
    };
    share_work(C, 1, tasks, body);
    return;
  }

  // NHWC. grad_w: item = output row; per-row T accumulators flushed to per-task doubles.
  if (grad_w) {
    const int64_t n_items = g.N * g.OH;
    const int tasks = tasks_for(n_items, 1, threads);
    Partials ps(tasks, K * C);
    auto body = [&](int task, int64_t b, int64_t e) {
      std::vector<T> rowacc(static_cast<size_t>(K * C));
      double* part = ps.of(task);
      for (int64_t item = b; item < e; ++item) {
        const int64_t n = item / g.OH, oy = item % g.OH;
        std::fill(rowacc.begin(), rowacc.end(), T(0));
        bool any = false;
        for (int64_t ky = 0; ky < g.KH; ++ky) {
          const int64_t iy = oy * g.stride_h - g.pad_h + ky * g.dil_h;
          if (iy < 0 || iy >= g.H) continue;
          for (int64_t kx = 0; kx < g.KW; ++kx) {
            const int64_t off = kx * g.dil_w - g.pad_w;
            T* LWK_RESTRICT ra = rowacc.data() + (ky * g.KW + kx) * C;
            for (int64_t ox = kx_lo[kx]; ox < kx_hi[kx]; ++ox) {
              const T* LWK_RESTRICT gp = grad + ((n * g.OH + oy) * g.OW + ox) * C;
              const T* LWK_RESTRICT xp = x + ((n * g.H + iy) * g.W + ox * g.stride_w + off) * C;
              for (int64_t c = 0; c < C; ++c) ra[c] += gp[c] * xp[c];
              any = true;
            }
          }
        }
        if (any) {
          double* LWK_RESTRICT pp = part;
          const T* LWK_RESTRICT ra = rowacc.data();
          for (int64_t i = 0; i < K * C; ++i) pp[i] += static_cast<double>(ra[i]);
        }
      }
    };
    share_work(n_items, 1, tasks, body);
    std::vector<double> out(static_cast<size_t>(K * C));
    ps.reduce_into(out.data());
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < K; ++k) grad_w[c * K + k] = static_cast<T>(out[k * C + c]);
  }
  // grad_x: gather per input row.
  if (grad_x) {
    std::vector<T> wt(static_cast<size_t>(K * C));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < K; ++k) wt[k * C + c] = w[c * K + k];
    const int64_t n_items = g.N * g.H;
    const int tasks = tasks_for(n_items, 1, threads);
    auto body = [&](int, int64_t b, int64_t e) {
      for (int64_t item = b; item < e; ++item) {
        const int64_t n = item / g.H, iy = item % g.H;
        for (int64_t ix = 0; ix < g.W; ++ix) {
          T* LWK_RESTRICT dst = grad_x + ((n * g.H + iy) * g.W + ix) * C;
          std::fill(dst, dst + C, T(0));
          for (int64_t ky = 0; ky < g.KH; ++ky) {
            const int64_t ty = iy + g.pad_h - ky * g.dil_h;
            if (ty < 0 || ty % g.stride_h != 0) continue;
            const int64_t oy = ty / g.stride_h;
            if (oy >= g.OH) continue;
            for (int64_t kx = 0; kx < g.KW; ++kx) {
              const int64_t tx = ix + g.pad_w - kx * g.dil_w;
              if (tx < 0 || tx % g.stride_w != 0) continue;
              const int64_t ox = tx / g.stride_w;
              if (ox >= g.OW) continue;
              const T* LWK_RESTRICT gp = grad + ((n * g.OH + oy) * g.OW + ox) * C;
              const T* LWK_RESTRICT wp = wt.data() + (ky * g.KW + kx) * C;
              for (int64_t c = 0; c < C; ++c) dst[c] += wp[c] * gp[c];
            }
          }
        }
      }
    };
    share_work(n_items, 1, tasks, body);
  }
}

// ---- per-channel elementwise passes ------------------------------------------------------------
// NCHW: item = one (image, channel) plane of HW elements. NHWC: item = one pixel of C elements.
inline int64_t elementwise_grain(const ChannelGeometry& g) {
  const int64_t per_item = g.layout == Layout::kNCHW ? g.HW : g.C;
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_item));
}
inline int64_t elementwise_items(const ChannelGeometry& g) {
  return g.layout == Layout::kNCHW ? g.N * g.C : g.N * g.HW;
}

template <typename T>
void affine_act(const ChannelGeometry& g, const T* z, const T* scale, const T* shift,
                const T* residual, Activation act, T* y, int threads) {
  const int64_t C = g.C, n_items = elementwise_items(g), grain = elementwise_grain(g);
  const int tasks = tasks_for(n_items, grain, threads);
  auto body = [&](int, int64_t b, int64_t e) {
    with_activation(act, [&](auto act_tag) {
      constexpr Activation A = decltype(act_tag)::value;
      if (g.layout == Layout::kNCHW) {
        for (int64_t item = b; item < e; ++item) {
          const T sc = scale[item % C], sh = shift[item % C];
          const T* LWK_RESTRICT zp = z + item * g.HW;
          T* LWK_RESTRICT yp = y + item * g.HW;
          if (residual) {
            const T* LWK_RESTRICT rp = residual + item * g.HW;
            for (int64_t i = 0; i < g.HW; ++i) yp[i] = activate<A>(affine(zp[i], sc, sh) + rp[i]);
          } else {
            for (int64_t i = 0; i < g.HW; ++i) yp[i] = activate<A>(affine(zp[i], sc, sh));
          }
        }
      } else {
        const T* LWK_RESTRICT sc = scale;
        const T* LWK_RESTRICT sh = shift;
        for (int64_t item = b; item < e; ++item) {
          const T* LWK_RESTRICT zp = z + item * C;
          T* LWK_RESTRICT yp = y + item * C;
          if (residual) {
            const T* LWK_RESTRICT rp = residual + item * C;
            for (int64_t c = 0; c < C; ++c) yp[c] = activate<A>(affine(zp[c], sc[c], sh[c]) + rp[c]);
          } else {
            for (int64_t c = 0; c < C; ++c) yp[c] = activate<A>(affine(zp[c], sc[c], sh[c]));
          }
        }
      }
    });
  };
  share_work(n_items, grain, tasks, body);
}

// gb[0, n) = grad * the activation's derivative at its input, recomputed as the forward computed
// it: affine(src, scale, shift) (+ residual).
template <Activation A, typename T>
void grad_from_input(const T* LWK_RESTRICT grad, const T* LWK_RESTRICT src, const T* scale,
                     const T* shift, const T* LWK_RESTRICT residual, int64_t n, bool per_element,
                     T* LWK_RESTRICT gb) {
  // per_element: scale/shift index along the n elements (NHWC: channels), else one value each.
  if (per_element) {
    for (int64_t i = 0; i < n; ++i) {
      T v = affine(src[i], scale ? scale[i] : T(1), shift ? shift[i] : T(0));
      if (residual) v += residual[i];
      gb[i] = activation_grad_from_input<A>(grad[i], v);
    }
  } else {
    const T sc = scale ? *scale : T(1), sh = shift ? *shift : T(0);
    if (residual) {
      for (int64_t i = 0; i < n; ++i) gb[i] = activation_grad_from_input<A>(grad[i], affine(src[i], sc, sh) + residual[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) gb[i] = activation_grad_from_input<A>(grad[i], affine(src[i], sc, sh));
    }
  }
}

template <typename T>
void act_backward_reduce(const ChannelGeometry& g, const T* grad, const T* act_out, Activation act,
                         const ActInput<T>& act_in, const T* z, const T* center, T* gb,
                         double* sum_g, double* sum_gz, int threads) {
  const int64_t C = g.C, n_items = elementwise_items(g), grain = elementwise_grain(g);
  const int tasks = tasks_for(n_items, grain, threads);
  const bool from_input = act_in.src != nullptr;
  if (!from_input && act_out == nullptr) act = Activation::kNone;
  Partials ps(tasks, 2 * C);
  auto body = [&](int task, int64_t b, int64_t e) {
    double* part = ps.of(task);
    if (g.layout == Layout::kNCHW) {
      for (int64_t item = b; item < e; ++item) {
        const int64_t c = item % C, o = item * g.HW;
        const T* LWK_RESTRICT gp = grad + o;
        T* LWK_RESTRICT bp = gb + o;
        if (from_input && act != Activation::kNone) {
          with_activation(act, [&](auto act_tag) {
            grad_from_input<decltype(act_tag)::value>(
                gp, act_in.src + o, act_in.scale ? act_in.scale + c : nullptr,
                act_in.shift ? act_in.shift + c : nullptr,
                act_in.residual ? act_in.residual + o : nullptr, g.HW, false, bp);
          });
        } else if (act == Activation::kNone) {
          std::copy(gp, gp + g.HW, bp);
        } else {
          const T* LWK_RESTRICT ap = act_out + o;
          for (int64_t i = 0; i < g.HW; ++i) bp[i] = activation_grad(gp[i], ap[i], act);
        }
        double ls[8] = {0}, lz[8] = {0};
        int64_t i = 0;
        if (z) {
          const T* LWK_RESTRICT zp = z + o;
          const double m = static_cast<double>(center[c]);
          for (; i + 8 <= g.HW; i += 8)
            for (int l = 0; l < 8; ++l) {
              const double v = static_cast<double>(bp[i + l]);
              ls[l] += v;
              lz[l] += v * (static_cast<double>(zp[i + l]) - m);
            }
          for (; i < g.HW; ++i) {
            const double v = static_cast<double>(bp[i]);
            ls[0] += v;
            lz[0] += v * (static_cast<double>(zp[i]) - m);
          }
        } else {
          for (; i + 8 <= g.HW; i += 8)
            for (int l = 0; l < 8; ++l) ls[l] += static_cast<double>(bp[i + l]);
          for (; i < g.HW; ++i) ls[0] += static_cast<double>(bp[i]);
        }
        for (int l = 0; l < 8; ++l) {
          part[c] += ls[l];
          part[C + c] += lz[l];
        }
      }
    } else {
      double* LWK_RESTRICT s = part;
      double* LWK_RESTRICT sz = part + C;
      for (int64_t item = b; item < e; ++item) {
        const int64_t o = item * C;
        const T* LWK_RESTRICT gp = grad + o;
        T* LWK_RESTRICT bp = gb + o;
        if (from_input && act != Activation::kNone) {
          with_activation(act, [&](auto act_tag) {
            grad_from_input<decltype(act_tag)::value>(
                gp, act_in.src + o, act_in.scale, act_in.shift,
                act_in.residual ? act_in.residual + o : nullptr, C, true, bp);
          });
        } else if (act == Activation::kNone) {
          std::copy(gp, gp + C, bp);
        } else {
          const T* LWK_RESTRICT ap = act_out + o;
          for (int64_t c = 0; c < C; ++c) bp[c] = activation_grad(gp[c], ap[c], act);
        }
        if (z) {
          const T* LWK_RESTRICT zp = z + o;
          const T* LWK_RESTRICT m = center;
          for (int64_t c = 0; c < C; ++c) {
            const double v = static_cast<double>(bp[c]);
            s[c] += v;
            sz[c] += v * static_cast<double>(zp[c] - m[c]);
          }
        } else {
          for (int64_t c = 0; c < C; ++c) s[c] += static_cast<double>(bp[c]);
        }
      }
    }
  };
  share_work(n_items, grain, tasks, body);
  std::vector<double> out(2 * C);
  ps.reduce_into(out.data());
  std::copy(out.begin(), out.begin() + C, sum_g);
  if (sum_gz) std::copy(out.begin() + C, out.end(), sum_gz);
}

template <typename T>
void affine_backward_apply(const ChannelGeometry& g, const T* gb, const T* z, const T* a,
                           const T* b_, const T* k, T* out, int threads) {
  const int64_t C = g.C, n_items = elementwise_items(g), grain = elementwise_grain(g);
  const int tasks = tasks_for(n_items, grain, threads);
  auto body = [&](int, int64_t b, int64_t e) {
    if (g.layout == Layout::kNCHW) {
      for (int64_t item = b; item < e; ++item) {
        const int64_t c = item % C, o = item * g.HW;
        const T av = a[c], bv = b_[c], kv = k[c];
        const T* gp = gb + o;  // may alias out
        const T* LWK_RESTRICT zp = z + o;
        T* op = out + o;
        for (int64_t i = 0; i < g.HW; ++i) op[i] = av * gp[i] + bv * zp[i] + kv;
      }
    } else {
      for (int64_t item = b; item < e; ++item) {
        const int64_t o = item * C;
        const T* gp = gb + o;
        const T* LWK_RESTRICT zp = z + o;
        T* op = out + o;
        for (int64_t c = 0; c < C; ++c) op[c] = a[c] * gp[c] + b_[c] * zp[c] + k[c];
      }
    }
  };
  share_work(n_items, grain, tasks, body);
}

template <typename T>
const TrainOps<T>* ops_table() {
  static const TrainOps<T> ops{&dw_forward<T>, &dw_backward<T>, &affine_act<T>,
                               &act_backward_reduce<T>, &affine_backward_apply<T>};
  return &ops;
}

}  // namespace LWK_TRAIN_NS
}  // namespace train
}  // namespace lwk
