// exp over the kernels' float vector traits V (kernel_common.h), for the SiLU activation.
//
// exp_vec<V>(x) is within 2 ulp of the correctly rounded e^x over all of float, subnormal results
// included, and non-finite-correct: +inf -> +inf, -inf -> +0, NaN -> NaN, overflow to +inf and
// underflow to 0 where std::exp does (csrc/tests: test_joint_block's test_exp checks it against
// double-precision exp on every instruction set).
//
// Method: n = round(x / ln 2), r = x - n ln 2 (Cody-Waite: ln 2 in two parts, so r is exact to
// float rounding), e^r by its Taylor polynomial of degree 7 (truncation below 1e-8 relative on
// |r| <= ln 2 / 2), then e^x = e^r * 2^h * 2^(n - h) with h = round(n / 2): x is clamped to
// [-104, 89] first, so both powers of two are normal floats while the product still overflows or
// underflows (rounding once) exactly where e^x does.
//
// V needs, beyond the contract in kernel_common.h: sub, mul, round_nearest (to the nearest
// integer, as a float) and pow2i(n) = 2^n for an integral n in [-126, 127].
//
// In an anonymous namespace like every kernel header: each ISA translation unit compiles its own
// copy with its own flags.
#pragma once

#include "compiler.h"

namespace lwk {
namespace {

template <class V>
LWK_INLINE typename V::reg exp_vec(typename V::reg x) {
  using R = typename V::reg;
  // max_keep/min_keep return x when x is NaN; a NaN then flows through r and the polynomial.
  x = V::max_keep(V::set1(-104.0f), x);
  x = V::min_keep(V::set1(89.0f), x);
  const R n = V::round_nearest(V::mul(x, V::set1(1.44269504088896341f)));
  R r = V::fma(n, V::set1(-0.693359375f), x);  // n * 0.693359375 is exact (9 + 8 bits)
  r = V::fma(n, V::set1(2.12194440e-4f), r);   // ln 2 = 0.693359375 - 2.12194440e-4
  R p = V::set1(1.0f / 5040.0f);
  p = V::fma(p, r, V::set1(1.0f / 720.0f));
  p = V::fma(p, r, V::set1(1.0f / 120.0f));
  p = V::fma(p, r, V::set1(1.0f / 24.0f));
  p = V::fma(p, r, V::set1(1.0f / 6.0f));
  p = V::fma(p, r, V::set1(0.5f));
  p = V::fma(p, r, V::set1(1.0f));
  p = V::fma(p, r, V::set1(1.0f));
  const R h = V::round_nearest(V::mul(n, V::set1(0.5f)));
  return V::mul(V::mul(p, V::pow2i(h)), V::pow2i(V::sub(n, h)));
}

}  // namespace
}  // namespace lwk
