// Tests of the dense convolution kernel (dense_conv.h) against a double-precision reference on a
// grid with the awkward cases: 1-4 input channels, kernels 1-5 (rectangular too), strides 1-3,
// dilations, no/same/large padding, images narrower than a vector or than the kernel's extent,
// output channels that are no multiple of 4, every activation, batch > 1, 1-3 threads, every ISA
// (float) and double, NCHW and NHWC output; plus validation and NaN propagation.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "reference.h"
#include "dense_conv.h"

namespace {

using lwk::Activation;
using lwk::DenseConvGeometry;
using lwk::Isa;
using lwk_test::g_failures;
int64_t g_runs = 0;

using lwk_test::act_ref;
using lwk_test::out_size;

template <typename T>
void run_case(DenseConvGeometry g, Activation act, bool shift, int threads, Isa isa, uint64_t seed) {
  g.out_h = out_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h, g.dil_h);
  g.out_w = out_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w, g.dil_w);
  if (g.out_h < 1 || g.out_w < 1) return;
  if (g.in_channels * g.kernel_h * g.kernel_w > lwk::kDenseConvMaxTaps) return;  // validation's job
  ++g_runs;
  std::mt19937_64 r(seed);
  std::uniform_real_distribution<double> u(-1, 1);
  const int64_t taps = g.in_channels * g.kernel_h * g.kernel_w;
  std::vector<T> x(g.batch * g.in_channels * g.in_h * g.in_w), w(g.out_channels * taps), b(g.out_channels);
  for (T& v : x) v = T(u(r));
  for (T& v : w) v = T(u(r));
  for (T& v : b) v = T(u(r));
  std::vector<T> y(g.batch * g.out_channels * g.out_h * g.out_w, std::numeric_limits<T>::quiet_NaN());
  lwk::dense_conv_forward<T>(g, x.data(), w.data(), shift ? b.data() : nullptr, act, y.data(), isa, threads);
  const double eps = std::numeric_limits<T>::epsilon();
  int bad = 0;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o = 0; o < g.out_channels; ++o) {
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        for (int64_t ox = 0; ox < g.out_w; ++ox) {
          double acc = shift ? double(b[o]) : 0.0, mag = std::fabs(acc);
          for (int64_t c = 0; c < g.in_channels; ++c) {
            for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
              for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
                const int64_t iy = oy * g.stride_h - g.pad_h + ky * g.dil_h;
                const int64_t ix = ox * g.stride_w - g.pad_w + kx * g.dil_w;
                if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) continue;
                const double p = double(w[(o * g.in_channels + c) * g.kernel_h * g.kernel_w + ky * g.kernel_w + kx]) *
                                 double(x[((n * g.in_channels + c) * g.in_h + iy) * g.in_w + ix]);
                acc += p;
                mag += std::fabs(p);
              }
            }
          }
          const double want = act_ref(acc, act);
          const double got = double(y[((n * g.out_channels + o) * g.out_h + oy) * g.out_w + ox]);
          const double tol = 8 * eps * mag * std::sqrt(double(taps)) + 4 * eps;
          if (!(std::fabs(got - want) <= tol) && bad++ < 3) {
            std::fprintf(stderr,
                         "FAIL [%s %s] c=%lld->%lld k=%lldx%lld s=%lld,%lld p=%lld,%lld d=%lld,%lld in=%lldx%lld "
                         "act=%d t=%d at n=%lld o=%lld (%lld,%lld): got %.9g want %.9g\n",
                         lwk::isa_name(isa), sizeof(T) == 4 ? "f32" : "f64", (long long)g.in_channels,
                         (long long)g.out_channels, (long long)g.kernel_h, (long long)g.kernel_w,
                         (long long)g.stride_h, (long long)g.stride_w, (long long)g.pad_h, (long long)g.pad_w,
                         (long long)g.dil_h, (long long)g.dil_w, (long long)g.in_h, (long long)g.in_w, int(act),
                         threads, (long long)n, (long long)o, (long long)oy, (long long)ox, got, want);
          }
        }
      }
    }
  }
  // NHWC output: within the reference's tolerance of the NCHW one, every element written (the buffer
  // starts as NaN); the very same values for the activations computed in registers (the same sums in
  // the same order; activate_array's scalar tail may round hardswish and silu differently).
  std::vector<T> y_nhwc(y.size(), std::numeric_limits<T>::quiet_NaN());
  lwk::dense_conv_forward<T>(g, x.data(), w.data(), shift ? b.data() : nullptr, act, y_nhwc.data(), isa, threads,
                             lwk::Layout::kNHWC);
  const bool exact = act == Activation::kNone || act == Activation::kRelu || act == Activation::kRelu6;
  int moved = 0;
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t o = 0; o < g.out_channels; ++o) {
      for (int64_t px = 0; px < g.out_h * g.out_w; ++px) {
        const T want = y[(n * g.out_channels + o) * g.out_h * g.out_w + px];
        const T got = y_nhwc[(n * g.out_h * g.out_w + px) * g.out_channels + o];
        const double tol = exact ? 0.0 : 64 * std::numeric_limits<T>::epsilon() * (1 + std::fabs(double(want)));
        if (!(std::fabs(double(got) - double(want)) <= tol) && moved++ < 3) {
          std::fprintf(stderr, "FAIL [%s %s] NHWC output differs at n=%lld o=%lld px=%lld: %.9g vs NCHW %.9g\n",
                       lwk::isa_name(isa), sizeof(T) == 4 ? "f32" : "f64", (long long)n, (long long)o,
                       (long long)px, double(got), double(want));
        }
      }
    }
  }
  if (bad || moved) ++g_failures;
}

