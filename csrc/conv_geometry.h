// The depthwise convolution's geometry as the inference kernels (JointGeometry) and the training
// kernels (train::DwGeometry) both describe it: its one validation, and the two questions every
// kernel loop asks of the border (which taps of an output, which outputs of a tap, read inside
// the image). Not part of the public API.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "joint_block.h"

namespace lwk {
namespace detail {

// x [batch, channels, in_h, in_w] -> depthwise output [batch, channels, out_h, out_w], weights
// [channels, kernel_h, kernel_w], in `layout`.
struct ConvShape {
  int64_t batch = 0, channels = 0, in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  int64_t kernel_h = 0, kernel_w = 0, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
  Layout layout = Layout::kNCHW;
};

// The ConvShape of a public geometry whose fields are named like JointGeometry's (JointGeometry,
// DenseConvGeometry): its input channels, spatial sizes, kernel, stride, padding and dilation.
template <class G>
ConvShape conv_shape_of(const G& g, Layout layout = Layout::kNCHW) {
  ConvShape c;
  c.batch = g.batch;
  c.channels = g.in_channels;
  c.in_h = g.in_h;
  c.in_w = g.in_w;
  c.out_h = g.out_h;
  c.out_w = g.out_w;
  c.kernel_h = g.kernel_h;
  c.kernel_w = g.kernel_w;
  c.stride_h = g.stride_h;
  c.stride_w = g.stride_w;
  c.pad_h = g.pad_h;
  c.pad_w = g.pad_w;
  c.dil_h = g.dil_h;
  c.dil_w = g.dil_w;
  c.layout = layout;
  return c;
}

// Every size is far from int64 overflow in index computations.
constexpr int64_t kConvDimMax = int64_t(1) << 30;

// Empty when `s` describes a computable convolution, else a message naming the problem: sizes,
// strides, dilations and paddings in range (each at most kConvDimMax), the dilated kernel inside
// the padded input, the output size the convolution's, and the element counts of x, the output
// and the weights within 64-bit indexing.
std::string validate_conv(const ConvShape& s);

// True when the product of `dims` stays below 2^60 (element counts, with room for offsets).
bool fits_int64_index(std::initializer_list<int64_t> dims);

// Inline helpers: in an anonymous namespace because ISA-specific translation units include this
// header, and each must keep its own copy compiled with its own flags.
namespace {

inline int64_t conv_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }  // a >= 0, b > 0

// The input coordinate of tap k of output o is o*stride - pad + k*dil; it is inside when in
// [0, size). These give both views of that condition as half-open ranges.

// Taps k in [*lo, *hi) of output o that read inside (0 <= *lo <= *hi <= kernel).
inline void taps_inside(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t kernel,
                        int64_t size, int64_t* lo, int64_t* hi) {
  const int64_t i0 = o * stride - pad;
  int64_t l = i0 >= 0 ? 0 : conv_ceil_div(-i0, dil);
  int64_t h = i0 > size - 1 ? 0 : (size - 1 - i0) / dil + 1;
  l = l < kernel ? l : kernel;
  h = h < kernel ? h : kernel;
  *lo = l;
  *hi = h < l ? l : h;
}

// Outputs o in [*lo, *hi) whose tap k reads inside (0 <= *lo <= *hi <= out).
inline void outputs_inside(int64_t k, int64_t stride, int64_t pad, int64_t dil, int64_t size,
                           int64_t out, int64_t* lo, int64_t* hi) {
  const int64_t off = k * dil - pad;  // input coordinate = o * stride + off
  int64_t l = off >= 0 ? 0 : conv_ceil_div(-off, stride);
  int64_t h = size - 1 - off < 0 ? 0 : (size - 1 - off) / stride + 1;
  l = l < out ? l : out;
  h = h < l ? l : h;
  *lo = l;
  *hi = h < out ? h : out;
}

}  // namespace
}  // namespace detail
}  // namespace lwk
