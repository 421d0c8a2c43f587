// Torch-free CPU kernels for training the joint block (forward with batch statistics, backward).
//
// The training forward is
//   c = DW_kxk(x; stride, padding, dilation)                       (depthwise, per channel)
//   t = mid_act(c * mid_scale + mid_shift)                         (mid BN with batch stats folded)
//   z = PW_1x1(t) + pw_bias                                        (joint_forward, joint_block.h)
//   y = out_act(gamma * (z - mean_z) * invstd_z + beta + residual)
// Batch statistics of c (for the mid BN) come from a depthwise pass that stores nothing
// (dw_forward with only sum/sumsq); z and its statistics from joint_forward (JointTensors::y_sum,
// y_sumsq: sums in the fused kernel's epilogue); y from affine_act.
// Backward recomputes c and t with dw_forward, reduces/apply the BN and activation gradients with
// act_backward_reduce/affine_backward_apply, and runs the depthwise backward (grad input + grad
// weight, dilated, strided) in dw_backward. The pointwise GEMMs of the backward are left to the
// caller (a BLAS-class GEMM).
//
// Raw pointers, dense tensors in `layout`. Per-channel statistics are accumulated in double.
// `isa` picks the compiled variant (kAvx2 and kAvx512: the AVX2+FMA translation unit when built
// and supported; anything else: the baseline one). double always works.
#pragma once

#include <cstdint>
#include <string>

#include "joint_block.h"

namespace lwk {
namespace train {

// Depthwise geometry: x [N, C, H, W], output [N, C, OH, OW], weight [C, KH, KW].
struct DwGeometry {
  int64_t N = 0, C = 0, H = 0, W = 0, OH = 0, OW = 0;
  int64_t KH = 3, KW = 3, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  Layout layout = Layout::kNCHW;
};

// Empty when computable, else a message naming the problem.
std::string validate(const DwGeometry& g);

// A per-channel view of a dense [N, C, HW] (NCHW) or [N, HW, C] (NHWC) tensor.
struct ChannelGeometry {
  int64_t N = 0, C = 0, HW = 0;
  Layout layout = Layout::kNCHW;
};

template <typename T>
struct DwForwardArgs {
  const T* x = nullptr;
  const T* w = nullptr;      // [C][KH*KW]
  const T* scale = nullptr;  // [C] or null (= 1), applied for `out` only
  const T* shift = nullptr;  // [C] or null (= 0), applied for `out` only
  Activation act = Activation::kNone;
  T* raw = nullptr;          // c, or null
  T* out = nullptr;          // act(c * scale + shift), or null
  double* sum = nullptr;     // [C]: sum of c over N, OH, OW (overwritten), or null
  double* sumsq = nullptr;   // [C]: sum of c^2 (overwritten); given iff sum is
};

template <typename T>
void dw_forward(const DwGeometry& g, const DwForwardArgs<T>& a, Isa isa, int num_threads);

// grad: [N, C, OH, OW]; grad_x [N, C, H, W] (overwritten) or null; grad_w [C][KH*KW]
// (overwritten) or null.
template <typename T>
void dw_backward(const DwGeometry& g, const T* x, const T* w, const T* grad, T* grad_x, T* grad_w,
                 Isa isa, int num_threads);

// y = act(z * scale[c] + shift[c] + residual); residual may be null. Any activation.
template <typename T>
void affine_act(const ChannelGeometry& g, const T* z, const T* scale, const T* shift,
                const T* residual, Activation act, T* y, Isa isa, int num_threads);

// The input of an activation as the forward computed it, for the gradients that cannot be read off
// the activation's output (hardswish, silu): src * scale[c] + shift[c] (+ residual), with the same
// src, scale, shift and residual the forward passed (affine_act: z and its scale, shift and
// residual; dw_forward: the raw depthwise output c and its scale and shift). The backward
// recomputes it with the forward's arithmetic, so it is bit-identical.
template <typename T>
struct ActInput {
  const T* src = nullptr;       // null: not given
  const T* scale = nullptr;     // [C] or null (= 1)
  const T* shift = nullptr;     // [C] or null (= 0)
  const T* residual = nullptr;  // like src, or null
};

// gb = grad * act'(.), zero at the kinks as PyTorch (activation.h): from the activation's input
// when act_in.src is given (every activation), else from its output act_out (relu and relu6;
// hardswish and silu need act_in, std::invalid_argument otherwise; with neither, gb = grad).
// sum_g[c] = sum of gb; if z: sum_gz[c] = sum of gb * (z - center[c]). Sums overwritten.
template <typename T>
void act_backward_reduce(const ChannelGeometry& g, const T* grad, const T* act_out, Activation act,
                         const ActInput<T>& act_in, const T* z, const T* center, T* gb,
                         double* sum_g, double* sum_gz, Isa isa, int num_threads);

// out = a[c] * gb + b[c] * z + k[c]  (BatchNorm's input gradient with batch statistics); out may
// alias gb.
template <typename T>
void affine_backward_apply(const ChannelGeometry& g, const T* gb, const T* z, const T* a,
                           const T* b, const T* k, T* out, Isa isa, int num_threads);

}  // namespace train
}  // namespace lwk