std::vector<Isa> isas() {
  std::vector<Isa> v;
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (lwk::isa_supported(i)) v.push_back(i);
  }
  return v;
}

void test_grid(bool quick) {
  const Activation acts[5] = {Activation::kNone, Activation::kRelu, Activation::kRelu6,
                              Activation::kHardswish, Activation::kSilu};
  struct K { int64_t kh, kw; };
  const std::vector<K> kernels = {{1, 1}, {3, 3}, {5, 5}, {3, 1}, {2, 3}};
  struct HW { int64_t h, w; };
  const std::vector<HW> images = quick ? std::vector<HW>{{1, 1}, {7, 5}, {9, 37}}
                                       : std::vector<HW>{{1, 1}, {2, 3}, {7, 5}, {9, 37}, {16, 17}, {5, 70}};
  uint64_t seed = 1;
  int v = 0;
  for (int64_t cin : {1, 3, 4}) {
    for (const K& k : kernels) {
      for (int64_t s : {1, 2, 3}) {
        for (int64_t d : {1, 2}) {
          for (int pk = 0; pk < 3; ++pk) {
            for (const HW& hw : images) {
              DenseConvGeometry g;
              g.batch = 1 + v % 2;
              g.in_channels = cin;
              g.in_h = hw.h;
              g.in_w = hw.w;
              g.out_channels = 1 + (v * 7) % 13;
              g.kernel_h = k.kh;
              g.kernel_w = k.kw;
              g.stride_h = s;
              g.stride_w = v % 4 == 3 ? 1 : s;  // rectangular strides sometimes
              g.dil_h = g.dil_w = d;
              g.pad_h = pk == 0 ? 0 : pk == 1 ? d * (k.kh - 1) / 2 : d * (k.kh - 1);
              g.pad_w = pk == 0 ? 0 : pk == 1 ? d * (k.kw - 1) / 2 : d * (k.kw - 1);
              const Activation act = acts[v % 5];
              const bool shift = v % 3 != 0;
              const int threads = 1 + v % 3;
              ++v;
              for (Isa isa : isas()) run_case<float>(g, act, shift, threads, isa, seed);
              run_case<double>(g, act, shift, threads, Isa::kScalar, seed);
              ++seed;
            }
          }
        }
      }
    }
  }
  // The mobile-network stem: 3 -> 32, 3x3, stride 2, padding 1, at 224, an odd size, and a size
  // whose rows are whole passes (no tail pass) on every vector width.
  for (int64_t hw : {224, 113, 256}) {
    DenseConvGeometry g;
    g.batch = 2;
    g.in_channels = 3;
    g.in_h = g.in_w = hw;
    g.out_channels = 32;
    g.stride_h = g.stride_w = 2;
    g.pad_h = g.pad_w = 1;
    for (Isa isa : isas()) run_case<float>(g, Activation::kRelu, true, 2, isa, 99);
  }
}

