#include "transpose.h"

#include <stdexcept>

#include "internal.h"
#include "work_sharing.h"

namespace lwk {

namespace {

// Pixels per work item: a band of 64 pixels of every channel (64 x C elements each way) keeps a
// register tile's source and destination rows in L1 and gives large images enough items to share.
constexpr int64_t kBand = 64;

}  // namespace

template <typename T>
void transpose_images(const T* src, T* dst, int64_t batch, int64_t channels, int64_t pixels,
                      bool to_nhwc, Isa isa, int num_threads) {
  const detail::IsaOps<T>* ops = isa_supported(isa) ? detail::ops_for<T>(isa) : nullptr;
  if (ops == nullptr) {
    throw std::invalid_argument(std::string("transpose_images: this build or CPU lacks the ") + isa_name(isa) +
                                " path");
  }
  const int64_t bands = (pixels + kBand - 1) / kBand;
  const int64_t image = channels * pixels;
  // Items of at least ~16 K elements: smaller ones cost more in hand-offs than they share. (64 K
  // once, when a region cost ~3 us to start and end; inside a native sequence's session it costs
  // ~1.5, and MNASNet's 40 x 28 x 28 transpose ran 21 us on one thread, 14 on two.)
  const int64_t grain = 1 + (int64_t(1) << 14) / (kBand * (channels > 0 ? channels : 1));
  detail::share_work(batch * bands, grain, num_threads, [&](int, int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / bands, p0 = (item % bands) * kBand;
      const int64_t np = pixels - p0 < kBand ? pixels - p0 : kBand;
      const T* s = src + n * image;
      T* d = dst + n * image;
      if (to_nhwc) {  // [C][P] -> [P][C]: the band's columns of the channel rows
        ops->transpose(s + p0, pixels, d + p0 * channels, channels, channels, np);
      } else {        // [P][C] -> [C][P]: the band's pixel rows
        ops->transpose(s + p0 * channels, channels, d + p0, pixels, np, channels);
      }
    }
  });
}

template void transpose_images<float>(const float*, float*, int64_t, int64_t, int64_t, bool, Isa, int);
template void transpose_images<double>(const double*, double*, int64_t, int64_t, int64_t, bool, Isa,
                                       int);

}  // namespace lwk
