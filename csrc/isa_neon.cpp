// NEON path (aarch64 only, where Advanced SIMD is baseline: no extra flags needed).
#include <arm_neon.h>

#include "kernel_work_items.h"

namespace lwk {
namespace detail {
namespace {

struct NeonF32 {
  using T = float;
  using reg = float32x4_t;
  static constexpr int W = 4;
  static constexpr int MR = 8;  // 8 x 12 micro-kernel: 24 accumulators + 3 B + 1 broadcast of 32
  static constexpr int NV = 3;
  static constexpr int NR = NV * W;
  static LWK_INLINE reg zero() { return vdupq_n_f32(0.0f); }
  static LWK_INLINE reg set1(T v) { return vdupq_n_f32(v); }
  static LWK_INLINE reg load(const T* p) { return vld1q_f32(p); }
  static LWK_INLINE void store(T* p, reg v) { vst1q_f32(p, v); }
  static LWK_INLINE reg fma(reg a, reg b, reg c) { return vfmaq_f32(c, a, b); }
  static LWK_INLINE reg add(reg a, reg b) { return vaddq_f32(a, b); }
  static LWK_INLINE reg sub(reg a, reg b) { return vsubq_f32(a, b); }
  static LWK_INLINE reg mul(reg a, reg b) { return vmulq_f32(a, b); }
  static LWK_INLINE reg div(reg a, reg b) { return vdivq_f32(a, b); }
  static LWK_INLINE reg round_nearest(reg v) { return vrndnq_f32(v); }
  // 2^n for integral n in [-126, 127]: the exponent field set directly.
  static LWK_INLINE reg pow2i(reg n) {
    const int32x4_t e = vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(e, 23));
  }
  static LWK_INLINE reg keep_first(reg v, int n) {
    static const uint32_t lanes[4] = {0, 1, 2, 3};
    const uint32x4_t keep = vcltq_u32(vld1q_u32(lanes), vdupq_n_u32(static_cast<uint32_t>(n)));
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), keep));
  }
  static LWK_INLINE reg load_first(const T* p, int n) {
    float lanes[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < n; ++i) lanes[i] = p[i];
    return vld1q_f32(lanes);
  }
  static LWK_INLINE void store_first(T* p, reg v, int n) {
    float lanes[4];
    vst1q_f32(lanes, v);
    for (int i = 0; i < n; ++i) p[i] = lanes[i];
  }
  // FMAX/FMIN propagate NaN from either operand.
  static LWK_INLINE reg max_keep(reg lo, reg v) { return vmaxq_f32(lo, v); }
  static LWK_INLINE reg min_keep(reg hi, reg v) { return vminq_f32(hi, v); }
  // p[l] += double(v[l]) for the 4 lanes (statistics are accumulated in double).
  static LWK_INLINE void add_f64(double* p, reg v) {
    vst1q_f64(p, vaddq_f64(vld1q_f64(p), vcvt_f64_f32(vget_low_f32(v))));
    vst1q_f64(p + 2, vaddq_f64(vld1q_f64(p + 2), vcvt_high_f64_f32(v)));
  }
  // p[0], p[2], p[4], p[6] from two loads covering exactly p[0..6].
  static LWK_INLINE reg load_s2(const T* p) {
    const float32x4_t a = vld1q_f32(p);      // 0 1 2 3
    const float32x4_t b = vld1q_f32(p + 3);  // 3 4 5 6
    const float32x4_t lo = vuzp1q_f32(a, a);  // 0 2 0 2
    const float32x4_t hi = vuzp2q_f32(b, b);  // 4 6 4 6
    return vcombine_f32(vget_low_f32(lo), vget_low_f32(hi));
  }
  // b[j * ldb + i] = a[i * lda + j] for a 4 x 4 block.
  static LWK_INLINE void transpose_tile(const T* a, int64_t lda, T* b, int64_t ldb) {
    const float32x4x2_t t01 = vtrnq_f32(vld1q_f32(a), vld1q_f32(a + lda));
    const float32x4x2_t t23 = vtrnq_f32(vld1q_f32(a + 2 * lda), vld1q_f32(a + 3 * lda));
    vst1q_f32(b, vcombine_f32(vget_low_f32(t01.val[0]), vget_low_f32(t23.val[0])));
    vst1q_f32(b + ldb, vcombine_f32(vget_low_f32(t01.val[1]), vget_low_f32(t23.val[1])));
    vst1q_f32(b + 2 * ldb, vcombine_f32(vget_high_f32(t01.val[0]), vget_high_f32(t23.val[0])));
    vst1q_f32(b + 3 * ldb, vcombine_f32(vget_high_f32(t01.val[1]), vget_high_f32(t23.val[1])));
  }
};

}  // namespace

const IsaOps<float>* neon_ops_f32() {
  return isa_ops<NeonF32>(Isa::kNeon);
}

}  // namespace detail
}  // namespace lwk
