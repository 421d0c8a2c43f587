// The activations of the fused ops, written once for every kernel (inference and training, every
// instruction set) so that their semantics cannot drift apart. They follow PyTorch's CPU kernels
// exactly, non-finite values included:
//   relu(v)      = v < 0 ? 0 : v                 NaN stays NaN (torch.relu)
//   relu6(v)     = min(max(v, 0), 6)             NaN stays NaN (torch.nn.functional.relu6)
//   hardswish(v) = v * min(max(v + 3, 0), 6) / 6 in this order of operations (the division is a
//                  division, as in PyTorch), so -inf -> NaN (-inf * 0), +inf -> +inf, NaN -> NaN
//   silu(v)      = v / (1 + exp(-v))             -inf -> NaN (-inf / inf), +inf -> +inf,
//                  NaN -> NaN; exp is std::exp in scalar code and exp_vec (vec_math.h, within
//                  2 ulp) in vector code, as PyTorch's scalar and vector kernels differ too.
// Gradients. relu and relu6 read theirs off the activation's output (activation_grad):
//   relu:  0 where out <= 0, else grad     (threshold_backward: a NaN output passes grad through)
//   relu6: grad where 0 < out < 6, else 0  (hardtanh_backward as PyTorch's vectorised CPU kernel
//          computes it: a NaN output gets 0; its scalar and CUDA kernels pass grad instead, so
//          PyTorch's own result at a NaN depends on where the element falls, see docs/numerics.md)
// hardswish and silu are not invertible, so theirs need the activation's input v
// (activation_grad_from_input, which also serves relu and relu6 with the same results):
//   hardswish: 0 where v <= -3, grad where v >= 3, else grad * (v / 3 + 0.5), so NaN where v is
//              NaN (hardswish_backward as PyTorch's vectorised CPU kernel computes it; its scalar
//              kernel, which takes a tensor's last few elements, passes grad at a NaN instead)
//   silu:      s = 1 / (1 + exp(-v)), grad * s * (1 + v * (1 - s))   (silu_backward)
// Every comparison is written so that a NaN operand takes the branch PyTorch takes: a max/min or
// `v > 0 ? v : 0` would turn NaN into a finite number and hide a diverging run.
//
// In an anonymous namespace like the kernels that include it: each instruction-set translation
// unit compiles its own copy with its own flags.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "compiler.h"
#include "joint_block.h"
#include "vec_math.h"

namespace lwk {
namespace {

// ---- scalar ----------------------------------------------------------------------------------

template <Activation A, typename T>
LWK_INLINE T activate(T v) {
  if constexpr (A == Activation::kRelu || A == Activation::kRelu6) {
    v = v < T(0) ? T(0) : v;
    if constexpr (A == Activation::kRelu6) v = v > T(6) ? T(6) : v;
    return v;
  } else if constexpr (A == Activation::kHardswish) {
    T c = v + T(3);
    c = c < T(0) ? T(0) : c;
    c = c > T(6) ? T(6) : c;
    return v * c / T(6);
  } else if constexpr (A == Activation::kSilu) {
    return v / (T(1) + std::exp(-v));
  } else {
    return v;
  }
}

template <typename T>
LWK_INLINE T activate(T v, Activation a) {
  switch (a) {
    case Activation::kRelu:
      return activate<Activation::kRelu>(v);
    case Activation::kRelu6:
      return activate<Activation::kRelu6>(v);
    case Activation::kHardswish:
      return activate<Activation::kHardswish>(v);
    case Activation::kSilu:
      return activate<Activation::kSilu>(v);
    default:
      return v;
  }
}

// From the activation's output: relu and relu6 only (none passes grad through).
template <typename T>
LWK_INLINE T activation_grad(T grad, T out, Activation a) {
  if (a == Activation::kRelu) return out <= T(0) ? T(0) : grad;
  if (a == Activation::kRelu6) return (out > T(0) && out < T(6)) ? grad : T(0);
  return grad;
}

// From the activation's input v: every activation.
template <Activation A, typename T>
LWK_INLINE T activation_grad_from_input(T grad, T v) {
  if constexpr (A == Activation::kRelu) {
    return v <= T(0) ? T(0) : grad;
  } else if constexpr (A == Activation::kRelu6) {
    return (v > T(0) && v < T(6)) ? grad : T(0);
  } else if constexpr (A == Activation::kHardswish) {
    if (v <= T(-3)) return T(0);
    if (v >= T(3)) return grad;
    return grad * (v / T(3) + T(0.5));  // NaN v: NaN
  } else if constexpr (A == Activation::kSilu) {
    const T s = T(1) / (T(1) + std::exp(-v));
    return grad * s * (T(1) + v * (T(1) - s));
  } else {
    return grad;
  }
}

// Calls f(std::integral_constant<Activation, a>()) so that a loop inside f sees its activation
// as a constant: no per-element switch, and each activation's loop is vectorised on its own.
template <typename F>
LWK_INLINE void with_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kRelu:
      f(std::integral_constant<Activation, Activation::kRelu>());
      return;
    case Activation::kRelu6:
      f(std::integral_constant<Activation, Activation::kRelu6>());
      return;
    case Activation::kHardswish:
      f(std::integral_constant<Activation, Activation::kHardswish>());
      return;
    case Activation::kSilu:
      f(std::integral_constant<Activation, Activation::kSilu>());
      return;
    default:
      f(std::integral_constant<Activation, Activation::kNone>());
      return;
  }
}

