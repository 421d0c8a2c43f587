// Correctness tests of the fused joint-block CPU kernels against a naive direct loop in double.
//
// Every ISA this build and CPU support is run (plus double on the scalar path), over a grid of
// awkward shapes and random shapes, both layouts, with and without every optional operand, all
// activations and several thread counts. y is filled with NaN before each call so a skipped tile
// fails loudly. Exit status is non-zero on any failure.
//
//   test_joint_block            full grid
//   test_joint_block --quick    reduced grid (for emulators such as qemu-user)
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "reference.h"
#include "internal.h"
#include "joint_block.h"

namespace {

using lwk::Activation;
using lwk::Isa;
using lwk::JointGeometry;
using lwk::Layout;

using lwk_test::g_failures;
int64_t g_cases = 0;

struct Case {
  int64_t n, cin, cout, h, w, k, stride, pad, dil;
  Layout layout;
  bool dw_scale, dw_shift, pw_scale, pw_shift, residual;
  Activation mid_act, out_act;
  int threads;
  bool stats = false;  // also request the per-channel sums of y
  // Rectangular variants (kernel_w / stride_w / dilation_w / pad_w differ from the h ones).
  int64_t kw = -1, sw = -1, pw = -1, dw = -1;
};

std::string describe(const Case& c) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "n=%lld cin=%lld cout=%lld h=%lld w=%lld k=%lldx%lld s=%lldx%lld p=%lldx%lld "
                "d=%lldx%lld %s dws=%d dwb=%d pws=%d pwb=%d res=%d mid=%d out=%d threads=%d",
                (long long)c.n, (long long)c.cin, (long long)c.cout, (long long)c.h,
                (long long)c.w, (long long)c.k, (long long)c.kw, (long long)c.stride,
                (long long)c.sw, (long long)c.pad, (long long)c.pw, (long long)c.dil,
                (long long)c.dw, c.layout == Layout::kNHWC ? "NHWC" : "NCHW", c.dw_scale,
                c.dw_shift, c.pw_scale, c.pw_shift, c.residual, int(c.mid_act), int(c.out_act),
                c.threads);
  return buf;
}

using lwk_test::act_ref;
using lwk_test::offset;
using lwk_test::out_size;

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  double uniform(double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(gen);
  }
  int64_t integer(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(gen);
  }
};

template <typename T>
std::vector<T> random_vec(Rng& r, int64_t n, double lo, double hi) {
  std::vector<T> v(static_cast<size_t>(n));
  for (auto& e : v) e = static_cast<T>(r.uniform(lo, hi));
  return v;
}

// The kernel's y_sum / y_sumsq against double sums of the y it stored. They differ only by the
// rounding of the squares and of the few values (a register's worth) added in T before the double
// accumulation: at most ~3 eps relative to the sum of magnitudes (checked with 4 eps), plus the
// double accumulation's own rounding (count * double eps); far below the contribution of a single
// missed or repeated pixel.
template <typename T>
void check_stats(const Case& c, Isa isa, const std::vector<T>& y, int64_t npix,
                 const std::vector<double>& ysum, const std::vector<double>& ysq) {
  const double rel = 4 * std::numeric_limits<T>::epsilon() +
                     double(c.n * npix) * std::numeric_limits<double>::epsilon();
  int reported = 0;
  for (int64_t o = 0; o < c.cout; ++o) {
    double s = 0, q = 0, ms = 0, mq = 0;
    for (int64_t n = 0; n < c.n; ++n) {
      for (int64_t p = 0; p < npix; ++p) {
        const double v = double(y[offset(c.layout, c.cout, 1, npix, n, o, 0, p)]);
        s += v;
        q += v * v;
        ms += std::fabs(v);
        mq += v * v;
      }
    }
    const double ts = rel * ms + 1e-300;
    const double tq = rel * mq + 1e-300;
    if (!(std::fabs(ysum[o] - s) <= ts && std::fabs(ysq[o] - q) <= tq)) {
      if (reported++ < 3) {
        std::fprintf(stderr,
                     "FAIL [%s %s] %s\n     statistics of channel %lld: sum %.12g want %.12g "
                     "(tol %.3g), sumsq %.12g want %.12g (tol %.3g)\n",
                     lwk::isa_name(isa), sizeof(T) == 4 ? "f32" : "f64", describe(c).c_str(),
                     (long long)o, ysum[o], s, ts, ysq[o], q, tq);
      }
    }
  }
  if (reported) ++g_failures;
}

// Runs one case for element type T on `isa`, compares with the double reference.
// When set, run_case and the NaN tests fold the depthwise weights with fold_depthwise first and
// pass them as JointTensors::dw_folded (the path a CallSequence takes).
bool g_prefold = false;

template <typename T>
void fold_for_call(const JointGeometry& g, lwk::JointTensors<T>& t, std::vector<T>& w, std::vector<T>& b) {
  const int64_t taps = g.kernel_h * g.kernel_w;
  w.resize(static_cast<size_t>(g.in_channels * taps));
  b.resize(static_cast<size_t>(g.in_channels));
  lwk::fold_depthwise<T>(g.layout, g.in_channels, taps, t.dw_weight, t.dw_scale, t.dw_shift, w.data(), b.data());
  t.dw_weight = w.data();
  t.dw_scale = nullptr;
  t.dw_shift = b.data();
  t.dw_folded = true;
}

