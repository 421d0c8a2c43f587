// Tests of the training kernels (train_kernels.h) against naive loops: depthwise forward (output
// and per-channel statistics) and backward (grad input, grad weight), dilated and strided, NCHW and
// NHWC, every compiled instruction-set variant, float and double; and the per-channel passes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "joint_block.h"
#include "train_kernels.h"

using lwk::Activation;
using lwk::Isa;
using lwk::Layout;
using lwk::train::ChannelGeometry;
using lwk::train::DwGeometry;

namespace {

int failures = 0;

void expect_close(double got, double want, double tol, const char* what, const DwGeometry& g) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    if (failures < 20)
      std::printf("FAIL %s: got %.9g want %.9g (C=%lld H=%lld W=%lld S=%lld D=%lld layout=%d)\n", what, got, want,
                  (long long)g.C, (long long)g.H, (long long)g.W, (long long)g.stride_h, (long long)g.dil_h, (int)g.layout);
    ++failures;
  }
}

// PyTorch's activations and their gradients at the activation's input, in double (activation.h
// gives the rules, non-finite values included).
double act_ref(double v, Activation a) {
  switch (a) {
    case Activation::kRelu:
      return v < 0 ? 0.0 : v;
    case Activation::kRelu6:
      return v < 0 ? 0.0 : v > 6 ? 6.0 : v;
    case Activation::kHardswish: {
      const double c = v + 3 < 0 ? 0.0 : v + 3 > 6 ? 6.0 : v + 3;
      return v * c / 6;
    }
    case Activation::kSilu:
      return v / (1 + std::exp(-v));
    default:
      return v;
  }
}

double act_grad_ref(double grad, double v, Activation a) {
  switch (a) {
    case Activation::kRelu:
      return v <= 0 ? 0.0 : grad;
    case Activation::kRelu6:
      return v > 0 && v < 6 ? grad : 0.0;
    case Activation::kHardswish:
      return v <= -3 ? 0.0 : v >= 3 ? grad : grad * (v / 3 + 0.5);  // NaN v: NaN
    case Activation::kSilu: {
      const double s = 1 / (1 + std::exp(-v));
      return grad * s * (1 + v * (1 - s));
    }
    default:
      return grad;
  }
}

const char* act_name(Activation a) {
  switch (a) {
    case Activation::kRelu: return "relu";
    case Activation::kRelu6: return "relu6";
    case Activation::kHardswish: return "hardswish";
    case Activation::kSilu: return "silu";
    default: return "none";
  }
}

// got against want: NaN where want is NaN, the same infinity, else within tol.
void expect_same(double got, double want, double tol, const char* what, Activation a, Layout l, Isa isa,
                 int64_t i) {
  bool ok;
  if (std::isnan(want)) ok = std::isnan(got);
  else if (std::isinf(want)) ok = got == want;
  else ok = std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
  if (!ok) {
    if (failures < 20)
      std::printf("FAIL %s (%s, %s, %s) element %lld: got %.9g want %.9g\n", what, act_name(a),
                  l == Layout::kNCHW ? "nchw" : "nhwc", lwk::isa_name(isa), (long long)i, got, want);
    ++failures;
  }
}

// Index of logical (n, c, h, w) in a dense tensor of the given layout.
int64_t at(Layout l, int64_t N, int64_t C, int64_t H, int64_t W, int64_t n, int64_t c, int64_t h, int64_t w) {
  (void)N;
  return l == Layout::kNCHW ? ((n * C + c) * H + h) * W + w : ((n * H + h) * W + w) * C + c;
}

