// Standalone micro-benchmark of the fused CPU kernel on the seed network's joint blocks
// (batch 1, k = 3, dilation 3, "same" padding), both layouts, plus the 9-block LightweightNet chain.
//
//   bench_kernels [--threads N] [--isa scalar|avx2|avx512|neon] [--reps R] [--layout nchw|nhwc]
//                 [--budget BYTES] [--batch N] [--shared-dw -1|0|1] [--plane-limit ELEMS]
//                 [--shape CIN,COUT,S,HW]... [--as-chain] [--kernel K] [--dilation D]
//                 [--mid-act ACT] [--out-act ACT]   (none|relu|relu6|hardswish|silu; default
//                 none and relu)
// Prints the median time of R repetitions per shape (after warm-up) and GFLOP/s. --as-chain runs
// the --shape blocks back to back (each reading the previous one's output where the sizes agree)
// and times each inside the chain, where the previous blocks have evicted its weights and input
// from the caches (MobileNetV1's 13 blocks: --dilation 1 and the shapes of its table).
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "internal.h"
#include "joint_block.h"

namespace {

struct Shape {
  int64_t cin, cout, stride, hw;
};

// 64-byte aligned like PyTorch's CPU tensors: std::vector's large blocks come from malloc at 16
// bytes past a page, which splits every vector load across two cache lines and made the NHWC
// depthwise measure slower than it runs on real tensors.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
using FloatBuffer = std::vector<float, Aligned64<float>>;

struct Block {
  lwk::JointGeometry g;
  FloatBuffer x, dw, w, sc, sh, y;
  std::shared_ptr<const lwk::PackedPointwise<float>> packed;
  lwk::JointTensors<float> t;
  double flops = 0;
};

lwk::Activation g_mid_act = lwk::Activation::kNone;
lwk::Activation g_out_act = lwk::Activation::kRelu;
int64_t g_dil = 3;
int64_t g_kernel = 3;
bool g_as_chain = false;

lwk::Activation act_of(const std::string& v) {
  if (v == "relu") return lwk::Activation::kRelu;
  if (v == "relu6") return lwk::Activation::kRelu6;
  if (v == "hardswish") return lwk::Activation::kHardswish;
  if (v == "silu") return lwk::Activation::kSilu;
  return lwk::Activation::kNone;
}

void make_block(Block& b, const Shape& s, int64_t batch, lwk::Layout layout, lwk::Isa isa,
                std::mt19937& gen) {
  std::uniform_real_distribution<float> u(-1, 1);
  auto& g = b.g;
  g.batch = batch;
  g.in_channels = s.cin;
  g.in_h = g.in_w = s.hw;
  g.out_channels = s.cout;
  g.kernel_h = g.kernel_w = g_kernel;
  g.stride_h = g.stride_w = s.stride;
  g.pad_h = g.pad_w = g_dil * (g_kernel - 1) / 2;
  g.dil_h = g.dil_w = g_dil;
  g.out_h = g.out_w = (s.hw - 1) / s.stride + 1;
  g.layout = layout;
  const int64_t npix = g.out_h * g.out_w;
  b.x.resize(batch * s.cin * s.hw * s.hw);
  b.dw.resize(s.cin * g_kernel * g_kernel);
  b.w.resize(s.cout * s.cin);
  b.sc.resize(s.cout);
  b.sh.resize(s.cout);
  b.y.resize(batch * s.cout * npix);
  for (auto* v : {&b.x, &b.dw, &b.w, &b.sc, &b.sh}) {
    for (auto& e : *v) e = u(gen);
  }
  b.packed = lwk::pack_pointwise<float>(isa, layout, b.w.data(), s.cout, s.cin);
  b.t.x = b.x.data();
  b.t.dw_weight = b.dw.data();
  b.t.pw_scale = b.sc.data();
  b.t.pw_shift = b.sh.data();
  b.t.mid_act = g_mid_act;
  b.t.out_act = g_out_act;
  b.t.y = b.y.data();
  b.flops = 2.0 * batch * npix * s.cin * (s.cout + g_kernel * g_kernel);
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double g_last_min = 0;  // minimum of the last median_ms() call

// Median wall time of `reps` calls after warm-up (the minimum goes to g_last_min: on a shared,
// noisy machine it is the better estimate of undisturbed speed).
template <typename Fn>
double median_ms(int reps, Fn&& fn) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double a = now_ms();
    fn();
    t.push_back(now_ms() - a);
  }
  std::sort(t.begin(), t.end());
  g_last_min = t.front();
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, reps = 50;
  int64_t batch = 1;
  lwk::Isa isa = lwk::best_isa();
  std::vector<lwk::Layout> layouts = {lwk::Layout::kNCHW, lwk::Layout::kNHWC};
  std::vector<Shape> only;
  bool chain_only = false;
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i], v = i + 1 < argc ? argv[i + 1] : "";
    if (k == "--as-chain") {
      g_as_chain = true;
      --i;
      continue;
    }
    if (k == "--chain-only") {
      chain_only = true;
      --i;
      continue;
    }
    if (k == "--threads") threads = std::atoi(v.c_str());
    else if (k == "--dilation") g_dil = std::atoll(v.c_str());
    else if (k == "--kernel") g_kernel = std::atoll(v.c_str());
    else if (k == "--reps") reps = std::atoi(v.c_str());
    else if (k == "--batch") batch = std::atoll(v.c_str());
    else if (k == "--budget") lwk::detail::set_tile_budget_bytes(std::strtoull(v.c_str(), nullptr, 10));
    else if (k == "--shared-dw") lwk::detail::set_shared_depthwise(std::atoi(v.c_str()));
    else if (k == "--plane-limit") lwk::detail::set_plane_limit_elems(std::atoll(v.c_str()));
    else if (k == "--isa") isa = v == "scalar" ? lwk::Isa::kScalar : v == "neon" ? lwk::Isa::kNeon : v == "avx512" ? lwk::Isa::kAvx512 : lwk::Isa::kAvx2;
    else if (k == "--mid-act") g_mid_act = act_of(v);
    else if (k == "--out-act") g_out_act = act_of(v);
    else if (k == "--layout") layouts = {v == "nhwc" ? lwk::Layout::kNHWC : lwk::Layout::kNCHW};
    else if (k == "--shape") {  // cin,cout,stride,hw: time just this block
      Shape s{};
      if (std::sscanf(v.c_str(), "%lld,%lld,%lld,%lld", (long long*)&s.cin, (long long*)&s.cout,
                      (long long*)&s.stride, (long long*)&s.hw) == 4) {
        only.push_back(s);
      }
    }
  }
  std::printf("isa=%s threads=%d batch=%lld reps=%d\n", lwk::isa_name(isa), threads,
              (long long)batch, reps);
  const std::vector<Shape> all_shapes = {{32, 64, 1, 112},   {64, 128, 2, 112}, {128, 128, 1, 56},
                                     {128, 256, 2, 56},  {256, 256, 1, 28}, {256, 512, 2, 28},
                                     {512, 512, 1, 14},  {512, 1024, 2, 14}, {1024, 1024, 1, 7}};
  const std::vector<Shape> chain = {{3, 32, 2, 224},    {32, 64, 1, 112},  {64, 128, 2, 112},
                                    {128, 256, 2, 56},  {256, 512, 2, 28}, {512, 512, 1, 14},
                                    {512, 1024, 2, 14}, {1024, 1024, 1, 7}, {1024, 1024, 1, 7}};
  const std::vector<Shape>& shapes = only.empty() ? all_shapes : only;
  std::mt19937 gen(1);
  for (lwk::Layout layout : layouts) {
    const char* ln = layout == lwk::Layout::kNCHW ? "nchw" : "nhwc";
    double logsum = 0, logmin = 0;
    for (const Shape& s : shapes) {
      if (chain_only) break;
      Block b;
      make_block(b, s, batch, layout, isa, gen);
      const double ms = median_ms(reps, [&] { lwk::joint_forward<float>(*b.packed, b.g, b.t, threads); });
      logsum += std::log(ms);
      std::printf("%s %4lld->%-4lld s%lld %3lld : %8.3f ms (min %.3f)  %6.1f GFLOP/s (at min %.1f)\n",
                  ln, (long long)s.cin, (long long)s.cout, (long long)s.stride, (long long)s.hw,
                  ms, g_last_min, b.flops / ms * 1e-6, b.flops / g_last_min * 1e-6);
      logmin += std::log(g_last_min);
    }
    if (!chain_only) std::printf("%s geomean of %zu shapes: %.3f ms (of minima %.3f)\n", ln, shapes.size(),
                std::exp(logsum / shapes.size()), std::exp(logmin / shapes.size()));
    if (!only.empty() && !g_as_chain) continue;
    if (g_as_chain) {  // the given shapes back to back, each block timed inside the chain
      const std::vector<Shape>& chain_shapes = only.empty() ? chain : only;
      std::vector<Block> blocks(chain_shapes.size());
      for (size_t i = 0; i < blocks.size(); ++i) make_block(blocks[i], chain_shapes[i], batch, layout, isa, gen);
      for (size_t i = 0; i + 1 < blocks.size(); ++i) {
        if (blocks[i].y.size() == blocks[i + 1].x.size()) blocks[i + 1].t.x = blocks[i].y.data();
      }
      std::vector<std::vector<double>> per(blocks.size());
      std::vector<double> tot;
      for (int r = 0; r < reps + 3; ++r) {
        const double a0 = now_ms();
        for (size_t i = 0; i < blocks.size(); ++i) {
          const double a = now_ms();
          lwk::joint_forward<float>(*blocks[i].packed, blocks[i].g, blocks[i].t, threads);
          if (r >= 3) per[i].push_back(now_ms() - a);
        }
        if (r >= 3) tot.push_back(now_ms() - a0);
      }
      auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
      std::printf("%s as chain: %.3f ms; per block:", ln, med(tot));
      for (auto& v : per) std::printf(" %.3f", med(v));
      std::printf("\n");
      continue;
    }
    std::vector<Block> blocks(chain.size());
    double flops = 0;
    for (size_t i = 0; i < chain.size(); ++i) {
      make_block(blocks[i], chain[i], batch, layout, isa, gen);
      flops += blocks[i].flops;
    }
    const double ms = median_ms(reps, [&] {
      for (auto& b : blocks) lwk::joint_forward<float>(*b.packed, b.g, b.t, threads);
    });
    std::printf("%s chain (9 blocks, 224 input): %8.3f ms (min %.3f)  %6.1f GFLOP/s\n  per block:",
                ln, ms, g_last_min, flops / ms * 1e-6);
    for (auto& b : blocks) {
      std::printf(" %.3f", median_ms(reps, [&] { lwk::joint_forward<float>(*b.packed, b.g, b.t, threads); }));
    }
    std::printf("\n");
  }
  return 0;
}
