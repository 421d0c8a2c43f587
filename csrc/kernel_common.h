// What every kernel header is written against: the vector-traits struct V that each ISA
// translation unit (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp, isa_neon.cpp) defines, and the
// small helpers the kernel headers share.
//
// V provides:
//   using T;            element type          using reg;    vector register type
//   W                   lanes per register    MR, NV        micro-kernel rows, column registers
//   NR = NV * W         micro-kernel columns
//   zero() set1(s) load(p) store(p, v) fma(a, b, c) = a*b + c, add(a, b)
//   keep_first(v, n)    v with lanes n .. W-1 set to zero (0 <= n <= W)
//   load_first(p, n)    p[0 .. n-1] in lanes [0, n), zero above, reading nothing past p[n-1]
//   store_first(p, v, n)  lanes [0, n) of v to p[0 .. n-1], writing nothing past it (1 <= n <= W)
//   set_halves(a, b)    lanes [0, W/2) = a, [W/2, W) = b; only needed when W == 2 * MR
//   max_keep(lo, v) / min_keep(hi, v)     max/min that return v when v is NaN (activation.h)
//   load_s2(p)          {p[0], p[2], ..., p[2W-2]} without reading past p[2W-2]
//   add_f64(p, v)       p[l] += double(v[l]) for the W lanes (double* p)
//   sub(a, b) mul(a, b) div(a, b), round_nearest(v) (to the nearest integer, as a float) and
//   pow2i(n) (2^n for integral n in [-126, 127]): used by hardswish and silu (activation.h,
//   vec_math.h) only; one-lane traits (W == 1) may leave them out.
//
// In an anonymous namespace like every kernel header: each ISA translation unit compiles its own
// copy with its own flags (kernel_work_items.h says why).
#pragma once

#include <cstdint>

#include "compiler.h"

namespace lwk {
namespace detail {
namespace {

LWK_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
LWK_INLINE int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
LWK_INLINE int64_t iceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n rows in the fewest blocks of at most `most` rows, of equal sizes (they differ by at most one):
// an NHWC micro-kernel streams its whole weight panel per block, so a 49-pixel tile runs as 7 x 7
// rather than 6 x 8 + 1, whose 1-row block paid a panel's stream for one pixel (5% of a 7x7
// inverted residual's time on one thread).
struct EvenRowBlocks {
  int64_t count, base, extra;
  EvenRowBlocks(int64_t n, int64_t most)
      : count(iceil_div(n, most)), base(count ? n / count : 0), extra(count ? n % count : 0) {}
  int64_t rows(int64_t b) const { return base + (b < extra ? 1 : 0); }
};

// Loads W elements p[0], p[s], p[2s], ... ; kS is the stride when known at compile time (1 or 2),
// 0 for any stride.
template <class V, int kS>
LWK_INLINE typename V::reg load_strided(const typename V::T* p, int64_t s) {
  using T = typename V::T;
  if constexpr (kS == 1) {
    (void)s;
    return V::load(p);
  } else if constexpr (kS == 2) {
    (void)s;
    return V::load_s2(p);
  } else {
    alignas(64) T tmp[V::W];
    for (int i = 0; i < V::W; ++i) tmp[i] = p[i * s];
    return V::load(tmp);
  }
}

}  // namespace
}  // namespace detail
}  // namespace lwk