template <typename T>
void run_case(const Case& c0, Isa isa, uint64_t seed) {
  Case c = c0;
  if (c.kw < 0) c.kw = c.k;
  if (c.sw < 0) c.sw = c.stride;
  if (c.pw < 0) c.pw = c.pad;
  if (c.dw < 0) c.dw = c.dil;
  const int64_t oh = out_size(c.h, c.k, c.stride, c.pad, c.dil);
  const int64_t ow = out_size(c.w, c.kw, c.sw, c.pw, c.dw);
  if (oh < 1 || ow < 1) return;
  ++g_cases;
  Rng r(seed);
  const int64_t taps = c.k * c.kw;
  auto x = random_vec<T>(r, c.n * c.cin * c.h * c.w, -1, 1);
  auto dww = random_vec<T>(r, c.cin * taps, -1, 1);
  auto dws = random_vec<T>(r, c.cin, 0.5, 1.5);
  auto dwb = random_vec<T>(r, c.cin, -0.5, 0.5);
  auto pww = random_vec<T>(r, c.cout * c.cin, -1, 1);
  auto pws = random_vec<T>(r, c.cout, 0.5, 1.5);
  auto pwb = random_vec<T>(r, c.cout, -0.5, 0.5);
  const int64_t ysize = c.n * c.cout * oh * ow;
  auto res = random_vec<T>(r, ysize, -1, 1);
  std::vector<T> y(static_cast<size_t>(ysize), std::numeric_limits<T>::quiet_NaN());

  JointGeometry g;
  g.batch = c.n;
  g.in_channels = c.cin;
  g.in_h = c.h;
  g.in_w = c.w;
  g.out_channels = c.cout;
  g.out_h = oh;
  g.out_w = ow;
  g.kernel_h = c.k;
  g.kernel_w = c.kw;
  g.stride_h = c.stride;
  g.stride_w = c.sw;
  g.pad_h = c.pad;
  g.pad_w = c.pw;
  g.dil_h = c.dil;
  g.dil_w = c.dw;
  g.layout = c.layout;
  const std::string err = lwk::validate(g);
  CHECK(err.empty(), "validate rejected a valid case (%s): %s", describe(c).c_str(), err.c_str());
  if (!err.empty()) return;

  lwk::JointTensors<T> t;
  t.x = x.data();
  t.dw_weight = dww.data();
  t.dw_scale = c.dw_scale ? dws.data() : nullptr;
  t.dw_shift = c.dw_shift ? dwb.data() : nullptr;
  t.mid_act = c.mid_act;
  t.pw_scale = c.pw_scale ? pws.data() : nullptr;
  t.pw_shift = c.pw_shift ? pwb.data() : nullptr;
  t.residual = c.residual ? res.data() : nullptr;
  t.out_act = c.out_act;
  t.y = y.data();
  // NaN-poisoned: the sums must be overwritten.
  std::vector<double> ysum(static_cast<size_t>(c.cout), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> ysq(ysum);
  if (c.stats) {
    t.y_sum = ysum.data();
    t.y_sumsq = ysq.data();
  }
  std::vector<T> folded_w, folded_b;
  if (g_prefold) fold_for_call(g, t, folded_w, folded_b);
  auto packed = lwk::pack_pointwise<T>(isa, g.layout, pww.data(), c.cout, c.cin, c.threads);
  lwk::joint_forward<T>(*packed, g, t, c.threads);
  if (!c.residual && !c.stats) {  // the same call writing the other layout: the same values
    std::vector<T> yt(y.size(), std::numeric_limits<T>::quiet_NaN());
    lwk::JointTensors<T> tt = t;
    tt.y = yt.data();
    tt.y_transposed = true;
    lwk::joint_forward<T>(*packed, g, tt, c.threads);
    ++g_cases;
    CHECK(lwk_test::same_values_transposed(c.layout, c.n, c.cout, oh, ow, y.data(), yt.data()),
          "[%s %s] y_transposed output is not the plain output transposed: %s", lwk::isa_name(isa),
          sizeof(T) == 4 ? "f32" : "f64", describe(c).c_str());
  }

  // Reference (double), plus a magnitude bound for the tolerance.
  const int64_t npix = oh * ow;
  std::vector<double> tv(static_cast<size_t>(c.cin * npix)), tm(tv.size());
  const double eps = std::numeric_limits<T>::epsilon();
  // Rounding error of a dot product grows like sqrt(length) * eps * (sum of |terms|).
  const double rtol = 16 * eps;
  int reported = 0;
  for (int64_t n = 0; n < c.n; ++n) {
    for (int64_t ch = 0; ch < c.cin; ++ch) {
      for (int64_t oy = 0; oy < oh; ++oy) {
        for (int64_t ox = 0; ox < ow; ++ox) {
          double acc = 0, mag = 0;
          for (int64_t ky = 0; ky < c.k; ++ky) {
            for (int64_t kx = 0; kx < c.kw; ++kx) {
              const int64_t iy = oy * c.stride - c.pad + ky * c.dil;
              const int64_t ix = ox * c.sw - c.pw + kx * c.dw;
              if (iy < 0 || iy >= c.h || ix < 0 || ix >= c.w) continue;
              const double prod = double(dww[ch * taps + ky * c.kw + kx]) *
                                  double(x[offset(c.layout, c.cin, c.h, c.w, n, ch, iy, ix)]);
              acc += prod;
              mag += std::fabs(prod);
            }
          }
          const double s = c.dw_scale ? double(dws[ch]) : 1.0;
          const double b = c.dw_shift ? double(dwb[ch]) : 0.0;
          tv[ch * npix + oy * ow + ox] = act_ref(s * acc + b, c.mid_act);
          tm[ch * npix + oy * ow + ox] = std::fabs(s) * mag + std::fabs(b);
        }
      }
    }
    for (int64_t o = 0; o < c.cout; ++o) {
      const double s = c.pw_scale ? double(pws[o]) : 1.0;
      const double b = c.pw_shift ? double(pwb[o]) : 0.0;
      for (int64_t p = 0; p < npix; ++p) {
        double acc = 0, mag = 0;
        for (int64_t ch = 0; ch < c.cin; ++ch) {
          acc += double(pww[o * c.cin + ch]) * tv[ch * npix + p];
          mag += std::fabs(double(pww[o * c.cin + ch])) * tm[ch * npix + p];
        }
        const int64_t off = offset(c.layout, c.cout, oh, ow, n, o, p / ow, p % ow);
        double ref = s * acc + b;
        mag = std::fabs(s) * mag + std::fabs(b);
        if (c.residual) {
          ref += double(res[off]);
          mag += std::fabs(double(res[off]));
        }
        ref = act_ref(ref, c.out_act);
        const double got = double(y[off]);
        const double tol = rtol * mag * std::sqrt(double(taps + c.cin)) + eps;
        if (!(std::fabs(got - ref) <= tol)) {
          if (reported++ < 3) {
            std::fprintf(stderr,
                         "FAIL [%s %s] %s\n     at n=%lld o=%lld pixel=(%lld,%lld): got %.9g want "
                         "%.9g (tol %.3g)\n",
                         lwk::isa_name(isa), sizeof(T) == 4 ? "f32" : "f64", describe(c).c_str(),
                         (long long)n, (long long)o, (long long)(p / ow), (long long)(p % ow),
                         got, ref, tol);
          }
        }
      }
    }
  }
  if (c.stats) check_stats<T>(c, isa, y, oh * ow, ysum, ysq);
  if (reported) ++g_failures;
}

std::vector<Isa> isas_under_test() {
  std::vector<Isa> v;
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (lwk::isa_supported(i)) v.push_back(i);
  }
  return v;
}