bool throws(const DenseConvGeometry& g, const char* needle) {
  std::vector<float> buf(4096, 0.f);
  try {
    lwk::dense_conv_forward<float>(g, buf.data(), buf.data(), nullptr, Activation::kNone, buf.data() + 2048,
                                   Isa::kScalar, 1);
  } catch (const std::invalid_argument& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

void test_validation() {
  DenseConvGeometry g;
  g.batch = 1;
  g.in_channels = 3;
  g.in_h = g.in_w = 8;
  g.out_channels = 4;
  g.out_h = g.out_w = 6;
  CHECK(lwk::validate(g).empty(), "a valid geometry: %s", lwk::validate(g).c_str());
  DenseConvGeometry bad = g;
  bad.out_w = 7;
  CHECK(throws(bad, "does not match"), "a wrong output size is rejected");
  bad = g;
  bad.in_channels = 8;
  CHECK(throws(bad, "at most 64"), "too many taps are rejected");
  bad = g;
  bad.out_channels = 0;
  CHECK(throws(bad, "out_channels"), "no output channels is rejected");
  bad = g;
  bad.stride_w = 0;
  CHECK(throws(bad, "stride"), "stride 0 is rejected");
  std::vector<float> buf(4096, 0.f);
  bool threw = false;
  try {
    lwk::dense_conv_forward<float>(g, nullptr, buf.data(), nullptr, Activation::kNone, buf.data(), Isa::kScalar, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "a null x is rejected");
  threw = false;
  try {
    lwk::dense_conv_forward<float>(g, buf.data(), buf.data(), nullptr, Activation::kNone, buf.data() + 2048,
                                   Isa::kScalar, 1, static_cast<lwk::Layout>(7));
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("layout") != std::string::npos;
  }
  CHECK(threw, "an unknown output layout is rejected");
}

// A NaN weight reaches every output of its channel, padded borders included (PyTorch multiplies
// the zero padding too); other channels stay finite.
void test_nan_weight() {
  DenseConvGeometry g;
  g.batch = 1;
  g.in_channels = 3;
  g.in_h = g.in_w = 9;
  g.out_channels = 5;
  g.stride_h = g.stride_w = 2;
  g.pad_h = g.pad_w = 1;
  g.out_h = g.out_w = 5;
  std::vector<float> x(3 * 81, 0.5f), w(5 * 27, 0.1f), y(5 * 25, 0.f);
  w[2 * 27 + 0] = std::numeric_limits<float>::quiet_NaN();  // channel 2, corner tap (reads padding at (0,0))
  for (Isa isa : isas()) {
    lwk::dense_conv_forward<float>(g, x.data(), w.data(), nullptr, Activation::kRelu, y.data(), isa, 2);
    int nan2 = 0, nan_other = 0;
    for (int64_t o = 0; o < 5; ++o) {
      for (int64_t i = 0; i < 25; ++i) (o == 2 ? nan2 : nan_other) += std::isnan(y[o * 25 + i]);
    }
    CHECK(nan2 == 25 && nan_other == 0, "[%s] NaN weight: %d of 25 outputs NaN in its channel, %d elsewhere",
          lwk::isa_name(isa), nan2, nan_other);
    lwk::dense_conv_forward<float>(g, x.data(), w.data(), nullptr, Activation::kRelu, y.data(), isa, 2,
                                   lwk::Layout::kNHWC);
    nan2 = nan_other = 0;
    for (int64_t i = 0; i < 25; ++i) {
      for (int64_t o = 0; o < 5; ++o) (o == 2 ? nan2 : nan_other) += std::isnan(y[i * 5 + o]);
    }
    CHECK(nan2 == 25 && nan_other == 0, "[%s] NaN weight, NHWC output: %d of 25 NaN in its channel, %d elsewhere",
          lwk::isa_name(isa), nan2, nan_other);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  test_validation();
  test_nan_weight();
  test_grid(quick);
  if (g_failures) {
    std::fprintf(stderr, "%d dense conv check(s) FAILED over %lld runs\n", g_failures, (long long)g_runs);
    return 1;
  }
  std::printf("dense conv: all checks passed (%lld runs)\n", (long long)g_runs);
  return 0;
}
