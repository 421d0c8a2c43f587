// Public interface of the torch-free CPU kernel for a whole inverted residual (MobileNetV2's block,
// MNASNet's, EfficientNet's without squeeze-excitation) as one call:
//
//   e = expand_act(expand_scale * PW_1x1(x; W_expand) + expand_shift)           per expanded channel
//   t = mid_act(dw_scale * DW_kxk(e; stride, padding, dilation) + dw_shift)      per expanded channel
//   y = out_act(project_scale * PW_1x1(t; W_project) + project_shift + residual) per output channel
//
// The expanded tensor e (the block's widest, typically 6x the input) is never written whole: each
// work item computes the rows of e its tile of outputs reads into a cache-sized buffer, runs the
// depthwise over them and the projection GEMM after it. BatchNorms and biases come as the
// per-channel scale/shift pairs; both 1x1 weights are packed once with pack_pointwise (same ISA and
// layout). Raw pointers + sizes only: no torch, no Python. All tensors are dense in `layout`.
#pragma once

#include <cstdint>
#include <string>

#include "joint_block.h"

namespace lwk {

struct InvertedResidualGeometry {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t expanded_channels = 0;
  int64_t out_channels = 0, out_h = 0, out_w = 0;
  int64_t kernel_h = 3, kernel_w = 3;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
  Layout layout = Layout::kNCHW;
  // With layout kNHWC: x, residual and y are NCHW all the same, transposed to and from per-call
  // scratch around an NHWC run (the weights packed for NHWC). Worth it for small images with many
  // channels, whose NCHW depthwise runs along rows a few pixels long.
  bool transpose_io = false;
};

// Empty when `g` is computable, else a message naming the problem.
std::string validate(const InvertedResidualGeometry& g);

template <typename T>
struct InvertedResidualTensors {
  const T* x = nullptr;             // [N, C_in, H, W]
  const T* expand_scale = nullptr;  // [C_exp] or nullptr (= 1)
  const T* expand_shift = nullptr;  // [C_exp] or nullptr (= 0)
  Activation expand_act = Activation::kNone;
  const T* dw_weight = nullptr;     // [C_exp, kernel_h, kernel_w]
  const T* dw_scale = nullptr;      // [C_exp] or nullptr (= 1)
  const T* dw_shift = nullptr;      // [C_exp] or nullptr (= 0)
  Activation mid_act = Activation::kNone;
  const T* project_scale = nullptr;  // [C_out] or nullptr (= 1)
  const T* project_shift = nullptr;  // [C_out] or nullptr (= 0)
  const T* residual = nullptr;      // [N, C_out, H_out, W_out] or nullptr (x for a skip connection)
  Activation out_act = Activation::kNone;
  T* y = nullptr;                   // [N, C_out, H_out, W_out]
  bool dw_folded = false;           // as JointTensors::dw_folded (folded for g.layout)
  bool y_transposed = false;        // as JointTensors::y_transposed (not with transpose_io)
};

// Runs the block on up to `num_threads` threads. `expand` must be packed as [C_exp][C_in] and
// `project` as [C_out][C_exp], both for g.layout and the same ISA. Throws std::invalid_argument on
// a geometry validate() rejects, mismatched packings, a null required tensor or an unknown
// activation. Safe to call from several threads at once. `residual` may be x or y; x must not
// overlap y otherwise.
template <typename T>
void inverted_residual_forward(const PackedPointwise<T>& expand, const PackedPointwise<T>& project,
                               const InvertedResidualGeometry& g,
                               const InvertedResidualTensors<T>& t, int num_threads);

// Test/benchmark hook: byte budget of one work item's band of expanded rows (0 = built-in
// default), which sets how many output rows a tile has.
void set_expand_band_budget_bytes(std::size_t bytes);

}  // namespace lwk