void run_all(const Case& c, uint64_t seed) {
  for (Isa isa : isas_under_test()) run_case<float>(c, isa, seed);
  run_case<double>(c, Isa::kScalar, seed);
}

// ------------------------------------------------------------------------------------------------

void test_grid(bool quick) {
  const Activation acts[5] = {Activation::kNone, Activation::kRelu, Activation::kRelu6,
                              Activation::kHardswish, Activation::kSilu};
  struct Ch { int64_t cin, cout; };
  const std::vector<Ch> chans = quick ? std::vector<Ch>{{1, 1}, {3, 17}, {17, 3}, {32, 13}}
                                      : std::vector<Ch>{{1, 1}, {3, 17}, {17, 3}, {32, 32},
                                                        {1, 40}, {40, 1}, {9, 25}};
  struct Hw { int64_t h, w; };
  const std::vector<Hw> sizes = quick ? std::vector<Hw>{{1, 1}, {5, 7}, {9, 4}}
                                      : std::vector<Hw>{{1, 1}, {2, 3}, {5, 7}, {9, 4}, {13, 11}};
  const std::vector<int64_t> ks = {1, 3, 5};
  const std::vector<int64_t> dils = quick ? std::vector<int64_t>{1, 3} : std::vector<int64_t>{1, 2, 3, 5};
  uint64_t seed = 1;
  int variant = 0;
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
    for (const Ch& ch : chans) {
      for (const Hw& hw : sizes) {
        for (int64_t k : ks) {
          for (int64_t s : {1, 2}) {
            for (int64_t d : dils) {
              if (k == 1 && d != 1) continue;
              for (int pad_kind = 0; pad_kind < 3; ++pad_kind) {
                const int64_t pad = pad_kind == 0 ? 0 : pad_kind == 1 ? d * (k - 1) / 2 : d * (k - 1);
                if (out_size(hw.h, k, s, pad, d) < 1 || out_size(hw.w, k, s, pad, d) < 1) continue;
                // Cycle the optional operands, activations, batch and threads through the grid.
                const int v = variant++;
                Case c{};
                c.n = (v % 5 == 0) ? 2 : 1;
                c.cin = ch.cin;
                c.cout = ch.cout;
                c.h = hw.h;
                c.w = hw.w;
                c.k = k;
                c.stride = s;
                c.pad = pad;
                c.dil = d;
                c.layout = layout;
                c.dw_scale = v % 2 == 0;
                c.dw_shift = v % 3 != 0;
                c.pw_scale = v % 4 != 1;
                c.pw_shift = v % 5 != 2;
                c.residual = v % 3 == 1;
                c.mid_act = acts[v % 5];
                c.out_act = acts[(v / 5) % 5];
                c.threads = 1 + v % 3;
                c.stats = v % 2 == 1;
                run_all(c, seed++);
              }
            }
          }
        }
      }
    }
  }
}

void test_random(int count) {
  Rng r(12345);
  const Activation acts[5] = {Activation::kNone, Activation::kRelu, Activation::kRelu6,
                              Activation::kHardswish, Activation::kSilu};
  for (int i = 0; i < count; ++i) {
    Case c{};
    c.n = r.integer(1, 3);
    c.cin = r.integer(1, 70);
    c.cout = r.integer(1, 70);
    c.h = r.integer(1, 24);
    c.w = r.integer(1, 24);
    c.k = 2 * r.integer(0, 3) + 1;
    c.kw = r.integer(0, 3) == 0 ? 2 * r.integer(0, 3) + 1 : c.k;
    c.stride = r.integer(1, 3);
    c.sw = r.integer(0, 3) == 0 ? r.integer(1, 3) : c.stride;
    c.dil = r.integer(1, 4);
    c.dw = r.integer(0, 3) == 0 ? r.integer(1, 4) : c.dil;
    c.pad = r.integer(0, 6);
    c.pw = r.integer(0, 3) == 0 ? r.integer(0, 6) : c.pad;
    c.layout = r.integer(0, 1) ? Layout::kNHWC : Layout::kNCHW;
    c.dw_scale = r.integer(0, 1);
    c.dw_shift = r.integer(0, 1);
    c.pw_scale = r.integer(0, 1);
    c.pw_shift = r.integer(0, 1);
    c.residual = r.integer(0, 1);
    c.mid_act = acts[r.integer(0, 4)];
    c.out_act = acts[r.integer(0, 4)];
    c.threads = static_cast<int>(r.integer(1, 4));
    c.stats = r.integer(0, 1);
    if (out_size(c.h, c.k, c.stride, c.pad, c.dil) < 1 ||
        out_size(c.w, c.kw, c.sw, c.pw, c.dw) < 1) {
      --i;
      continue;
    }
    run_all(c, 1000 + i);
  }
}

