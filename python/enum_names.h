// The names the Python layer uses for the kernels' enums, shared by both binding files.
#pragma once

#include <stdexcept>
#include <string>

#include "../csrc/joint_block.h"

namespace lwk_bind {

inline lwk::Isa isa_from_name(const std::string& name) {
  if (name == "scalar") return lwk::Isa::kScalar;
  if (name == "avx2") return lwk::Isa::kAvx2;
  if (name == "avx512") return lwk::Isa::kAvx512;
  if (name == "neon") return lwk::Isa::kNeon;
  throw std::invalid_argument("unknown CPU path '" + name + "' (expected scalar, avx2, avx512 or neon)");
}

inline lwk::Layout layout_from_name(const std::string& name) {
  if (name == "nchw") return lwk::Layout::kNCHW;
  if (name == "nhwc") return lwk::Layout::kNHWC;
  throw std::invalid_argument("unknown layout '" + name + "' (expected nchw or nhwc)");
}

inline lwk::Activation activation_from_name(const std::string& name) {
  if (name == "none") return lwk::Activation::kNone;
  if (name == "relu") return lwk::Activation::kRelu;
  if (name == "relu6") return lwk::Activation::kRelu6;
  if (name == "hardswish") return lwk::Activation::kHardswish;
  if (name == "silu") return lwk::Activation::kSilu;
  throw std::invalid_argument("unknown activation '" + name +
                              "' (expected none, relu, relu6, hardswish or silu)");
}

}  // namespace lwk_bind
