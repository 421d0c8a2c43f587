// Tests of the fused inverted residual (inverted_residual.h) against a double-precision reference
// of the plain composition (expand 1x1 -> act -> depthwise -> act -> project 1x1 -> + residual ->
// act) on a grid with the awkward cases: input channels 1-24, expanded channels that are no
// multiple of any vector width, 1x1 images and images narrower than a vector, kernels 1-5, strides
// 1-3, dilation, no/large padding, batch > 1, residual from x and from another tensor, every
// activation, 1-3 threads, tiles of one output row (a tiny band budget) up to whole images, the
// shared-depthwise split (more threads than tiles), both layouts and NCHW tensors through NHWC
// kernels (transpose_io), every ISA (float) and double;
// plus NaN propagation and validation.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "reference.h"
#include "inverted_residual.h"

namespace {

using lwk::Activation;
using lwk::InvertedResidualGeometry;
using lwk::Isa;
using lwk::Layout;
using lwk_test::g_failures;
int64_t g_runs = 0;
bool g_quick = false;  // --quick: a smaller grid (emulated runs)

using lwk_test::act_ref;
using lwk_test::out_size;

struct Shape {
  int64_t n, cin, h, w, cexp, cout, k, s, pad, dil;
};

struct Acts {
  Activation expand, mid, out;
};

enum class Residual { kNone, kX, kOther };

const auto at = lwk_test::offset;

// `layout` is the tensors'; with transpose_io the kernels run NHWC on NCHW tensors.
template <typename T>
void run_case(const Shape& sh, Layout layout, const Acts& acts, Residual res, int threads, Isa isa,
              uint64_t seed, bool nan_pixel = false, bool transpose_io = false) {
  if (transpose_io && layout != Layout::kNCHW) return;
  InvertedResidualGeometry g;
  g.batch = sh.n;
  g.in_channels = sh.cin;
  g.in_h = sh.h;
  g.in_w = sh.w;
  g.expanded_channels = sh.cexp;
  g.out_channels = sh.cout;
  g.kernel_h = g.kernel_w = sh.k;
  g.stride_h = g.stride_w = sh.s;
  g.pad_h = g.pad_w = sh.pad;
  g.dil_h = g.dil_w = sh.dil;
  g.out_h = out_size(sh.h, sh.k, sh.s, sh.pad, sh.dil);
  g.out_w = out_size(sh.w, sh.k, sh.s, sh.pad, sh.dil);
  g.layout = transpose_io ? Layout::kNHWC : layout;
  g.transpose_io = transpose_io;
  if (g.out_h < 1 || g.out_w < 1) return;
  if (res == Residual::kX && (sh.cin != sh.cout || g.out_h != sh.h || g.out_w != sh.w)) return;
  ++g_runs;
  std::mt19937_64 r(seed);
  std::uniform_real_distribution<double> u(-1, 1);
  auto fill = [&](std::vector<T>& v, double scale, double offset) {
    for (T& e : v) e = T(offset + scale * u(r));
  };
  const int64_t taps = sh.k * sh.k, OH = g.out_h, OW = g.out_w;
  std::vector<T> x(sh.n * sh.cin * sh.h * sh.w), we(sh.cexp * sh.cin), es(sh.cexp), eb(sh.cexp);
  std::vector<T> wd(sh.cexp * taps), ds(sh.cexp), db(sh.cexp), wp(sh.cout * sh.cexp), ps(sh.cout),
      pb(sh.cout), other(sh.n * sh.cout * OH * OW);
  fill(x, 1, 0);
  fill(we, 1, 0);
  fill(es, 0.5, 1);
  fill(eb, 1, 0.5);
  fill(wd, 1, 0);
  fill(ds, 0.5, 1);
  fill(db, 1, 0);
  fill(wp, 1, 0);
  fill(ps, 0.5, 1);
  fill(pb, 1, 0);
  fill(other, 1, 0);
  int64_t nan_at[4] = {0, 0, 0, 0};
  if (nan_pixel) {  // one input element NaN: every output whose taps reach its pixel is NaN
    nan_at[0] = sh.n - 1;
    nan_at[1] = sh.cin / 2;
    nan_at[2] = sh.h / 2;
    nan_at[3] = sh.w / 2;
    x[at(layout, sh.cin, sh.h, sh.w, nan_at[0], nan_at[1], nan_at[2], nan_at[3])] =
        std::numeric_limits<T>::quiet_NaN();
  }
  const auto packed_e = lwk::pack_pointwise<T>(isa, g.layout, we.data(), sh.cexp, sh.cin);
  const auto packed_p = lwk::pack_pointwise<T>(isa, g.layout, wp.data(), sh.cout, sh.cexp);
  std::vector<T> y(sh.n * sh.cout * OH * OW, std::numeric_limits<T>::quiet_NaN());
  lwk::InvertedResidualTensors<T> t;
  t.x = x.data();
  t.expand_scale = es.data();
  t.expand_shift = eb.data();
  t.expand_act = acts.expand;
  t.dw_weight = wd.data();
  t.dw_scale = ds.data();
  t.dw_shift = db.data();
  t.mid_act = acts.mid;
  t.project_scale = ps.data();
  t.project_shift = pb.data();
  t.residual = res == Residual::kX ? x.data() : res == Residual::kOther ? other.data() : nullptr;
  t.out_act = acts.out;
  t.y = y.data();
  lwk::inverted_residual_forward<T>(*packed_e, *packed_p, g, t, threads);
  if (t.residual == nullptr && !transpose_io) {  // the same call writing the other layout
    std::vector<T> yt(y.size(), std::numeric_limits<T>::quiet_NaN());
    lwk::InvertedResidualTensors<T> tt = t;
    tt.y = yt.data();
    tt.y_transposed = true;
    lwk::inverted_residual_forward<T>(*packed_e, *packed_p, g, tt, threads);
    ++g_runs;
    CHECK(lwk_test::same_values_transposed(layout, sh.n, sh.cout, OH, OW, y.data(), yt.data()),
          "%s %s n=%lld cin=%lld %lldx%lld cexp=%lld cout=%lld k=%lld s=%lld threads=%d: y_transposed output "
          "is not the plain output transposed", lwk::isa_name(isa), layout == Layout::kNCHW ? "NCHW" : "NHWC",
          (long long)sh.n, (long long)sh.cin, (long long)sh.h, (long long)sh.w, (long long)sh.cexp,
          (long long)sh.cout, (long long)sh.k, (long long)sh.s, threads);
  }

  // Reference in double, with the magnitude of every sum for the tolerance.
  const double eps = std::numeric_limits<T>::epsilon();
  std::vector<double> e(sh.cexp * sh.h * sh.w), em(e.size()), d(sh.cexp * OH * OW), dm(d.size());
  int bad = 0;
  for (int64_t n = 0; n < sh.n; ++n) {
    for (int64_t c = 0; c < sh.cexp; ++c) {
      for (int64_t iy = 0; iy < sh.h; ++iy) {
        for (int64_t ix = 0; ix < sh.w; ++ix) {
          double acc = 0, mag = 0;
          for (int64_t k = 0; k < sh.cin; ++k) {
            const double p = double(we[c * sh.cin + k]) * double(x[at(layout, sh.cin, sh.h, sh.w, n, k, iy, ix)]);
            acc += p;
            mag += std::fabs(p);
          }
          const int64_t i = (c * sh.h + iy) * sh.w + ix;
          e[i] = act_ref(double(es[c]) * acc + double(eb[c]), acts.expand);
          em[i] = std::fabs(double(es[c])) * mag + std::fabs(double(eb[c]));
        }
      }
      for (int64_t oy = 0; oy < OH; ++oy) {
        for (int64_t ox = 0; ox < OW; ++ox) {
          double acc = 0, mag = 0;
          for (int64_t ky = 0; ky < sh.k; ++ky) {
            for (int64_t kx = 0; kx < sh.k; ++kx) {
              const int64_t iy = oy * sh.s - sh.pad + ky * sh.dil, ix = ox * sh.s - sh.pad + kx * sh.dil;
              const double w = double(wd[c * taps + ky * sh.k + kx]);
              if (iy < 0 || iy >= sh.h || ix < 0 || ix >= sh.w) continue;
              acc += w * e[(c * sh.h + iy) * sh.w + ix];
              mag += std::fabs(w) * em[(c * sh.h + iy) * sh.w + ix];
            }
          }
          d[(c * OH + oy) * OW + ox] = act_ref(double(ds[c]) * acc + double(db[c]), acts.mid);
          dm[(c * OH + oy) * OW + ox] = std::fabs(double(ds[c])) * mag + std::fabs(double(db[c]));
        }
      }
    }
    for (int64_t o = 0; o < sh.cout; ++o) {
      for (int64_t oy = 0; oy < OH; ++oy) {
        for (int64_t ox = 0; ox < OW; ++ox) {
          double acc = 0, mag = 0;
          for (int64_t c = 0; c < sh.cexp; ++c) {
            acc += double(wp[o * sh.cexp + c]) * d[(c * OH + oy) * OW + ox];
            mag += std::fabs(double(wp[o * sh.cexp + c])) * dm[(c * OH + oy) * OW + ox];
          }
          const int64_t yi = at(layout, sh.cout, OH, OW, n, o, oy, ox);
          double v = double(ps[o]) * acc + double(pb[o]);
          mag = std::fabs(double(ps[o])) * mag + std::fabs(double(pb[o]));
          if (t.residual) {
            v += double(t.residual[yi]);
            mag += std::fabs(double(t.residual[yi]));
          }
          const double want = act_ref(v, acts.out);
          const double got = double(y[yi]);
          const double tol =
              8 * eps * mag * (std::sqrt(double(sh.cin)) + std::sqrt(double(taps)) + std::sqrt(double(sh.cexp))) +
              8 * eps;
          const bool ok = want != want ? got != got : std::fabs(got - want) <= tol;
          if (!ok && bad++ < 3) {
            CHECK(false,
                  "%s %s n=%lld cin=%lld %lldx%lld cexp=%lld cout=%lld k=%lld s=%lld p=%lld d=%lld acts=%d/%d/%d "
                  "res=%d threads=%d nan=%d: y[%lld,%lld,%lld,%lld] = %.9g, want %.9g (tol %.3g)",
                  lwk::isa_name(isa), transpose_io ? "NCHW via NHWC" : layout == Layout::kNCHW ? "NCHW" : "NHWC",
                  (long long)sh.n,
                  (long long)sh.cin, (long long)sh.h, (long long)sh.w, (long long)sh.cexp, (long long)sh.cout,
                  (long long)sh.k, (long long)sh.s, (long long)sh.pad, (long long)sh.dil, int(acts.expand),
                  int(acts.mid), int(acts.out), int(res), threads, int(nan_pixel), (long long)n, (long long)o,
                  (long long)oy, (long long)ox, got, want, tol);
          }
        }
      }
    }
  }
}

const Shape kShapes[] = {
    // n cin  h   w  cexp cout k  s  pad dil
    {1, 16, 14, 14, 96, 16, 3, 1, 1, 1},    // MobileNetV2, late
    {2, 24, 28, 28, 144, 24, 3, 1, 1, 1},   // MobileNetV2, middle (several bands)
    {1, 16, 30, 30, 96, 24, 3, 2, 1, 1},    // stride 2
    {2, 3, 9, 11, 7, 5, 3, 2, 1, 1},
    {1, 5, 13, 17, 19, 1, 5, 1, 2, 1},      // 5x5, one output channel
    {1, 8, 15, 15, 33, 8, 3, 1, 2, 2},      // dilated
    {3, 4, 7, 7, 50, 9, 3, 2, 1, 1},
    {1, 2, 1, 1, 6, 2, 3, 1, 1, 1},         // 1x1 image
    {1, 6, 20, 6, 24, 6, 3, 1, 0, 1},       // no padding, narrow
    {1, 4, 6, 30, 16, 4, 3, 3, 1, 1},       // stride 3
    {1, 12, 10, 10, 72, 12, 1, 1, 0, 1},    // 1x1 depthwise
    {1, 3, 8, 8, 17, 3, 3, 1, 4, 2},        // large padding
    {1, 1, 5, 5, 1, 1, 3, 1, 1, 1},         // one channel throughout
    {2, 10, 12, 9, 40, 10, 3, 1, 3, 3},     // dilation 3 (DeepLab-style)
};

const Acts kActs[] = {
    {Activation::kRelu6, Activation::kRelu6, Activation::kNone},
    {Activation::kHardswish, Activation::kSilu, Activation::kRelu},
    {Activation::kNone, Activation::kNone, Activation::kNone},
    {Activation::kRelu, Activation::kHardswish, Activation::kRelu6},
};

template <typename T>
void grid(Isa isa) {
  uint64_t seed = 1;
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
    for (const Shape& sh : kShapes) {
      for (std::size_t budget : {std::size_t(0), std::size_t(1), std::size_t(8192)}) {
        if (g_quick && budget == 8192) continue;
        lwk::set_expand_band_budget_bytes(budget);
        for (int threads : {1, 2, 3}) {
          if (g_quick && threads == 3) continue;
          const Acts& acts = kActs[seed % 4];
          const Residual res = Residual(seed % 3);
          run_case<T>(sh, layout, acts, res, threads, isa, seed++);
          if (res == Residual::kX) run_case<T>(sh, layout, acts, Residual::kOther, threads, isa, seed++);
        }
      }
      lwk::set_expand_band_budget_bytes(0);
      run_case<T>(sh, layout, kActs[0], Residual::kNone, 2, isa, seed++, /*nan_pixel=*/true);
      for (Residual res : {Residual::kNone, Residual::kX, Residual::kOther}) {  // NCHW through NHWC
        run_case<T>(sh, layout, kActs[seed % 4], res, 2, isa, seed, false, /*transpose_io=*/true);
        ++seed;
      }
    }
  }
}

