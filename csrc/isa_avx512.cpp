// AVX-512 path (x86-64 only). This translation unit alone is compiled with -mavx512f (plus AVX2 and
// FMA, which every AVX-512 CPU has); it is only entered after isa_supported(Isa::kAvx512) confirmed
// the CPU and the OS support AVX-512F. Twice the vector width and twice the registers of AVX2: on
// CPUs with two 512-bit FMA units this doubles the pointwise GEMM's peak rate.
#include <immintrin.h>

// GCC 12's 512-bit max/min intrinsics pass _mm512_undefined_ps() (a self-initialised variable) as
// their unused merge source, which -Wmaybe-uninitialized reports at every use; nothing is read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "kernel_work_items.h"

namespace lwk {
namespace detail {
namespace {

struct Avx512F32 {
  using T = float;
  using reg = __m512;
  static constexpr int W = 16;
  // 8 x 48 micro-kernel: 24 accumulators + 3 B + 1 broadcast of the 32 registers. 48 pixel
  // columns rather than 32 because the small late-network images fit it better: 7 x 7 = 48 + 1,
  // 14 x 14 = 4 * 48 + 4 (the last pixels ride along in ukernel_nchw_plus_one, one per block).
  static constexpr int MR = 8;
  static constexpr int NV = 3;
  static constexpr int NR = NV * W;
  static LWK_INLINE reg zero() { return _mm512_setzero_ps(); }
  static LWK_INLINE reg set1(T v) { return _mm512_set1_ps(v); }
  static LWK_INLINE reg load(const T* p) { return _mm512_loadu_ps(p); }
  static LWK_INLINE void store(T* p, reg v) { _mm512_storeu_ps(p, v); }
  static LWK_INLINE reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static LWK_INLINE reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static LWK_INLINE reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static LWK_INLINE reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static LWK_INLINE reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static LWK_INLINE reg round_nearest(reg v) {
    return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n for integral n in [-126, 127]: the exponent field set directly.
  static LWK_INLINE reg pow2i(reg n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static LWK_INLINE reg set_halves(T lo, T hi) {
    return _mm512_mask_broadcastss_ps(_mm512_set1_ps(lo), __mmask16(0xFF00), _mm_set_ss(hi));
  }
  static LWK_INLINE reg keep_first(reg v, int n) {
    return _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << n) - 1u), v);
  }
  static LWK_INLINE reg load_first(const T* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }
  static LWK_INLINE void store_first(T* p, reg v, int n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), v);
  }
  // vmaxps/vminps return the second operand when either is NaN.
  static LWK_INLINE reg max_keep(reg lo, reg v) { return _mm512_max_ps(lo, v); }
  static LWK_INLINE reg min_keep(reg hi, reg v) { return _mm512_min_ps(hi, v); }
  // p[l] += double(v[l]) for the 16 lanes (statistics are accumulated in double).
  static LWK_INLINE void add_f64(double* p, reg v) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi =
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), lo));
    _mm512_storeu_pd(p + 8, _mm512_add_pd(_mm512_loadu_pd(p + 8), hi));
  }
  // p[0], p[2], ..., p[30] from two loads covering exactly p[0..30]: the second starts at p[15],
  // so its odd lanes hold p[16], p[18], ... (a masked load of p[16..30] instead was the slowest
  // instruction of the stride-2 plane fill: masked loads that split a cache line are slow).
  static LWK_INLINE reg load_s2(const T* p) {
    const __m512 a = _mm512_loadu_ps(p);       // p[0 .. 15]
    const __m512 b = _mm512_loadu_ps(p + 15);  // p[15 .. 30]
    const __m512i pick = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 14, 12, 10, 8, 6, 4,
                                          2, 0);
    return _mm512_permutex2var_ps(a, pick, b);
  }
  // b[j * ldb + i] = a[i * lda + j] for a 16 x 16 block: pairs of rows interleaved within 128-bit
  // lanes, then pairs of those (4 x 4 transposes in each lane), then the lanes gathered.
  static LWK_INLINE void transpose_tile(const T* a, int64_t lda, T* b, int64_t ldb) {
    __m512 r[16], s[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(a + i * lda);
    for (int i = 0; i < 8; ++i) {
      s[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      s[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // r[4i + j], lane k: column 4k + j of rows 4i .. 4i+3
      const __m512d s0 = _mm512_castps_pd(s[4 * i]), s1 = _mm512_castps_pd(s[4 * i + 1]);
      const __m512d s2 = _mm512_castps_pd(s[4 * i + 2]), s3 = _mm512_castps_pd(s[4 * i + 3]);
      r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(s0, s2));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(s0, s2));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(s1, s3));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(s1, s3));
    }
    for (int j = 0; j < 4; ++j) {
      const __m512 c0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);   // lanes 0, 2 | 0, 2
      const __m512 c1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);   // lanes 1, 3 | 1, 3
      const __m512 c2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
      const __m512 c3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
      _mm512_storeu_ps(b + j * ldb, _mm512_shuffle_f32x4(c0, c2, 0x88));         // column j
      _mm512_storeu_ps(b + (4 + j) * ldb, _mm512_shuffle_f32x4(c1, c3, 0x88));   // 4 + j
      _mm512_storeu_ps(b + (8 + j) * ldb, _mm512_shuffle_f32x4(c0, c2, 0xDD));   // 8 + j
      _mm512_storeu_ps(b + (12 + j) * ldb, _mm512_shuffle_f32x4(c1, c3, 0xDD));  // 12 + j
    }
  }
};

}  // namespace

const IsaOps<float>* avx512_ops_f32() {
  return isa_ops<Avx512F32>(Isa::kAvx512);
}

}  // namespace detail
}  // namespace lwk