// Realistic shapes and many tiles per image: a small tile budget forces tiles that start and end
// mid-row, output-channel splits, and several items per worker.
void test_tiling(bool quick) {
  struct S { int64_t cin, cout, hw, stride, n; };
  const std::vector<S> shapes =
      quick ? std::vector<S>{{16, 24, 15, 1, 1}, {24, 40, 14, 2, 2}, {64, 64, 7, 1, 1}}
            : std::vector<S>{{16, 24, 15, 1, 1}, {24, 40, 14, 2, 2}, {64, 64, 7, 1, 1},
                             {32, 64, 29, 1, 1}, {128, 256, 9, 2, 1}, {96, 100, 7, 1, 3},
                             {300, 50, 5, 1, 1}};
  for (size_t budget : {size_t(0), size_t(1), size_t(2048), size_t(20000)}) {
    lwk::detail::set_tile_budget_bytes(budget);
    for (const S& s : shapes) {
      for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
        for (int threads : {1, 2, 3}) {
          Case c{};
          c.n = s.n;
          c.cin = s.cin;
          c.cout = s.cout;
          c.h = s.hw;
          c.w = s.hw + 2;
          c.k = 3;
          c.stride = s.stride;
          c.dil = 3;
          c.pad = 3;
          c.layout = layout;
          c.dw_scale = c.dw_shift = c.pw_scale = c.pw_shift = true;
          c.residual = threads == 2;
          c.mid_act = Activation::kRelu;
          c.out_act = threads == 3 ? Activation::kRelu6 : Activation::kRelu;
          c.threads = threads;
          c.stats = threads != 2;
          for (Isa isa : isas_under_test()) run_case<float>(c, isa, 77 + threads);
          if (threads == 1) run_case<double>(c, Isa::kScalar, 77);
        }
      }
    }
  }
  lwk::detail::set_tile_budget_bytes(0);
}

// NCHW images whose tiles end in one to four pixel columns (the thin kernel's work), alone or
// after one to four 48-wide blocks, for every output-channel count up to 130: every remainder of
// the thin kernel's panel groups on every ISA, and on AVX-512 (fp32) the blocks that take those
// columns along themselves (ukernel_nchw_plus_one: 7x7, 2x49, 1x147 and 14x14, one column per
// block) next to tiles with more columns than blocks (1x51, 1x52). A group whose last panel is
// partial once lost all but its first panel.
void test_thin_columns(bool quick) {
  const Activation acts[5] = {Activation::kNone, Activation::kRelu, Activation::kRelu6,
                              Activation::kHardswish, Activation::kSilu};
  struct HW { int64_t h, w; };
  const HW images[] = {{1, 1}, {2, 1}, {1, 3}, {2, 2}, {7, 7}, {2, 25}, {1, 51}, {1, 52},
                       {2, 49}, {1, 147}, {14, 14}};
  for (int64_t cout = 1; cout <= 130; cout += quick ? 7 : 1) {
    int v = 0;
    for (const HW& hw : images) {
      ++v;
      Case c{};
      c.n = 1 + (cout + v) % 2;
      c.cin = 3 + (cout + v) % 5;
      c.cout = cout;
      c.h = hw.h;
      c.w = hw.w;
      c.k = 3;
      c.stride = 1;
      c.dil = 1;
      c.pad = 1;
      c.layout = Layout::kNCHW;
      c.pw_scale = c.pw_shift = c.dw_shift = true;
      c.residual = (cout + v) % 3 == 0;
      c.out_act = acts[(cout + v) % 5];
      c.threads = 1 + v % 2;
      c.stats = (cout + v) % 2 == 0;
      for (Isa isa : isas_under_test()) run_case<float>(c, isa, 500 + cout);
    }
  }
}

// NHWC depthwise in channel chunks (kernel_depthwise_nhwc.h): images whose row window is too
// wide for one sweep, with channel counts that leave a short last chunk and a masked tail on every
// ISA; clamping and non-clamping mid activations, one and two workers, with and without shared
// depthwise (whose per-worker channel ranges then get chunked or not).
void test_channel_chunks(bool quick) {
  struct K { int64_t k, stride, pad, dil; };
  const K kernels[] = {{5, 1, 2, 1}, {5, 2, 2, 1}, {3, 1, 2, 2}};
  for (int64_t cin : {int64_t(452), int64_t(1157)}) {
    if (quick && cin > 1000) continue;
    for (const K& k : kernels) {
      for (int threads : {1, 2}) {
        for (int shared : {-1, 1}) {
          Case c{};
          c.n = 2;
          c.cin = cin;
          c.cout = 24;
          c.h = 14;
          c.w = 15;
          c.k = k.k;
          c.stride = k.stride;
          c.pad = k.pad;
          c.dil = k.dil;
          c.layout = Layout::kNHWC;
          c.dw_scale = c.dw_shift = c.pw_scale = c.pw_shift = true;
          c.residual = k.stride == 1 && threads == 2;
          c.mid_act = shared == 1 ? Activation::kHardswish : Activation::kRelu6;
          c.out_act = Activation::kRelu;
          c.threads = threads;
          lwk::detail::set_shared_depthwise(shared);
          run_all(c, 900 + cin + k.k);
        }
      }
    }
  }
  lwk::detail::set_shared_depthwise(-1);
}

// Runs of inside pixels in the NHWC depthwise (kernel_depthwise_nhwc.h): rows wide enough for
// whole groups of 8, 4 and 2 pixels and a rest, channel counts that take every channel group (4, 2
// and 1 vectors and a masked tail on each ISA), dilated and strided, 3x3 (unrolled) and 5x5.
void test_nhwc_inside_runs(bool quick) {
  struct K { int64_t k, stride, dil; };
  const K kernels[] = {{3, 1, 1}, {3, 1, 3}, {3, 2, 2}, {5, 1, 1}};
  for (int64_t cin : {int64_t(16), int64_t(48), int64_t(117)}) {
    for (const K& k : kernels) {
      for (int threads : {1, 2}) {
        if (quick && threads == 2 && cin != 117) continue;
        Case c{};
        c.n = 1;
        c.cin = cin;
        c.cout = 20;
        c.h = 7;
        c.w = 37;
        c.k = k.k;
        c.stride = k.stride;
        c.pad = k.dil * (k.k - 1) / 2;
        c.dil = k.dil;
        c.layout = Layout::kNHWC;
        c.dw_scale = c.dw_shift = c.pw_shift = true;
        c.mid_act = Activation::kRelu;
        c.out_act = Activation::kNone;
        c.threads = threads;
        run_all(c, 1300 + cin + k.k * 10 + k.dil);
      }
    }
  }
}