template <typename T>
void expect_invalid(const char* what, const std::string& needle, void (*call)()) {
  try {
    call();
    CHECK(false, "%s: no exception", what);
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find(needle) != std::string::npos, "%s: message '%s' lacks '%s'", what,
          e.what(), needle.c_str());
  }
}

void validation() {
  static std::vector<float> x(2 * 4 * 5 * 5, 1.0f), we(8 * 4, 0.5f), wd(8 * 9, 0.1f), wp(4 * 8, 0.25f),
      y(2 * 4 * 5 * 5);
  static InvertedResidualGeometry g;
  g.batch = 2;
  g.in_channels = 4;
  g.in_h = g.in_w = 5;
  g.expanded_channels = 8;
  g.out_channels = 4;
  g.out_h = g.out_w = 5;
  g.pad_h = g.pad_w = 1;
  static std::shared_ptr<const lwk::PackedPointwise<float>> pe, pp, pp_nhwc;
  pe = lwk::pack_pointwise<float>(Isa::kScalar, Layout::kNCHW, we.data(), 8, 4);
  pp = lwk::pack_pointwise<float>(Isa::kScalar, Layout::kNCHW, wp.data(), 4, 8);
  pp_nhwc = lwk::pack_pointwise<float>(Isa::kScalar, Layout::kNHWC, wp.data(), 4, 8);
  static lwk::InvertedResidualTensors<float> t;
  t.x = x.data();
  t.dw_weight = wd.data();
  t.y = y.data();
  CHECK(lwk::validate(g).empty(), "valid geometry rejected: %s", lwk::validate(g).c_str());
  lwk::inverted_residual_forward<float>(*pe, *pp, g, t, 2);
  CHECK(y[0] == y[0], "valid call left y unwritten");
  expect_invalid<float>("swapped packings", "expand weights were packed for 4 x 8", [] {
    lwk::inverted_residual_forward<float>(*pp, *pe, g, t, 1);
  });
  expect_invalid<float>("layout mismatch", "project weights were packed for layout NHWC", [] {
    lwk::inverted_residual_forward<float>(*pe, *pp_nhwc, g, t, 1);
  });
  expect_invalid<float>("null x", "x is null", [] {
    auto t2 = t;
    t2.x = nullptr;
    lwk::inverted_residual_forward<float>(*pe, *pp, g, t2, 1);
  });
  expect_invalid<float>("bad activation", "unknown activation", [] {
    auto t2 = t;
    t2.mid_act = Activation(42);
    lwk::inverted_residual_forward<float>(*pe, *pp, g, t2, 1);
  });
  expect_invalid<float>("wrong output size", "out", [] {
    auto g2 = g;
    g2.out_h = 4;
    lwk::inverted_residual_forward<float>(*pe, *pp, g2, t, 1);
  });
  expect_invalid<float>("transpose_io with NCHW kernels", "transpose_io needs layout NHWC", [] {
    auto g2 = g;
    g2.transpose_io = true;
    lwk::inverted_residual_forward<float>(*pe, *pp, g2, t, 1);
  });
  expect_invalid<float>("y_transposed with a residual", "y_transposed", [] {
    auto t2 = t;
    t2.y_transposed = true;
    t2.residual = x.data();
    lwk::inverted_residual_forward<float>(*pe, *pp, g, t2, 1);
  });
  expect_invalid<float>("y_transposed with transpose_io", "y_transposed", [] {
    auto g2 = g;
    g2.transpose_io = true;
    g2.layout = Layout::kNHWC;
    auto t2 = t;
    t2.y_transposed = true;
    lwk::inverted_residual_forward<float>(*pe, *pp_nhwc, g2, t2, 1);
  });
  expect_invalid<float>("zero expanded channels", "expanded_channels must be >= 1", [] {
    auto g2 = g;
    g2.expanded_channels = 0;
    lwk::inverted_residual_forward<float>(*pe, *pp, g2, t, 1);
  });
  if (lwk::isa_supported(Isa::kAvx2) || lwk::isa_supported(Isa::kNeon)) {
    static std::shared_ptr<const lwk::PackedPointwise<float>> pp_vec;
    pp_vec = lwk::pack_pointwise<float>(lwk::best_isa(), Layout::kNCHW, wp.data(), 4, 8);
    expect_invalid<float>("ISA mismatch", "expand weights were packed for scalar", [] {
      lwk::inverted_residual_forward<float>(*pe, *pp_vec, g, t, 1);
    });
  }
}

}  // namespace

int main(int argc, char** argv) {
  g_quick = argc > 1 && std::string(argv[1]) == "--quick";
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (!lwk::isa_supported(isa)) continue;
    grid<float>(isa);
  }
  grid<double>(Isa::kScalar);
  validation();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed (%lld kernel runs)\n", g_failures, (long long)g_runs);
    return 1;
  }
  std::printf("all checks passed (%lld kernel runs)\n", (long long)g_runs);
  return 0;
}
