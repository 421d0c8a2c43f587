// The activations of the fused ops, written once for every kernel (inference and training, every
// instruction set) so that their semantics cannot drift apart. They follow PyTorch exactly,
// non-finite values included:
//   relu(v)  = v < 0 ? 0 : v                 NaN stays NaN (torch.relu)
//   relu6(v) = min(max(v, 0), 6)             NaN stays NaN (torch.nn.functional.relu6)
// and their gradients are read off the activation's output:
//   relu:  0 where out <= 0, else grad     (threshold_backward: a NaN output passes grad through)
//   relu6: grad where 0 < out < 6, else 0  (hardtanh_backward as PyTorch's vectorised CPU kernel
//          computes it: a NaN output gets 0; its scalar and CUDA kernels pass grad instead, so
//          PyTorch's own result at a NaN depends on where the element falls, see docs/numerics.md)
// Every comparison is written so that a NaN operand takes the branch PyTorch takes: a max/min or
// `v > 0 ? v : 0` would turn NaN into a finite number and hide a diverging run.
//
// In an anonymous namespace like the kernels that include it: each instruction-set translation
// unit compiles its own copy with its own flags.
#pragma once

#include "compiler.h"
#include "joint_block.h"

namespace lwk {
namespace {

template <typename T>
LWK_INLINE T activate(T v, Activation a) {
  if (a == Activation::kNone) return v;
  v = v < T(0) ? T(0) : v;
  if (a == Activation::kRelu6) v = v > T(6) ? T(6) : v;
  return v;
}

template <typename T>
LWK_INLINE T activation_grad(T grad, T out, Activation a) {
  if (a == Activation::kRelu) return out <= T(0) ? T(0) : grad;
  if (a == Activation::kRelu6) return (out > T(0) && out < T(6)) ? grad : T(0);
  return grad;
}

// Vector forms over the kernels' traits V (kernel_common.h): V::max_keep(lo, v) and
// V::min_keep(hi, v) return v when v is NaN, so these agree with activate() lane by lane.
template <class V, Activation A>
LWK_INLINE typename V::reg activate_vec(typename V::reg v) {
  using T = typename V::T;
  if constexpr (A == Activation::kNone) return v;
  v = V::max_keep(V::zero(), v);
  if constexpr (A == Activation::kRelu6) v = V::min_keep(V::set1(T(6)), v);
  return v;
}

template <class V>
LWK_INLINE typename V::reg activate_vec(typename V::reg v, Activation a) {
  switch (a) {
    case Activation::kRelu:
      return activate_vec<V, Activation::kRelu>(v);
    case Activation::kRelu6:
      return activate_vec<V, Activation::kRelu6>(v);
    default:
      return v;
  }
}

}  // namespace
}  // namespace lwk