template <typename T>
void check_dw(DwGeometry g, Isa isa, int threads, double tol) {
  g.OH = (g.H + 2 * g.pad_h - g.dil_h * (g.KH - 1) - 1) / g.stride_h + 1;
  g.OW = (g.W + 2 * g.pad_w - g.dil_w * (g.KW - 1) - 1) / g.stride_w + 1;
  const int64_t K = g.KH * g.KW;
  std::mt19937 rng(42);
  std::normal_distribution<double> nd;
  std::vector<T> x(g.N * g.C * g.H * g.W), w(g.C * K), go(g.N * g.C * g.OH * g.OW);
  for (auto& v : x) v = T(nd(rng));
  for (auto& v : w) v = T(nd(rng));
  for (auto& v : go) v = T(nd(rng));
  // naive
  std::vector<double> c_ref(go.size(), 0.0), gx_ref(x.size(), 0.0), gw_ref(w.size(), 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t oy = 0; oy < g.OH; ++oy)
        for (int64_t ox = 0; ox < g.OW; ++ox)
          for (int64_t ky = 0; ky < g.KH; ++ky)
            for (int64_t kx = 0; kx < g.KW; ++kx) {
              const int64_t iy = oy * g.stride_h - g.pad_h + ky * g.dil_h, ix = ox * g.stride_w - g.pad_w + kx * g.dil_w;
              if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) continue;
              const int64_t xi = at(g.layout, g.N, g.C, g.H, g.W, n, c, iy, ix);
              const int64_t oi = at(g.layout, g.N, g.C, g.OH, g.OW, n, c, oy, ox);
              c_ref[oi] += double(w[c * K + ky * g.KW + kx]) * double(x[xi]);
              gx_ref[xi] += double(w[c * K + ky * g.KW + kx]) * double(go[oi]);
              gw_ref[c * K + ky * g.KW + kx] += double(go[oi]) * double(x[xi]);
            }
  std::vector<double> s_ref(g.C, 0.0), ss_ref(g.C, 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t p = 0; p < g.OH * g.OW; ++p) {
        const double v = c_ref[at(g.layout, g.N, g.C, g.OH, g.OW, n, c, p / g.OW, p % g.OW)];
        s_ref[c] += v;
        ss_ref[c] += v * v;
      }
  // forward: raw, activated, statistics
  std::vector<T> raw(go.size(), T(NAN)), out(go.size(), T(NAN)), scale(g.C), shift(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    scale[c] = T(0.5 + 0.1 * c);
    shift[c] = T(0.2 - 0.05 * c);
  }
  std::vector<double> s(g.C, NAN), ss(g.C, NAN);
  lwk::train::DwForwardArgs<T> a;
  a.x = x.data(); a.w = w.data(); a.scale = scale.data(); a.shift = shift.data(); a.act = Activation::kRelu6;
  a.raw = raw.data(); a.out = out.data(); a.sum = s.data(); a.sumsq = ss.data();
  lwk::train::dw_forward<T>(g, a, isa, threads);
  for (size_t i = 0; i < raw.size(); ++i) expect_close(raw[i], c_ref[i], tol, "dw_forward raw", g);
  // The mid activation on the output (the first call's relu6, then the other smooth ones).
  for (Activation act : {Activation::kRelu6, Activation::kHardswish, Activation::kSilu}) {
    if (act != Activation::kRelu6) {
      lwk::train::DwForwardArgs<T> b;
      b.x = x.data(); b.w = w.data(); b.scale = scale.data(); b.shift = shift.data(); b.act = act;
      b.out = out.data();
      lwk::train::dw_forward<T>(g, b, isa, threads);
    }
    for (size_t i = 0; i < raw.size(); ++i) {
      const int64_t c = g.layout == Layout::kNCHW ? (int64_t(i) / (g.OH * g.OW)) % g.C : int64_t(i) % g.C;
      const double v = act_ref(c_ref[i] * double(scale[c]) + double(shift[c]), act);
      expect_close(out[i], v, tol, act == Activation::kRelu6 ? "dw_forward out relu6"
                                   : act == Activation::kHardswish ? "dw_forward out hardswish"
                                                                   : "dw_forward out silu", g);
    }
  }
  for (int64_t c = 0; c < g.C; ++c) {
    expect_close(s[c], s_ref[c], tol, "dw_forward sum", g);
    expect_close(ss[c], ss_ref[c], tol, "dw_forward sumsq", g);
  }
  // backward
  std::vector<T> gx(x.size(), T(NAN)), gw(w.size(), T(NAN));
  lwk::train::dw_backward<T>(g, x.data(), w.data(), go.data(), gx.data(), gw.data(), isa, threads);
  for (size_t i = 0; i < gx.size(); ++i) expect_close(gx[i], gx_ref[i], tol, "dw_backward grad_x", g);
  for (size_t i = 0; i < gw.size(); ++i) expect_close(gw[i], gw_ref[i], tol * 10, "dw_backward grad_w", g);
}

