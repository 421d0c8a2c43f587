// Public interface of the torch-free CPU kernel for the dense (groups = 1) convolution that opens
// mobile CNNs — a k x k conv over a few input channels (the image's three), then the eval-mode
// BatchNorm folded into the weights and a per-channel shift, then an activation:
//
//   y[n, o] = act(sum_{c, ky, kx} w[o, c, ky, kx] * x[n, c, iy, ix] + shift[o])
//
// PyTorch's convolution runs this layer several times slower than the fused blocks after it (its
// library reorders the three-channel input and allocates on every call). Here output rows are
// computed a vector of pixels at a time from zero-padded copies of the input rows they need, every
// tap multiplied (a NaN weight makes its whole output channel NaN, as in PyTorch). NCHW in and out.
#pragma once

#include <cstdint>
#include <string>

#include "joint_block.h"

namespace lwk {

// Input channels x kernel taps, at most: the kernel keeps one vector per tap in flight.
constexpr int64_t kDenseConvMaxTaps = 64;

struct DenseConvGeometry {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t out_channels = 0, out_h = 0, out_w = 0;
  int64_t kernel_h = 3, kernel_w = 3;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
};

// Empty when `g` is computable, else a message naming the problem.
std::string validate(const DenseConvGeometry& g);

// y = act(conv(x, weight) + shift) on up to `num_threads` threads. weight: [C_out][C_in][kh][kw]
// (BatchNorm's scale already multiplied in); shift: [C_out] or null (= 0). x is NCHW; y NCHW or,
// with out_layout kNHWC, NHWC. Throws std::invalid_argument on a geometry validate() rejects, a
// null tensor, an unsupported ISA or an unknown layout. double always runs the scalar path. x must
// not overlap y.
template <typename T>
void dense_conv_forward(const DenseConvGeometry& g, const T* x, const T* weight, const T* shift,
                        Activation act, T* y, Isa isa, int num_threads, Layout out_layout = Layout::kNCHW);

}  // namespace lwk