// One large block per layout (wide K exercises long accumulation chains).
void test_large(bool quick) {
  if (quick) return;
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
    Case c{};
    c.n = 1;
    c.cin = 1024;
    c.cout = 1030;
    c.h = c.w = 7;
    c.k = 3;
    c.stride = 1;
    c.dil = 3;
    c.pad = 3;
    c.layout = layout;
    c.pw_scale = c.pw_shift = true;
    c.out_act = Activation::kRelu;
    c.threads = 2;
    c.stats = true;
    for (Isa isa : isas_under_test()) run_case<float>(c, isa, 5);
  }
}

template <typename Fn>
bool throws_invalid(Fn&& fn, const char* must_contain) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    if (must_contain && std::strstr(e.what(), must_contain) == nullptr) {
      std::fprintf(stderr, "message '%s' lacks '%s'\n", e.what(), must_contain);
      return false;
    }
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

JointGeometry small_geometry(Layout layout) {
  JointGeometry g;
  g.batch = 1;
  g.in_channels = 4;
  g.in_h = g.in_w = 6;
  g.out_channels = 5;
  g.kernel_h = g.kernel_w = 3;
  g.pad_h = g.pad_w = 1;
  g.out_h = g.out_w = 6;
  g.layout = layout;
  return g;
}

void test_validation() {
  JointGeometry g = small_geometry(Layout::kNCHW);
  CHECK(lwk::validate(g).empty(), "valid geometry rejected: %s", lwk::validate(g).c_str());
  auto bad = [&](auto mutate, const char* word) {
    JointGeometry b = g;
    mutate(b);
    const std::string m = lwk::validate(b);
    CHECK(!m.empty() && m.find(word) != std::string::npos,
          "validate should reject with a message containing '%s', got '%s'", word, m.c_str());
  };
  bad([](JointGeometry& b) { b.batch = -1; }, "batch");
  bad([](JointGeometry& b) { b.in_channels = 0; }, "in_channels");
  bad([](JointGeometry& b) { b.out_channels = 0; }, "out_channels");
  bad([](JointGeometry& b) { b.in_h = 0; }, "height");
  bad([](JointGeometry& b) { b.kernel_w = 0; }, "kernel");
  bad([](JointGeometry& b) { b.stride_h = 0; }, "stride");
  bad([](JointGeometry& b) { b.dil_w = 0; }, "dilation");
  bad([](JointGeometry& b) { b.pad_h = -1; }, "padding");
  bad([](JointGeometry& b) { b.out_h = 7; }, "output size");
  bad([](JointGeometry& b) { b.out_w = 0; }, "output size");
  bad([](JointGeometry& b) { b.layout = static_cast<Layout>(7); }, "layout");
  bad([](JointGeometry& b) {  // dilated kernel 1 + 3*4 = 13 > 6 + 2
        b.dil_h = b.dil_w = 4;
        b.kernel_h = b.kernel_w = 5;
      }, "larger than the padded input");
  bad([](JointGeometry& b) { b.in_h = int64_t(1) << 40; }, "2^30");
  {  // H smaller than the dilated kernel but padding makes it fit: legal.
    JointGeometry b = g;
    b.in_h = b.in_w = 2;
    b.dil_h = b.dil_w = 5;
    b.pad_h = b.pad_w = 5;
    b.out_h = b.out_w = 2;
    CHECK(lwk::validate(b).empty(), "small input with padding rejected: %s",
          lwk::validate(b).c_str());
  }

  std::vector<float> w(20, 0.5f), x(144, 1.0f), dw(36, 1.0f), y(180, 0.0f);
  auto p = lwk::pack_pointwise<float>(Isa::kScalar, Layout::kNCHW, w.data(), 5, 4);
  lwk::JointTensors<float> t;
  t.x = x.data();
  t.dw_weight = dw.data();
  t.y = y.data();
  CHECK(throws_invalid([&] {
          JointGeometry b = g;
          b.out_h = 3;
          lwk::joint_forward<float>(*p, b, t, 1);
        }, "output size"), "joint_forward must reject a bad geometry");
  CHECK(throws_invalid([&] {
          JointGeometry b = g;
          b.layout = Layout::kNHWC;
          lwk::joint_forward<float>(*p, b, t, 1);
        }, "layout"), "joint_forward must reject a layout mismatch");
  CHECK(throws_invalid([&] {
          JointGeometry b = g;
          b.out_channels = 6;
          lwk::joint_forward<float>(*p, b, t, 1);
        }, "channels"), "joint_forward must reject a channel mismatch");
  CHECK(throws_invalid([&] {
          JointGeometry b = g;
          b.in_channels = 3;
          lwk::joint_forward<float>(*p, b, t, 1);
        }, "channels"), "joint_forward must reject an in_channels mismatch");
  CHECK(throws_invalid([&] {
          lwk::JointTensors<float> u = t;
          u.x = nullptr;
          lwk::joint_forward<float>(*p, g, u, 1);
        }, "x"), "joint_forward must reject a null x");
  CHECK(throws_invalid([&] {
          lwk::JointTensors<float> u = t;
          u.out_act = static_cast<Activation>(9);
          lwk::joint_forward<float>(*p, g, u, 1);
        }, "out_act"), "joint_forward must reject an unknown activation");
  CHECK(throws_invalid([&] { lwk::pack_pointwise<float>(Isa::kScalar, Layout::kNCHW, w.data(), 0, 4); },
                       "out_channels"), "pack_pointwise must reject zero channels");
  CHECK(throws_invalid([&] { lwk::pack_pointwise<float>(Isa::kScalar, Layout::kNCHW, nullptr, 5, 4); },
                       "null"), "pack_pointwise must reject a null weight");
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (!lwk::isa_supported(isa)) {
      CHECK(throws_invalid([&] { lwk::pack_pointwise<float>(isa, Layout::kNCHW, w.data(), 5, 4); },
                           "not supported"), "pack_pointwise must reject an unsupported ISA");
    }
  }
  // double packs report the scalar path whatever was asked.
  std::vector<double> wd(20, 0.5);
  auto pd = lwk::pack_pointwise<double>(lwk::best_isa(), Layout::kNHWC, wd.data(), 5, 4);
  CHECK(pd->isa() == Isa::kScalar && pd->layout() == Layout::kNHWC && pd->out_channels() == 5 &&
            pd->in_channels() == 4, "double packing metadata");
  auto pf = lwk::pack_pointwise<float>(lwk::best_isa(), Layout::kNHWC, w.data(), 5, 4);
  CHECK(pf->isa() == lwk::best_isa(), "float packing keeps the requested ISA");
  CHECK(std::string(lwk::isa_name(Isa::kAvx2)) == "avx2", "isa_name");
  CHECK(std::string(lwk::isa_name(Isa::kAvx512)) == "avx512", "isa_name");
  CHECK(lwk::isa_supported(Isa::kScalar), "scalar is always supported");
  CHECK(lwk::isa_supported(lwk::best_isa()), "best_isa is supported");

  std::vector<double> sums(5, -1.0), sqs(5, -1.0);
  CHECK(throws_invalid([&] {
          lwk::JointTensors<float> u = t;
          u.y_sum = sums.data();
          lwk::joint_forward<float>(*p, g, u, 1);
        }, "y_sum and y_sumsq"), "joint_forward must reject y_sum without y_sumsq");
  std::vector<float> other(180, 0.0f);
  CHECK(throws_invalid([&] {
          lwk::JointTensors<float> u = t;
          u.y_transposed = true;
          u.residual = other.data();
          lwk::joint_forward<float>(*p, g, u, 1);
        }, "y_transposed"), "joint_forward must reject y_transposed with a residual");
  CHECK(throws_invalid([&] {
          lwk::JointTensors<float> u = t;
          u.y_transposed = true;
          u.y_sum = sums.data();
          u.y_sumsq = sqs.data();
          lwk::joint_forward<float>(*p, g, u, 1);
        }, "y_transposed"), "joint_forward must reject y_transposed with statistics");

  // Batch 0: nothing is read or written (null tensors are fine); statistics are all zero.
  {
    JointGeometry b = g;
    b.batch = 0;
    lwk::JointTensors<float> u;
    lwk::joint_forward<float>(*p, b, u, 2);
    u.y_sum = sums.data();
    u.y_sumsq = sqs.data();
    lwk::joint_forward<float>(*p, b, u, 2);
    bool zero = true;
    for (int o = 0; o < 5; ++o) zero = zero && sums[o] == 0.0 && sqs[o] == 0.0;
    CHECK(zero, "batch 0 must overwrite the statistics with zeros");
  }
}