template <typename T>
void check_channel_passes(Layout layout, Isa isa, int threads, double tol) {
  ChannelGeometry g{3, 5, 37, layout};
  const int64_t total = g.N * g.C * g.HW;
  std::mt19937 rng(7);
  std::normal_distribution<double> nd;
  std::vector<T> z(total), grad(total), y(total), gb(total, T(NAN)), out(total, T(NAN));
  for (auto& v : z) v = T(nd(rng));
  for (auto& v : grad) v = T(nd(rng));
  auto chan = [&](int64_t i) { return layout == Layout::kNCHW ? (i / g.HW) % g.C : i % g.C; };
  std::vector<T> scale(g.C), shift(g.C), center(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    scale[c] = T(1 + 0.5 * c);
    shift[c] = T(-0.3 * c);
    center[c] = T(0.1 * c);
  }
  std::vector<double> sg(g.C), sgz(g.C);
  lwk::train::affine_act<T>(g, z.data(), scale.data(), shift.data(), nullptr, Activation::kRelu, y.data(), isa,
                            threads);
  lwk::train::act_backward_reduce<T>(g, grad.data(), y.data(), Activation::kRelu, {}, z.data(),
                                     center.data(), gb.data(), sg.data(), sgz.data(), isa, threads);
  lwk::train::affine_backward_apply<T>(g, gb.data(), z.data(), scale.data(), shift.data(), center.data(),
                                       out.data(), isa, threads);
  std::vector<double> sg_ref(g.C, 0), sgz_ref(g.C, 0);
  DwGeometry dg;  // for messages only
  for (int64_t i = 0; i < total; ++i) {
    const int64_t c = chan(i);
    const double zi = z[i];
    const double yi = std::max(0.0, zi * double(scale[c]) + double(shift[c]));
    expect_close(y[i], yi, tol, "affine_act", dg);
    const double gbi = yi > 0 ? double(grad[i]) : 0.0;
    expect_close(gb[i], gbi, tol, "act_backward_reduce gb", dg);
    expect_close(out[i], double(scale[c]) * gbi + double(shift[c]) * zi + double(center[c]), tol,
                 "affine_backward_apply", dg);
    sg_ref[c] += gbi;
    sgz_ref[c] += gbi * (zi - double(center[c]));
  }
  for (int64_t c = 0; c < g.C; ++c) {
    expect_close(sg[c], sg_ref[c], tol, "reduce sum_g", dg);
    expect_close(sgz[c], sgz_ref[c], tol, "reduce sum_gz", dg);
  }
}

// NaN through the activations and their gradients, as PyTorch: relu/relu6 keep a NaN input; the
// gradient passes a NaN relu output and gives 0 at a NaN relu6 output (its vectorised CPU rule),
// and is selected, not multiplied, where the activation is flat (a NaN grad there gives 0).
template <typename T>
void check_nan_activations(Layout layout, Isa isa) {
  ChannelGeometry g{1, 1, 8, layout};
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const std::vector<T> z = {nan, T(-1), T(3), T(7), nan, T(-2), T(0), T(6)};
  const T one = T(1), zero = T(0);
  for (Activation act : {Activation::kRelu, Activation::kRelu6}) {
    std::vector<T> y(8), gb(8);
    std::vector<T> grad(8, one);
    grad[5] = nan;  // flat region of both: selected away
    lwk::train::affine_act<T>(g, z.data(), &one, &zero, nullptr, act, y.data(), isa, 1);
    double sg = 0;
    lwk::train::act_backward_reduce<T>(g, grad.data(), y.data(), act, {}, nullptr, nullptr, gb.data(), &sg,
                                       nullptr, isa, 1);
    const bool relu = act == Activation::kRelu;
    for (int i = 0; i < 8; ++i) {
      const double zi = z[i];
      const bool nan_in = std::isnan(zi);
      const double want_y = nan_in ? NAN : std::min(std::max(zi, 0.0), relu ? INFINITY : 6.0);
      const double want_g = nan_in ? (relu ? 1.0 : 0.0) : (want_y > 0 && (relu || want_y < 6) ? 1.0 : 0.0);
      const bool ok_y = nan_in ? std::isnan(y[i]) : double(y[i]) == want_y;
      if (!ok_y || double(gb[i]) != want_g) {
        if (failures < 20)
          std::printf("FAIL nan activations (%s, %s, %s) element %d: y %g (want %g), grad %g (want %g)\n",
                      relu ? "relu" : "relu6", layout == Layout::kNCHW ? "nchw" : "nhwc", lwk::isa_name(isa), i,
                      double(y[i]), want_y, double(gb[i]), want_g);
        ++failures;
      }
    }
  }
}


