// The register-tiled matrix transpose behind the layout changes between NCHW and NHWC
// (transpose.h): whole W x W tiles through the path's V::transpose_tile (unpacks and lane shuffles,
// W loads and W stores per tile), the edges element by element. The scalar path (W = 1) walks
// 8 x 8 blocks so that each block's source rows and destination rows stay in L1.
//
// In an anonymous namespace like every kernel header: each ISA translation unit compiles its own
// copy with its own flags (kernel_work_items.h says why).
#pragma once

#include <cstdint>

namespace lwk {
namespace detail {
namespace {

// b[j * ldb + i] = a[i * lda + j] for i < rows, j < cols (a and b do not overlap). Tiles go down
// a's columns (b's rows) first, so each tile column writes kTile rows of b as sequential streams:
// going along a's rows instead scattered the stores over up to 64 rows of b, which alias in L1 when
// b's rows are 4 KiB apart (1024 channels: 1.6x slower).
template <class V>
void transpose_matrix(const typename V::T* a, int64_t lda, typename V::T* b, int64_t ldb,
                      int64_t rows, int64_t cols) {
  constexpr int64_t kTile = V::W > 1 ? V::W : 8;
  const int64_t whole_rows = rows / kTile * kTile;
  int64_t j = 0;
  for (; j + kTile <= cols; j += kTile) {
    int64_t i = 0;
    for (; i < whole_rows; i += kTile) {
      const typename V::T* at = a + i * lda + j;
      typename V::T* bt = b + j * ldb + i;
      if constexpr (V::W > 1) {
        V::transpose_tile(at, lda, bt, ldb);
      } else {
        for (int64_t c = 0; c < kTile; ++c) {
          for (int64_t r = 0; r < kTile; ++r) bt[c * ldb + r] = at[r * lda + c];
        }
      }
    }
    for (int64_t c = j; c < j + kTile; ++c) {
      for (int64_t r = i; r < rows; ++r) b[c * ldb + r] = a[r * lda + c];
    }
  }
  for (; j < cols; ++j) {
    for (int64_t i = 0; i < rows; ++i) b[j * ldb + i] = a[i * lda + j];
  }
}

}  // namespace
}  // namespace detail
}  // namespace lwk