// Several threads call joint_forward at once, each with several workers: results must match a
// single-threaded run and nothing may deadlock.
void test_concurrency(bool quick) {
  const int callers = 4, reps = quick ? 3 : 20;
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
    JointGeometry g;
    g.batch = 2;
    g.in_channels = 24;
    g.in_h = g.in_w = 17;
    g.out_channels = 40;
    g.kernel_h = g.kernel_w = 3;
    g.dil_h = g.dil_w = 3;
    g.pad_h = g.pad_w = 3;
    g.out_h = g.out_w = 17;
    g.layout = layout;
    Rng r(9);
    auto x = random_vec<float>(r, 2 * 24 * 17 * 17, -1, 1);
    auto dw = random_vec<float>(r, 24 * 9, -1, 1);
    auto w = random_vec<float>(r, 40 * 24, -1, 1);
    const size_t ysize = 2 * 40 * 17 * 17;
    auto packed = lwk::pack_pointwise<float>(lwk::best_isa(), layout, w.data(), 40, 24);
    lwk::JointTensors<float> t;
    t.x = x.data();
    t.dw_weight = dw.data();
    t.out_act = Activation::kRelu;
    std::vector<float> want(ysize);
    t.y = want.data();
    lwk::joint_forward<float>(*packed, g, t, 1);
    std::atomic<int> mismatches{0};
    std::vector<std::thread> ths;
    for (int i = 0; i < callers; ++i) {
      ths.emplace_back([&, i] {
        std::vector<float> y(ysize);
        lwk::JointTensors<float> u = t;
        u.y = y.data();
        for (int rep = 0; rep < reps; ++rep) {
          std::fill(y.begin(), y.end(), std::numeric_limits<float>::quiet_NaN());
          lwk::joint_forward<float>(*packed, g, u, 1 + (i + rep) % 3);
          // Same tiling per thread count is not guaranteed, so compare with a tolerance.
          for (size_t j = 0; j < ysize; ++j) {
            if (!(std::fabs(y[j] - want[j]) <= 1e-4f * (1.0f + std::fabs(want[j])))) {
              ++mismatches;
              break;
            }
          }
        }
      });
    }
    for (auto& th : ths) th.join();
    CHECK(mismatches.load() == 0, "concurrent calls produced %d mismatching results",
          mismatches.load());
  }
}

// residual may alias y (y = f(x) + y, in place).
void test_residual_in_place() {
  for (Isa isa : isas_under_test()) {
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      JointGeometry g = small_geometry(layout);
      g.batch = 2;
      g.in_channels = 7;
      g.out_channels = 19;
      g.in_h = g.in_w = 9;
      g.out_h = g.out_w = 9;
      Rng r(3);
      auto x = random_vec<float>(r, 2 * 7 * 81, -1, 1);
      auto dw = random_vec<float>(r, 7 * 9, -1, 1);
      auto w = random_vec<float>(r, 19 * 7, -1, 1);
      auto res = random_vec<float>(r, 2 * 19 * 81, -1, 1);
      auto packed = lwk::pack_pointwise<float>(isa, layout, w.data(), 19, 7);
      std::vector<float> want(res.size()), inplace = res;
      lwk::JointTensors<float> t;
      t.x = x.data();
      t.dw_weight = dw.data();
      t.residual = res.data();
      t.out_act = Activation::kRelu;
      t.y = want.data();
      lwk::joint_forward<float>(*packed, g, t, 2);
      t.residual = inplace.data();
      t.y = inplace.data();
      lwk::joint_forward<float>(*packed, g, t, 2);
      CHECK(inplace == want, "[%s] residual aliasing y changed the result", lwk::isa_name(isa));
    }
  }
}

