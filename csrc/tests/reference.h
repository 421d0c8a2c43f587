// What the C++ tests compute their references with: PyTorch's output size and activations in
// double, and tensor offsets by layout. Shared by every test program.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "joint_block.h"

namespace lwk_test {

// PyTorch's output size; 0 when the dilated kernel does not fit the padded input.
inline int64_t out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1;
  return span < 0 ? 0 : span / s + 1;
}

// PyTorch's activations in double (activation.h gives the rules, non-finite values included: NaN
// passes through). With float_range, an intermediate result past the float range becomes an
// infinity, as in the float computation (hardswish(3e38) = 3e38 * 6 / 6 is +inf in float,
// silu(-89) = -89 / (1 + e^89) is -0): the reference keeps double precision and float's range.
inline double act_ref(double v, lwk::Activation a, bool float_range = false) {
  auto range = [float_range](double t) {
    const double lim = double(std::numeric_limits<float>::max()) * (1.0 + std::ldexp(1.0, -25));
    if (float_range && std::fabs(t) >= lim) return std::copysign(HUGE_VAL, t);
    return t;
  };
  switch (a) {
    case lwk::Activation::kRelu:
      return v < 0 ? 0.0 : v;
    case lwk::Activation::kRelu6:
      return v < 0 ? 0.0 : v > 6 ? 6.0 : v;
    case lwk::Activation::kHardswish: {
      const double c = v + 3 < 0 ? 0.0 : v + 3 > 6 ? 6.0 : v + 3;
      return range(v * c) / 6;
    }
    case lwk::Activation::kSilu:
      return v / (1 + range(std::exp(-v)));
    default:
      return v;
  }
}

// Logical (n, c, y, x) -> storage offset for a dense [N][C][H][W] tensor in `layout`.
inline int64_t offset(lwk::Layout l, int64_t C, int64_t H, int64_t W, int64_t n, int64_t c, int64_t y,
                      int64_t x) {
  return l == lwk::Layout::kNCHW ? ((n * C + c) * H + y) * W + x : ((n * H + y) * W + x) * C + c;
}

// True when `other`, laid out in the other layout than `layout`, holds exactly y's values, bit for
// bit: a call's y_transposed output against its plain output.
template <typename T>
bool same_values_transposed(lwk::Layout layout, int64_t N, int64_t C, int64_t H, int64_t W, const T* y,
                            const T* other) {
  const lwk::Layout o = layout == lwk::Layout::kNCHW ? lwk::Layout::kNHWC : lwk::Layout::kNCHW;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j = 0; j < W; ++j) {
          const T a = y[offset(layout, C, H, W, n, c, i, j)], b = other[offset(o, C, H, W, n, c, i, j)];
          if (std::memcmp(&a, &b, sizeof(T)) != 0) return false;
        }
      }
    }
  }
  return true;
}

}  // namespace lwk_test
