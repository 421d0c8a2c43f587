#include "conv_geometry.h"

namespace lwk {
namespace detail {

bool fits_int64_index(std::initializer_list<int64_t> dims) {
  int64_t p = 1;
  for (int64_t d : dims) {
    if (d != 0 && p > (int64_t(1) << 60) / d) return false;
    p *= d;
  }
  return true;
}

std::string validate_conv(const ConvShape& g) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (g.layout != Layout::kNCHW && g.layout != Layout::kNHWC) return "layout must be NCHW or NHWC";
  if (g.batch < 0) return "batch must be >= 0, got " + s(g.batch);
  if (g.channels < 1) return "channels must be >= 1, got " + s(g.channels);
  if (g.in_h < 1 || g.in_w < 1) {
    return "input height and width must be >= 1, got " + s(g.in_h) + " x " + s(g.in_w);
  }
  if (g.kernel_h < 1 || g.kernel_w < 1) {
    return "kernel size must be >= 1, got " + s(g.kernel_h) + " x " + s(g.kernel_w);
  }
  if (g.stride_h < 1 || g.stride_w < 1) {
    return "stride must be >= 1, got " + s(g.stride_h) + " x " + s(g.stride_w);
  }
  if (g.dil_h < 1 || g.dil_w < 1) {
    return "dilation must be >= 1, got " + s(g.dil_h) + " x " + s(g.dil_w);
  }
  if (g.pad_h < 0 || g.pad_w < 0) {
    return "padding must be >= 0, got " + s(g.pad_h) + " x " + s(g.pad_w);
  }
  for (int64_t v : {g.batch, g.channels, g.in_h, g.in_w, g.kernel_h, g.kernel_w, g.stride_h,
                    g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w, g.out_h, g.out_w}) {
    if (v > kConvDimMax) return "a size, stride, padding or dilation exceeds 2^30";
  }
  const int64_t ext_h = g.dil_h * (g.kernel_h - 1) + 1, ext_w = g.dil_w * (g.kernel_w - 1) + 1;
  if (ext_h > g.in_h + 2 * g.pad_h || ext_w > g.in_w + 2 * g.pad_w) {
    return "dilated kernel (" + s(ext_h) + " x " + s(ext_w) + ") is larger than the padded input (" +
           s(g.in_h + 2 * g.pad_h) + " x " + s(g.in_w + 2 * g.pad_w) + ")";
  }
  const int64_t oh = (g.in_h + 2 * g.pad_h - ext_h) / g.stride_h + 1;
  const int64_t ow = (g.in_w + 2 * g.pad_w - ext_w) / g.stride_w + 1;
  if (g.out_h != oh || g.out_w != ow) {
    return "output size " + s(g.out_h) + " x " + s(g.out_w) + " does not match the convolution (" +
           s(oh) + " x " + s(ow) + ")";
  }
  if (!fits_int64_index({g.batch, g.channels, g.in_h, g.in_w}) ||
      !fits_int64_index({g.batch, g.channels, g.out_h, g.out_w}) ||
      !fits_int64_index({g.channels, g.kernel_h, g.kernel_w})) {
    return "tensor sizes overflow 64-bit indexing";
  }
  return std::string();
}

}  // namespace detail
}  // namespace lwk
