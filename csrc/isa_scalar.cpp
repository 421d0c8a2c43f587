// Portable scalar path (float and double): plain C++, compiled with baseline flags.
#include "kernel_work_items.h"

namespace lwk {
namespace detail {
namespace {

template <typename TT>
struct ScalarVec {
  using T = TT;
  using reg = TT;
  static constexpr int W = 1;
  static constexpr int MR = 4;
  static constexpr int NV = 4;
  static constexpr int NR = NV * W;
  static LWK_INLINE reg zero() { return T(0); }
  static LWK_INLINE reg set1(T v) { return v; }
  static LWK_INLINE reg load(const T* p) { return *p; }
  static LWK_INLINE void store(T* p, reg v) { *p = v; }
  static LWK_INLINE reg fma(reg a, reg b, reg c) { return a * b + c; }
  static LWK_INLINE reg add(reg a, reg b) { return a + b; }
  static LWK_INLINE reg keep_first(reg v, int n) { return n > 0 ? v : T(0); }
  static LWK_INLINE reg load_first(const T* p, int) { return *p; }  // n is always 1 (= W)
  static LWK_INLINE void store_first(T* p, reg v, int) { *p = v; }
  static LWK_INLINE reg max_keep(reg lo, reg v) { return v < lo ? lo : v; }
  static LWK_INLINE reg min_keep(reg hi, reg v) { return v > hi ? hi : v; }
  static LWK_INLINE reg load_s2(const T* p) { return *p; }
  static LWK_INLINE void add_f64(double* p, reg v) { *p += double(v); }
  static LWK_INLINE void transpose_tile(const T* a, int64_t, T* b, int64_t) { *b = *a; }
};

}  // namespace

const IsaOps<float>* scalar_ops_f32() {
  return isa_ops<ScalarVec<float>>(Isa::kScalar);
}

const IsaOps<double>* scalar_ops_f64() {
  return isa_ops<ScalarVec<double>>(Isa::kScalar);
}

}  // namespace detail
}  // namespace lwk
