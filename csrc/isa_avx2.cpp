// AVX2 + FMA path (x86-64 only). This translation unit alone is compiled with -mavx2 -mfma; it is
// only entered after isa_supported(Isa::kAvx2) confirmed the CPU has both.
#include <immintrin.h>

#include "kernel_work_items.h"

namespace lwk {
namespace detail {
namespace {

struct Avx2F32 {
  using T = float;
  using reg = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 6;  // 6 x 16 micro-kernel: 12 accumulators + 2 B + 1 broadcast
  static constexpr int NV = 2;
  static constexpr int NR = NV * W;
  static LWK_INLINE reg zero() { return _mm256_setzero_ps(); }
  static LWK_INLINE reg set1(T v) { return _mm256_set1_ps(v); }
  static LWK_INLINE reg load(const T* p) { return _mm256_loadu_ps(p); }
  static LWK_INLINE void store(T* p, reg v) { _mm256_storeu_ps(p, v); }
  static LWK_INLINE reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static LWK_INLINE reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static LWK_INLINE reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static LWK_INLINE reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static LWK_INLINE reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static LWK_INLINE reg round_nearest(reg v) {
    return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n for integral n in [-126, 127]: the exponent field set directly.
  static LWK_INLINE reg pow2i(reg n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  // All ones in lanes [0, n).
  static LWK_INLINE __m256i first_lanes(int n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
  }
  static LWK_INLINE reg keep_first(reg v, int n) {
    return _mm256_and_ps(v, _mm256_castsi256_ps(first_lanes(n)));
  }
  static LWK_INLINE reg load_first(const T* p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }
  static LWK_INLINE void store_first(T* p, reg v, int n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
  // maxps/minps return the second operand when either is NaN.
  static LWK_INLINE reg max_keep(reg lo, reg v) { return _mm256_max_ps(lo, v); }
  static LWK_INLINE reg min_keep(reg hi, reg v) { return _mm256_min_ps(hi, v); }
  // p[l] += double(v[l]) for the 8 lanes (statistics are accumulated in double).
  static LWK_INLINE void add_f64(double* p, reg v) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), lo));
    _mm256_storeu_pd(p + 4, _mm256_add_pd(_mm256_loadu_pd(p + 4), hi));
  }
  // p[0], p[2], ..., p[14] from two loads covering exactly p[0..14].
  static LWK_INLINE reg load_s2(const T* p) {
    const __m256 a = _mm256_loadu_ps(p);      // 0 1 2 3 | 4 5 6 7
    const __m256 b = _mm256_loadu_ps(p + 7);  // 7 8 9 10 | 11 12 13 14
    const __m256 s = _mm256_shuffle_ps(a, b, 0xD8);  // 0 2 8 10 | 4 6 12 14
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));
  }
  // b[j * ldb + i] = a[i * lda + j] for an 8 x 8 block: 4 x 4 transposes within the 128-bit lanes
  // (unpacks), then the lanes gathered.
  static LWK_INLINE void transpose_tile(const T* a, int64_t lda, T* b, int64_t ldb) {
    __m256 r[8], s[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(a + i * lda);
    for (int i = 0; i < 4; ++i) {
      s[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      s[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {  // r[4i + j], lane k: column 4k + j of rows 4i .. 4i+3
      const __m256d s0 = _mm256_castps_pd(s[4 * i]), s1 = _mm256_castps_pd(s[4 * i + 1]);
      const __m256d s2 = _mm256_castps_pd(s[4 * i + 2]), s3 = _mm256_castps_pd(s[4 * i + 3]);
      r[4 * i] = _mm256_castpd_ps(_mm256_unpacklo_pd(s0, s2));
      r[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(s0, s2));
      r[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(s1, s3));
      r[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(s1, s3));
    }
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(b + j * ldb, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
      _mm256_storeu_ps(b + (4 + j) * ldb, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
    }
  }
};

}  // namespace

const IsaOps<float>* avx2_ops_f32() {
  return isa_ops<Avx2F32>(Isa::kAvx2);
}

}  // namespace detail
}  // namespace lwk
