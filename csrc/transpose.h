// Layout changes of whole images between NCHW and NHWC (channels_last), for the calls that run an
// NCHW tensor through the NHWC kernels or hand one layout's output to the other's input.
#pragma once

#include <cstdint>

#include "joint_block.h"

namespace lwk {

// dst[n][p][c] = src[n][c][p] for `batch` images of `channels` x `pixels` (to_nhwc), or back
// (dst[n][c][p] = src[n][p][c]), by `isa`'s register-tiled transpose on up to `num_threads`
// threads (bands of pixels). src and dst must not overlap. Every path gives the same bits (it only
// moves them); throws std::invalid_argument when this build or CPU lacks `isa`.
template <typename T>
void transpose_images(const T* src, T* dst, int64_t batch, int64_t channels, int64_t pixels,
                      bool to_nhwc, Isa isa, int num_threads);

}  // namespace lwk
