// Layout changes of whole images between NCHW and NHWC (channels_last), for the calls that run an
// NCHW tensor through the NHWC kernels or hand one layout's output to the other's input.
#pragma once

#include <cstdint>

namespace lwk {

// dst[n][p][c] = src[n][c][p] for `batch` images of `channels` x `pixels` (to_nhwc), or back
// (dst[n][c][p] = src[n][p][c]). src and dst must not overlap.
template <typename T>
void transpose_images(const T* src, T* dst, int64_t batch, int64_t channels, int64_t pixels,
                      bool to_nhwc);

}  // namespace lwk