// Non-finite inputs propagate like PyTorch (NaN through relu stays NaN).
void test_nan_propagation() {
  for (Isa isa : isas_under_test()) {
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      JointGeometry g = small_geometry(layout);
      g.in_channels = 1;
      g.out_channels = 16;
      std::vector<float> x(36, 1.0f), dw(9, 1.0f), w(16, 1.0f), y(16 * 36, 0.0f);
      x[14] = std::numeric_limits<float>::quiet_NaN();  // pixel (2, 2)
      auto packed = lwk::pack_pointwise<float>(isa, layout, w.data(), 16, 1);
      lwk::JointTensors<float> t;
      t.x = x.data();
      t.dw_weight = dw.data();
      t.mid_act = Activation::kRelu;
      t.out_act = Activation::kRelu6;
      t.y = y.data();
      lwk::joint_forward<float>(*packed, g, t, 1);
      const int64_t p = 2 * 6 + 2;
      const float v = layout == Layout::kNCHW ? y[5 * 36 + p] : y[p * 16 + 5];
      const float u = layout == Layout::kNCHW ? y[5 * 36 + 35] : y[35 * 16 + 5];
      CHECK(std::isnan(v), "[%s] NaN must propagate through relu/relu6, got %g",
            lwk::isa_name(isa), v);
      CHECK(u == 4.0f, "[%s] corner value should be 4, got %g", lwk::isa_name(isa), u);
    }
  }
}

// A NaN depthwise weight makes every output of its channel NaN, borders included: zero padding
// multiplies the padded taps by the weight (NaN * 0 = NaN) even where a kernel skips them.
void test_nan_weight_poisons_channel() {
  for (Isa isa : isas_under_test()) {
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      JointGeometry g = small_geometry(layout);
      g.in_channels = 2;
      g.out_channels = 1;
      std::vector<float> x(2 * 36, 1.0f), dw(18, 1.0f), w(2, 1.0f), y(36, 0.0f);
      w[1] = 0.0f;         // output = depthwise channel 0 (+ 0 * channel 1, which stays finite)
      dw[8] = std::nanf("");  // channel 0, bottom-right tap: in the padding for the last row/column
      auto packed = lwk::pack_pointwise<float>(isa, layout, w.data(), 1, 2);
      lwk::JointTensors<float> t;
      t.x = x.data();
      t.dw_weight = dw.data();
      t.out_act = Activation::kRelu;
      t.y = y.data();
      std::vector<float> folded_w, folded_b;
      if (g_prefold) fold_for_call(g, t, folded_w, folded_b);
      lwk::joint_forward<float>(*packed, g, t, 1);
      for (int p = 0; p < 36; ++p)
        CHECK(std::isnan(y[p]), "[%s %s] pixel %d: a NaN depthwise weight must give NaN, got %g",
              lwk::isa_name(isa), layout == Layout::kNCHW ? "nchw" : "nhwc", p, y[p]);
    }
  }
}

