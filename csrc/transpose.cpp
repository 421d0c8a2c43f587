#include "transpose.h"

#include <algorithm>

namespace lwk {

template <typename T>
void transpose_images(const T* src, T* dst, int64_t batch, int64_t channels, int64_t pixels,
                      bool to_nhwc) {
  constexpr int64_t kBlock = 16;  // a 16 x 16 block of either side stays in L1
  for (int64_t n = 0; n < batch; ++n) {
    const T* s = src + n * channels * pixels;
    T* d = dst + n * channels * pixels;
    for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
      const int64_t c1 = std::min(channels, c0 + kBlock);
      for (int64_t p0 = 0; p0 < pixels; p0 += kBlock) {
        const int64_t p1 = std::min(pixels, p0 + kBlock);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t p = p0; p < p1; ++p) {
            if (to_nhwc) {
              d[p * channels + c] = s[c * pixels + p];
            } else {
              d[c * pixels + p] = s[p * channels + c];
            }
          }
        }
      }
    }
  }
}

template void transpose_images<float>(const float*, float*, int64_t, int64_t, int64_t, bool);
template void transpose_images<double>(const double*, double*, int64_t, int64_t, int64_t, bool);

}  // namespace lwk
