// The machine's fp32 FMA rate: what no kernel can exceed, to put GFLOP/s figures in proportion.
//
//   bench_fma_peak [--isa avx2|avx512|neon] [--threads N] [--seconds S]
//
// Each of N threads runs a loop of independent vector FMAs on registers (24 accumulator chains,
// enough to cover the FMA latency on every core we know) for about S seconds; prints the rate of
// one thread alone and of all N together (total FLOPs over wall time), five times each, and the
// best of each. On a shared or virtual machine the best is the closest to the hardware's rate.
// An FMA counts as two FLOPs per lane, as the benchmarks count a multiply-add.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace {

constexpr int kChains = 24;

// Runs `iters` steps of kChains FMAs; returns a value that depends on every chain (so the loop
// stays) and the FLOPs done.
#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f"))) float fma_loop_avx512(long iters, double* flops) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512 b = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(1e-7f);
  for (long n = 0; n < iters; ++n) {
#pragma GCC unroll 24
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
  }
  alignas(64) float lanes[16];
  float sum = 0;
  for (int i = 0; i < kChains; ++i) {
    _mm512_store_ps(lanes, acc[i]);
    for (float v : lanes) sum += v;
  }
  *flops = 2.0 * 16 * kChains * static_cast<double>(iters);
  return sum;
}

__attribute__((target("avx2,fma"))) float fma_loop_avx2(long iters, double* flops) {
  __m256 acc[kChains / 2];  // 12 chains: 16 registers hold them and the two operands
  for (int i = 0; i < kChains / 2; ++i) acc[i] = _mm256_set1_ps(0.001f * static_cast<float>(i));
  const __m256 b = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(1e-7f);
  for (long n = 0; n < iters; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains / 2; ++i) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
  }
  alignas(32) float lanes[8];
  float sum = 0;
  for (int i = 0; i < kChains / 2; ++i) {
    _mm256_store_ps(lanes, acc[i]);
    for (float v : lanes) sum += v;
  }
  *flops = 2.0 * 8 * (kChains / 2) * static_cast<double>(iters);
  return sum;
}
#elif defined(__aarch64__)
float fma_loop_neon(long iters, double* flops) {
  float32x4_t acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = vdupq_n_f32(0.001f * static_cast<float>(i));
  const float32x4_t b = vdupq_n_f32(0.9999f), c = vdupq_n_f32(1e-7f);
  for (long n = 0; n < iters; ++n) {
#pragma GCC unroll 24
    for (int i = 0; i < kChains; ++i) acc[i] = vfmaq_f32(c, acc[i], b);
  }
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += vaddvq_f32(acc[i]);
  *flops = 2.0 * 4 * kChains * static_cast<double>(iters);
  return sum;
}
#endif

using Loop = float (*)(long, double*);

Loop loop_for(const std::string& isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") ? fma_loop_avx512 : nullptr;
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? fma_loop_avx2 : nullptr;
#elif defined(__aarch64__)
  if (isa == "neon") return fma_loop_neon;
#endif
  return nullptr;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// GFLOP/s of `threads` threads each running `iters` steps (total FLOPs over the wall time).
double rate(Loop loop, int threads, long iters) {
  std::vector<double> flops(threads, 0.0);
  std::atomic<float> sink{0.0f};
  std::atomic<int> ready{0};
  std::vector<std::thread> pool;
  auto t0 = std::chrono::steady_clock::now();
  std::atomic<bool> go{false};
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      sink.store(loop(iters, &flops[t]));
    });
  }
  while (ready.load() < threads) {
  }
  t0 = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  const double wall = seconds_since(t0);
  double total = 0;
  for (double f : flops) total += f;
  if (sink.load() == 12345.0f) std::printf(" ");  // (keeps the result observable)
  return total / wall * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
#if defined(__aarch64__)
  std::string isa = "neon";
#else
  std::string isa = "avx512";
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) isa = "avx2";
#endif
  int threads = 2;
  double seconds = 0.5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--isa") isa = v;
    else if (k == "--threads") threads = std::atoi(v.c_str());
    else if (k == "--seconds") seconds = std::atof(v.c_str());
    else {
      std::fprintf(stderr, "unknown option %s (expected --isa, --threads, --seconds)\n", k.c_str());
      return 2;
    }
  }
  const Loop loop = loop_for(isa);
  if (loop == nullptr) {
    std::fprintf(stderr, "no %s FMA loop on this machine\n", isa.c_str());
    return 2;
  }
  if (threads < 1 || seconds <= 0) {
    std::fprintf(stderr, "--threads and --seconds must be positive\n");
    return 2;
  }
  // Iterations for about `seconds` on one thread, from a short calibration run.
  double f = 0;
  auto t0 = std::chrono::steady_clock::now();
  loop(1000000, &f);
  const long iters = std::max(1000000L, static_cast<long>(1000000 * seconds / seconds_since(t0)));
  std::printf("isa=%s threads=%d\n", isa.c_str(), threads);
  double best1 = 0, bestn = 0;
  for (int r = 0; r < 5; ++r) {
    const double one = rate(loop, 1, iters), all = rate(loop, threads, iters);
    best1 = std::max(best1, one);
    bestn = std::max(bestn, all);
    std::printf("one thread %7.1f GFLOP/s   %d threads %7.1f GFLOP/s\n", one, threads, all);
  }
  std::printf("best: one thread %.1f GFLOP/s, %d threads %.1f GFLOP/s\n", best1, threads, bestn);
  return 0;
}