// Every activation through affine_act and act_backward_reduce with the gradient taken at the
// activation's input (ActInput: src * scale + shift + residual), against the double-precision
// rules, non-finite values included. The inputs are dyadic (k / 128, scales powers of two) so the
// activation's input is exact in T, and the rules' thresholds (hardswish's -3 and 3) are met
// exactly where they are hit.
template <typename T>
void check_input_gradients(Layout layout, Isa isa, int threads, double tol) {
  ChannelGeometry g{2, 4, 41, layout};
  const int64_t total = g.N * g.C * g.HW;
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  std::mt19937 rng(11);
  std::vector<T> z(total), grad(total), res(total), y(total), gb(total);
  for (int64_t i = 0; i < total; ++i) {
    z[i] = T(int(rng() % 2049) - 1024) / T(128);  // [-8, 8]
    grad[i] = T(int(rng() % 257) - 128) / T(64);
    res[i] = T(int(rng() % 65) - 32) / T(16);
  }
  const T specials[] = {nan, inf, -inf, T(-3), T(3), T(0), T(-100), T(100), T(-90), T(90), T(-20), T(20)};
  auto chan = [&](int64_t i) { return layout == Layout::kNCHW ? (i / g.HW) % g.C : i % g.C; };
  const std::vector<T> scale = {T(1), T(0.5), T(2), T(0.25)}, shift = {T(0), T(-0.5), T(1.5), T(0.25)};
  // The specials go to channel 0 (scale 1, shift 0) of image 0, where the residual is zeroed.
  int64_t k = 0;
  for (int64_t i = 0; i < total && k < int64_t(sizeof(specials) / sizeof(T)); ++i) {
    if (chan(i) != 0 || i >= g.C * g.HW) continue;
    z[i] = specials[k++];
    res[i] = T(0);
  }
  for (Activation act : {Activation::kNone, Activation::kRelu, Activation::kRelu6, Activation::kHardswish,
                         Activation::kSilu}) {
    for (bool with_res : {false, true}) {
      const T* r = with_res ? res.data() : nullptr;
      lwk::train::affine_act<T>(g, z.data(), scale.data(), shift.data(), r, act, y.data(), isa, threads);
      lwk::train::ActInput<T> in;
      in.src = z.data(); in.scale = scale.data(); in.shift = shift.data(); in.residual = r;
      std::vector<double> sg(g.C);
      lwk::train::act_backward_reduce<T>(g, grad.data(), nullptr, act, in, nullptr, nullptr, gb.data(),
                                         sg.data(), nullptr, isa, threads);
      std::vector<double> sg_ref(g.C, 0.0);
      for (int64_t i = 0; i < total; ++i) {
        const int64_t c = chan(i);
        const double v = double(z[i]) * double(scale[c]) + double(shift[c]) + (r ? double(r[i]) : 0.0);
        expect_same(y[i], act_ref(v, act), tol, "affine_act", act, layout, isa, i);
        const double want_g = act_grad_ref(double(grad[i]), v, act);
        expect_same(gb[i], want_g, tol, "act_backward_reduce from the input", act, layout, isa, i);
        sg_ref[c] += want_g;
      }
      for (int64_t c = 1; c < g.C; ++c) {  // channel 0 holds the non-finite gradients
        expect_same(sg[c], sg_ref[c], tol, "act_backward_reduce sum_g", act, layout, isa, c);
      }
    }
  }
  // hardswish and silu cannot take their gradient from the output alone.
  for (Activation act : {Activation::kHardswish, Activation::kSilu}) {
    bool threw = false;
    try {
      std::vector<double> sg(g.C);
      lwk::train::act_backward_reduce<T>(g, grad.data(), y.data(), act, {}, nullptr, nullptr, gb.data(),
                                         sg.data(), nullptr, isa, threads);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    if (!threw) {
      std::printf("FAIL act_backward_reduce accepted %s without the activation's input\n", act_name(act));
      ++failures;
    }
  }
}

// The training geometry gets the same validation as the inference one (conv_geometry.h), overflow
// checks included: the kernels must never index past a buffer because a size was huge.
void check_validation() {
  DwGeometry g;
  g.N = 2; g.C = 4; g.H = 9; g.W = 9; g.KH = g.KW = 3; g.pad_h = g.pad_w = 1;
  g.OH = 9; g.OW = 9;
  auto rejects = [&](DwGeometry b, const char* word) {
    const std::string m = lwk::train::validate(b);
    if (m.empty() || m.find(word) == std::string::npos) {
      std::printf("FAIL validate: want a message containing '%s', got '%s'\n", word, m.c_str());
      ++failures;
    }
  };
  if (!lwk::train::validate(g).empty()) {
    std::printf("FAIL validate rejected a valid geometry: %s\n", lwk::train::validate(g).c_str());
    ++failures;
  }
  DwGeometry b = g;
  b.C = 0;
  rejects(b, "channels");
  b = g;
  b.stride_w = 0;
  rejects(b, "stride");
  b = g;
  b.OH = 8;
  rejects(b, "output size");
  b = g;
  b.H = int64_t(1) << 40;  // a single size past 2^30
  rejects(b, "2^30");
  b = g;  // every size allowed, their product not: [2^20, 2^20, 2^21, 2^21] elements
  b.N = b.C = int64_t(1) << 20;
  b.H = b.W = b.OH = b.OW = int64_t(1) << 21;
  b.pad_h = b.pad_w = 1;
  rejects(b, "overflow");
  b = g;
  b.dil_h = b.dil_w = 8;
  rejects(b, "larger than the padded input");
}
}  // namespace