// ---- vector, over the kernels' traits V (kernel_common.h) --------------------------------------
// V::max_keep(lo, v) and V::min_keep(hi, v) return v when v is NaN, so these agree with activate()
// lane by lane (silu up to exp_vec's rounding). One-lane traits (the scalar path) use activate().

template <class V, Activation A>
LWK_INLINE typename V::reg activate_vec(typename V::reg v) {
  using T = typename V::T;
  if constexpr (V::W == 1) {
    return activate<A>(v);
  } else if constexpr (A == Activation::kRelu || A == Activation::kRelu6) {
    v = V::max_keep(V::zero(), v);
    if constexpr (A == Activation::kRelu6) v = V::min_keep(V::set1(T(6)), v);
    return v;
  } else if constexpr (A == Activation::kHardswish) {
    typename V::reg c = V::max_keep(V::zero(), V::add(v, V::set1(T(3))));
    c = V::min_keep(V::set1(T(6)), c);
    return V::div(V::mul(v, c), V::set1(T(6)));
  } else if constexpr (A == Activation::kSilu) {
    return V::div(v, V::add(V::set1(T(1)), exp_vec<V>(V::sub(V::zero(), v))));
  } else {
    return v;
  }
}

// The clamping activations (none, relu, relu6) chosen at run time, for loops that switch per
// vector. hardswish and silu are applied by activate_array in a pass of their own instead: their
// arithmetic outweighs the pass, and the clamping loops stay as compact as they were.
inline bool is_clamping(Activation a) {
  return a == Activation::kNone || a == Activation::kRelu || a == Activation::kRelu6;
}

template <class V>
LWK_INLINE typename V::reg activate_vec_clamping(typename V::reg v, Activation a) {
  switch (a) {
    case Activation::kRelu:
      return activate_vec<V, Activation::kRelu>(v);
    case Activation::kRelu6:
      return activate_vec<V, Activation::kRelu6>(v);
    default:
      return v;
  }
}

// Scalar: a must be a clamping one. Written as selects rather than a switch, so that loops around
// it stay if-convertible (vectorisable).
template <typename T>
LWK_INLINE T activate_clamping(T v, Activation a) {
  if (a == Activation::kNone) return v;
  v = v < T(0) ? T(0) : v;
  if (a == Activation::kRelu6) v = v > T(6) ? T(6) : v;
  return v;
}

// p[i] = activation a of p[i] for i in [0, n): whole vectors, then the last n % W elements one by
// one (activate(), so silu's exp there is std::exp).
template <class V>
void activate_array(typename V::T* p, int64_t n, Activation a) {
  with_activation(a, [&](auto act) {
    constexpr Activation A = decltype(act)::value;
    if constexpr (A != Activation::kNone) {
      const int64_t full = n - n % V::W;
      for (int64_t i = 0; i < full; i += V::W) V::store(p + i, activate_vec<V, A>(V::load(p + i)));
      if constexpr (V::W > 1) {
        for (int64_t i = full; i < n; ++i) p[i] = activate<A>(p[i]);
      }
    }
  });
}

}  // namespace
}  // namespace lwk