// An infinite pointwise weight affects its own output channel only. The thin kernel's vector
// loads run past a weight panel (AVX-512 reads the next panel's first row with the last k of an
// odd K), and a lane that multiplies what it read there by zero would turn Inf into NaN.
void test_inf_weight_isolated() {
  for (Isa isa : isas_under_test()) {
    JointGeometry g = small_geometry(Layout::kNCHW);
    g.in_channels = 3;
    g.out_channels = 16;
    g.in_h = g.in_w = g.out_h = g.out_w = 1;  // one pixel: a thin column
    std::vector<float> x(3, 1.0f), dw(27, 1.0f), w(16 * 3, 1.0f), y(16, 0.0f);
    w[8 * 3 + 0] = std::numeric_limits<float>::infinity();
    auto packed = lwk::pack_pointwise<float>(isa, Layout::kNCHW, w.data(), 16, 3);
    lwk::JointTensors<float> t;
    t.x = x.data();
    t.dw_weight = dw.data();
    t.y = y.data();
    lwk::joint_forward<float>(*packed, g, t, 1);
    for (int co = 0; co < 16; ++co) {
      const bool ok = co == 8 ? std::isinf(y[co]) : y[co] == 3.0f;
      CHECK(ok, "[%s] channel %d: got %g, want %s", lwk::isa_name(isa), co, y[co],
            co == 8 ? "inf" : "3");
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// The activations and the vector exp of every path, element by element (IsaOps test hooks).

// Distance in units in the last place between two floats of the same sign (subnormals included).
int64_t ulp_distance(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if (ia < 0) ia = std::numeric_limits<int32_t>::min() - ia;
  if (ib < 0) ib = std::numeric_limits<int32_t>::min() - ib;
  return std::llabs(int64_t(ia) - int64_t(ib));
}

// exp_vec (vec_math.h) within 2 ulp of the correctly rounded e^x over the whole float range:
// overflow to +inf, subnormal results, underflow to 0, and NaN/+-inf, on every path.
void test_exp() {
  std::vector<float> x;
  for (double v = -110.0; v <= 95.0; v += 0.000977) x.push_back(float(v));
  const float specials[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-45f, 88.72283f, 88.722839f, 88.7228394f,
                            88.72284f, 89.0f, 100.0f, -87.33654f, -87.3366f, -103.27893f, -103.972f,
                            -104.0f, -150.0f, std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  for (float v : specials) x.push_back(v);
  x.push_back(0.5f);  // an odd count: the last element goes through the padded vector
  std::vector<float> y(x.size());
  for (Isa isa : isas_under_test()) {
    lwk::detail::ops_for<float>(isa)->exp_n(x.data(), y.data(), int64_t(x.size()));
    int64_t worst = 0, bad = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const float want = float(std::exp(double(x[i])));  // rounded once from double: correctly rounded here
      bool ok;
      if (std::isnan(x[i])) {
        ok = std::isnan(y[i]);
      } else if (std::isinf(want) || want == 0.0f) {
        ok = y[i] == want || ulp_distance(y[i], want) <= 2;
      } else {
        const int64_t d = std::signbit(y[i]) ? 1 << 30 : ulp_distance(y[i], want);
        worst = std::max(worst, d);
        ok = d <= 2;
      }
      if (!ok && bad++ < 3) {
        std::fprintf(stderr, "FAIL exp [%s] x=%.9g: got %.9g want %.9g\n", lwk::isa_name(isa),
                     double(x[i]), double(y[i]), double(want));
      }
    }
    CHECK(bad == 0, "exp [%s]: %lld of %zu values off by more than 2 ulp", lwk::isa_name(isa),
          (long long)bad, x.size());
    std::printf("  exp [%s]: worst %lld ulp over %zu values\n", lwk::isa_name(isa), (long long)worst,
                x.size());
    ++g_cases;
  }
}

// Every activation of every path on values around its kinks, on large magnitudes and on NaN and
// +-inf, against the double-precision rules (act_ref): non-finite results exactly (NaN for NaN,
// the same infinity), finite ones within 4 ulp, or within the smallest normal float where the
// float formula flushes what double still resolves (silu(-95) is -0 in float, -5e-40 in double).
void test_activation_values() {
  std::vector<float> x = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(), -3.0f, 3.0f, std::nextafter(-3.0f, 0.0f),
                          std::nextafter(3.0f, 0.0f), 0.0f, -0.0f, 6.0f, -6.0f, 1e-30f, -1e-30f,
                          88.8f, -88.0f, -89.0f, -95.0f, -100.0f, 100.0f, 1e30f, -1e30f,
                          std::numeric_limits<float>::max(), -std::numeric_limits<float>::max()};
  for (double v = -12.0; v <= 12.0; v += 0.0371) x.push_back(float(v));
  for (Isa isa : isas_under_test()) {
    for (Activation a : {Activation::kNone, Activation::kRelu, Activation::kRelu6, Activation::kHardswish,
                         Activation::kSilu}) {
      std::vector<float> y = x;
      lwk::detail::ops_for<float>(isa)->activate_n(a, y.data(), int64_t(y.size()));
      int bad = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        const double want = act_ref(double(x[i]), a, true);
        const double got = y[i];
        bool ok;
        if (std::isnan(want)) ok = std::isnan(got);
        else if (std::isinf(want)) ok = got == want;
        else ok = std::fabs(got - want) <= 4.0 * std::numeric_limits<float>::epsilon() * std::fabs(want) ||
                  std::fabs(got - want) <= std::numeric_limits<float>::min();
        if (!ok && bad++ < 3) {
          std::fprintf(stderr, "FAIL activation %d [%s] x=%.9g: got %.9g want %.9g\n", int(a),
                       lwk::isa_name(isa), double(x[i]), got, want);
        }
      }
      CHECK(bad == 0, "activation %d [%s]: %d values wrong", int(a), lwk::isa_name(isa), bad);
      ++g_cases;
    }
  }
  // double runs the scalar path: within 4 ulp of double.
  std::vector<double> xd(x.begin(), x.end());
  for (Activation a : {Activation::kHardswish, Activation::kSilu}) {
    std::vector<double> y = xd;
    lwk::detail::ops_for<double>(Isa::kScalar)->activate_n(a, y.data(), int64_t(y.size()));
    int bad = 0;
    for (size_t i = 0; i < xd.size(); ++i) {
      const double want = act_ref(xd[i], a);
      const bool ok = std::isnan(want) ? std::isnan(y[i])
                      : std::isinf(want) ? y[i] == want
                                         : std::fabs(y[i] - want) <= 4.0 * std::numeric_limits<double>::epsilon() *
                                                                          std::fabs(want);
      if (!ok) ++bad;
    }
    CHECK(bad == 0, "activation %d [scalar f64]: %d values wrong", int(a), bad);
  }
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // keep progress and failure lines in order
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
  }
  std::printf("ISAs under test:");
  for (Isa i : isas_under_test()) std::printf(" %s", lwk::isa_name(i));
  std::printf(" (+ f64 scalar)%s\n", quick ? ", quick grid" : "");
  try {
    test_validation();
    test_exp();
    test_activation_values();
    test_nan_propagation();
    test_nan_weight_poisons_channel();
    test_inf_weight_isolated();
    test_residual_in_place();
    test_grid(quick);
    test_random(quick ? 40 : 300);
    test_tiling(quick);
    test_thin_columns(quick);
    test_channel_chunks(quick);
    test_nhwc_inside_runs(quick);
    // The NCHW direct depthwise path (used when the padded plane would be too large).
    lwk::detail::set_plane_limit_elems(0);
    test_random(quick ? 20 : 100);
    lwk::detail::set_plane_limit_elems(-1);
    // Shared-depthwise mode wherever several workers run (the cost model picks it only for few
    // tiles split by output channels).
    lwk::detail::set_shared_depthwise(1);
    test_random(quick ? 40 : 200);
    test_tiling(quick);
    lwk::detail::set_shared_depthwise(-1);
    test_large(quick);
    test_concurrency(quick);
    // Depthwise weights folded by the caller (JointTensors::dw_folded), as a CallSequence does.
    g_prefold = true;
    test_nan_weight_poisons_channel();
    test_random(quick ? 40 : 150);
    g_prefold = false;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
    return 1;
  }
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) FAILED over %lld kernel runs\n", g_failures,
                 (long long)g_cases);
    return 1;
  }
  std::printf("all checks passed (%lld kernel runs)\n", (long long)g_cases);
  return 0;
}