int main() {
  std::vector<Isa> isas = {Isa::kScalar};
  if (lwk::isa_supported(Isa::kAvx2)) isas.push_back(Isa::kAvx2);
  if (lwk::isa_supported(Isa::kAvx512)) isas.push_back(Isa::kAvx512);  // runs the AVX2 variant
  int cases = 0;
  for (Isa isa : isas)
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
      for (int64_t C : {1, 3, 17})
        for (int64_t S : {1, 2})
          for (int64_t D : {1, 2, 3})
            for (int threads : {1, 2}) {
              DwGeometry g;
              g.N = 2; g.C = C; g.H = 9; g.W = 11; g.KH = g.KW = 3; g.stride_h = g.stride_w = S; g.dil_h = g.dil_w = D;
              g.pad_h = g.pad_w = D;
              g.layout = layout;
              check_dw<float>(g, isa, threads, 2e-5);
              check_dw<double>(g, isa, threads, 1e-12);
              g.H = 3; g.W = 4; g.pad_h = g.pad_w = 0; g.dil_h = g.dil_w = 1;  // small image, no padding
              check_dw<float>(g, isa, threads, 2e-5);
              cases += 3;
            }
  // Awkward geometries: horizontal strides 2 and 3 with other vertical ones (NCHW splits strided
  // rows into column phases), stride 1 with uneven kernels and paddings (NCHW's flat padded planes),
  // kernels wider or taller than the image, more padding than the kernel reaches, widths 1 and 2,
  // even widths.
  struct Awkward {
    int64_t H, W, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  };
  const Awkward awkward[] = {
      {7, 12, 3, 3, 1, 2, 1, 1, 1, 1}, {8, 13, 3, 5, 2, 3, 2, 0, 2, 1}, {5, 2, 3, 3, 2, 2, 3, 3, 3, 3},
      {6, 1, 1, 3, 1, 3, 0, 4, 1, 2}, {9, 10, 5, 3, 3, 2, 4, 6, 2, 3}, {4, 7, 2, 4, 2, 3, 0, 1, 1, 2},
      {11, 16, 3, 3, 2, 2, 3, 3, 3, 3}, {3, 5, 3, 3, 1, 1, 4, 4, 1, 1}, {6, 9, 1, 5, 1, 1, 0, 4, 1, 2},
      {5, 3, 5, 3, 1, 1, 6, 0, 2, 1}, {7, 7, 3, 3, 1, 1, 3, 3, 3, 3}};
  for (Isa isa : isas)
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
      for (const Awkward& a : awkward)
        for (int threads : {1, 2}) {
          DwGeometry g;
          g.N = 2; g.C = 5; g.H = a.H; g.W = a.W; g.KH = a.KH; g.KW = a.KW; g.stride_h = a.stride_h; g.stride_w = a.stride_w;
          g.pad_h = a.pad_h; g.pad_w = a.pad_w; g.dil_h = a.dil_h; g.dil_w = a.dil_w;
          g.layout = layout;
          check_dw<float>(g, isa, threads, 2e-5);
          check_dw<double>(g, isa, threads, 1e-12);
          cases += 2;
        }
  for (Isa isa : isas)
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
      for (int threads : {1, 2}) {
        check_channel_passes<float>(layout, isa, threads, 2e-5);
        check_channel_passes<double>(layout, isa, threads, 1e-12);
        cases += 2;
      }
  for (Isa isa : isas)
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
      for (int threads : {1, 2}) {
        check_input_gradients<float>(layout, isa, threads, 2e-5);
        check_input_gradients<double>(layout, isa, threads, 1e-12);
        cases += 2;
      }
  for (Isa isa : isas)
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      check_nan_activations<float>(layout, isa);
      check_nan_activations<double>(layout, isa);
      cases += 2;
    }
  check_validation();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("test_train_kernels: %d cases passed\n", cases);
  return 0;
}
