// Standalone micro-benchmark of the fused inverted-residual CPU kernel (no Python, no torch).
//
//   bench_inverted_residual [--threads N] [--isa scalar|avx2|avx512|neon] [--reps R]
//                           [--layout nchw|nhwc] [--batch N] [--budget BYTES]
//                           [--copies N] [--fold once|per-call] [--shape CIN,EXPAND,COUT,S,HW,K]...
// Each shape is an inverted residual: 1x1 expand CIN -> CIN*EXPAND (ReLU), K x K depthwise of
// stride S on an HW x HW input (ReLU, "same" padding), 1x1 project to COUT, plus the input when S
// is 1 and COUT == CIN. Without --shape: MNASNet's and MobileNetV2's late blocks (7 x 7 and 14 x 14
// outputs). Prints the median time of R repetitions (after warm-up), the fastest, and GFLOP/s of
// the three convolutions. --copies N gives the shape N sets of weights and tensors, used in turn,
// so that with enough of them every call finds its weights in L3 rather than L2, as inside a model.
// --fold once folds the depthwise weights before timing, as a native sequence does when it binds
// a call (per-call, the default: every call folds them first, as a single op call does).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "inverted_residual.h"
#include "joint_block.h"

namespace {

int g_copies = 1;
bool g_fold_once = false;

struct Shape {
  int64_t cin, expand, cout, stride, hw, k;
};

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Median and minimum wall time of `reps` calls after warm-up.
template <typename Fn>
std::pair<double, double> time_ms(int reps, Fn&& fn) {
  for (int i = 0; i < 5; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double a = now_ms();
    fn();
    t.push_back(now_ms() - a);
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front()};
}

void run_shape(const Shape& s, int64_t batch, lwk::Layout layout, lwk::Isa isa, int threads,
               int reps) {
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> u(-1, 1);
  lwk::InvertedResidualGeometry g;
  g.batch = batch;
  g.in_channels = s.cin;
  g.expanded_channels = s.cin * s.expand;
  g.out_channels = s.cout;
  g.in_h = g.in_w = s.hw;
  g.kernel_h = g.kernel_w = s.k;
  g.stride_h = g.stride_w = s.stride;
  g.pad_h = g.pad_w = (s.k - 1) / 2;
  g.out_h = g.out_w = (s.hw - 1) / s.stride + 1;
  g.layout = layout;
  const int64_t ce = g.expanded_channels, npix = g.out_h * g.out_w;
  auto random = [&](int64_t n) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& e : v) e = u(gen);
    return v;
  };
  struct Copy {
    std::vector<float> x, we, wp, dw, es, eb, ds, db, ps, pb, y, dw_folded, db_folded;
    std::shared_ptr<const lwk::PackedPointwise<float>> packed_e, packed_p;
    lwk::InvertedResidualTensors<float> t;
  };
  std::vector<Copy> copies(static_cast<std::size_t>(std::max(1, g_copies)));
  for (Copy& c : copies) {
    c.x = random(batch * s.cin * s.hw * s.hw);
    c.we = random(ce * s.cin);
    c.wp = random(s.cout * ce);
    c.dw = random(ce * s.k * s.k);
    // Scales near 1/fan-in keep the activations of order 1 (no overflow into inf).
    c.es.assign(ce, 1.0f / float(s.cin));
    c.eb = random(ce);
    c.ds.assign(ce, 1.0f / float(s.k));
    c.db = random(ce);
    c.ps.assign(s.cout, 1.0f / float(ce));
    c.pb = random(s.cout);
    c.y.resize(static_cast<std::size_t>(batch * s.cout * npix));
    c.packed_e = lwk::pack_pointwise<float>(isa, layout, c.we.data(), ce, s.cin);
    c.packed_p = lwk::pack_pointwise<float>(isa, layout, c.wp.data(), s.cout, ce);
    lwk::InvertedResidualTensors<float>& t = c.t;
    t.x = c.x.data();
    t.expand_scale = c.es.data();
    t.expand_shift = c.eb.data();
    t.expand_act = lwk::Activation::kRelu;
    t.dw_weight = c.dw.data();
    t.dw_scale = c.ds.data();
    t.dw_shift = c.db.data();
    t.mid_act = lwk::Activation::kRelu;
    t.project_scale = c.ps.data();
    t.project_shift = c.pb.data();
    if (g_fold_once) {  // as a native sequence does when it binds the call
      c.dw_folded.resize(c.dw.size());
      c.db_folded.resize(c.db.size());
      lwk::fold_depthwise<float>(layout, ce, s.k * s.k, c.dw.data(), c.ds.data(), c.db.data(),
                                 c.dw_folded.data(), c.db_folded.data());
      t.dw_weight = c.dw_folded.data();
      t.dw_scale = nullptr;
      t.dw_shift = c.db_folded.data();
      t.dw_folded = true;
    }
    t.residual = (s.stride == 1 && s.cout == s.cin) ? c.x.data() : nullptr;
    t.y = c.y.data();
  }
  std::size_t next = 0;
  const auto [med, fastest] = time_ms(reps, [&] {
    const Copy& c = copies[next];
    next = (next + 1) % copies.size();
    lwk::inverted_residual_forward<float>(*c.packed_e, *c.packed_p, g, c.t, threads);
  });
  const double flops =
      2.0 * batch * ce * (double(s.hw * s.hw) * s.cin + double(npix) * (s.cout + s.k * s.k));
  std::printf("%s %4lld->%4lld->%4lld k%lld s%lld %3lld : %7.3f ms (min %.3f) %6.1f GFLOP/s\n",
              layout == lwk::Layout::kNHWC ? "nhwc" : "nchw", (long long)s.cin, (long long)ce,
              (long long)s.cout, (long long)s.k, (long long)s.stride, (long long)s.hw, med, fastest,
              flops / med * 1e-6);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, reps = 200;
  int64_t batch = 1;
  lwk::Isa isa = lwk::best_isa();
  std::vector<lwk::Layout> layouts = {lwk::Layout::kNHWC, lwk::Layout::kNCHW};
  std::vector<Shape> shapes;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--threads") threads = std::atoi(v.c_str());
    else if (k == "--reps") reps = std::max(1, std::atoi(v.c_str()));
    else if (k == "--copies") g_copies = std::max(1, std::atoi(v.c_str()));
    else if (k == "--fold") g_fold_once = v == "once";
    else if (k == "--batch") batch = std::atoll(v.c_str());
    else if (k == "--budget") lwk::set_expand_band_budget_bytes(std::strtoull(v.c_str(), nullptr, 10));
    else if (k == "--isa") isa = v == "scalar" ? lwk::Isa::kScalar : v == "neon" ? lwk::Isa::kNeon : v == "avx512" ? lwk::Isa::kAvx512 : lwk::Isa::kAvx2;
    else if (k == "--layout") layouts = {v == "nchw" ? lwk::Layout::kNCHW : lwk::Layout::kNHWC};
    else if (k == "--shape") {
      Shape s{};
      if (std::sscanf(v.c_str(), "%lld,%lld,%lld,%lld,%lld,%lld", (long long*)&s.cin,
                      (long long*)&s.expand, (long long*)&s.cout, (long long*)&s.stride,
                      (long long*)&s.hw, (long long*)&s.k) != 6) {
        std::fprintf(stderr, "--shape wants CIN,EXPAND,COUT,S,HW,K, got %s\n", v.c_str());
        return 2;
      }
      shapes.push_back(s);
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (!lwk::isa_supported(isa)) {
    std::fprintf(stderr, "ISA %s is not supported here\n", lwk::isa_name(isa));
    return 2;
  }
  if (shapes.empty()) {
    shapes = {{192, 6, 192, 1, 7, 5}, {96, 6, 192, 2, 14, 5}, {192, 6, 320, 1, 7, 3},
              {160, 6, 160, 1, 7, 3},  {80, 6, 80, 1, 14, 5},  {80, 6, 96, 1, 14, 3}};
  }
  std::printf("isa=%s threads=%d batch=%lld reps=%d\n", lwk::isa_name(isa), threads,
              (long long)batch, reps);
  for (lwk::Layout layout : layouts) {
    for (const Shape& s : shapes) run_shape(s, batch, layout, isa, threads, reps);
  }
  return 0;
}
