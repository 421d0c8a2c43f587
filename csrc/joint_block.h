// Public interface of the torch-free CPU kernels for the fused joint block:
//
//   t = mid_act(dw_scale * DW_kxk(x; stride, padding, dilation) + dw_shift)     per input channel
//   y = out_act(pw_scale * PW_1x1(t) + pw_shift + residual)                      per output channel
//
// BatchNorm (inference) and conv biases are expressed as the per-channel scale/shift pairs, so the
// pointwise weights can stay the user's raw parameters and be packed once (see PackedPointwise).
// Raw pointers + sizes only: no torch, no Python. All tensors are dense in `layout`.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace lwk {

// The activations PyTorch calls relu, relu6, hardswish and silu; their exact semantics, non-finite
// values included, are in activation.h.
enum class Activation : int { kNone = 0, kRelu = 1, kRelu6 = 2, kHardswish = 3, kSilu = 4 };

// Instruction-set paths. kScalar builds everywhere; kAvx2 (AVX2 + FMA) and kAvx512 (AVX-512F) on
// x86-64; kNeon on aarch64.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kNeon = 2, kAvx512 = 3 };

// kNCHW: [N][C][H][W] contiguous. kNHWC: torch's channels_last, [N][H][W][C] contiguous.
enum class Layout : int { kNCHW = 0, kNHWC = 1 };

struct JointGeometry {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t out_channels = 0, out_h = 0, out_w = 0;
  int64_t kernel_h = 3, kernel_w = 3;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
  Layout layout = Layout::kNCHW;
};

// Returns an empty string when `g` describes a computable block, else a message naming the problem
// (the Python layer checks first; this is the last line of defence against out-of-bounds access).
std::string validate(const JointGeometry& g);

template <typename T>
struct JointTensors {
  const T* x = nullptr;         // [N, C_in, H, W]
  const T* dw_weight = nullptr; // [C_in, kernel_h, kernel_w]  (PyTorch's [C_in, 1, kh, kw])
  const T* dw_scale = nullptr;  // [C_in] or nullptr (= 1)
  const T* dw_shift = nullptr;  // [C_in] or nullptr (= 0)
  Activation mid_act = Activation::kNone;
  const T* pw_scale = nullptr;  // [C_out] or nullptr (= 1)
  const T* pw_shift = nullptr;  // [C_out] or nullptr (= 0)
  const T* residual = nullptr;  // [N, C_out, H_out, W_out] or nullptr
  Activation out_act = Activation::kNone;
  T* y = nullptr;               // [N, C_out, H_out, W_out]
  // Optional per-output-channel statistics of y as stored (over N, H_out, W_out), computed in
  // the epilogue of the kernel that writes y (training's batch statistics without a second pass
  // over y): y_sum[o] = sum of y, y_sumsq[o] = sum of y^2, both [C_out] and overwritten. Given
  // together or not at all. Accumulated in double (only a register's few values are added in T).
  double* y_sum = nullptr;
  double* y_sumsq = nullptr;
  // True: dw_weight and dw_shift are fold_depthwise()'s output for this call's layout (dw_scale is
  // then unused). A caller that runs the same block many times folds once instead of every call.
  bool dw_folded = false;
  // True: y is laid out in the other layout than g.layout (NCHW computation writes y as
  // [N, H_out, W_out, C_out], NHWC computation as [N, C_out, H_out, W_out]), the same values
  // transposed. Each work item's outputs go to a buffer of the worker's and are transposed into y
  // from there, while in cache: a model whose next layer runs in the other layout then needs no
  // pass over the whole map. Not with a residual or statistics; y must not overlap x.
  bool y_transposed = false;
};

// The depthwise weights and shift as the kernels read them: weight [C][taps] times scale, in the
// layout's order (NCHW [C][taps], NHWC [taps][C]), into folded_weight (C * taps elements), and the
// shift (0 where null) into folded_shift (C), NaN for a channel with a NaN among its folded weights
// (zero padding multiplies every weight, so such a channel is NaN everywhere, also where a kernel
// skips the padded taps). scale and shift may be null (1 and 0).
template <typename T>
void fold_depthwise(Layout layout, int64_t channels, int64_t taps, const T* weight, const T* scale,
                    const T* shift, T* folded_weight, T* folded_shift);

// Pointwise weights [C_out, C_in] repacked into the GEMM panels of one (ISA, layout) pair.
// Built once per parameter version by the caller and reused across calls; immutable afterwards,
// so one instance may serve concurrent calls.
template <typename T>
class PackedPointwise {
 public:
  virtual ~PackedPointwise() = default;
  virtual Isa isa() const = 0;
  virtual Layout layout() const = 0;
  virtual int64_t out_channels() const = 0;
  virtual int64_t in_channels() const = 0;
};

// Packs `weight` ([c_out][c_in], row-major) for `isa` and `layout`, on up to `num_threads`
// threads for large weights. Throws std::invalid_argument for an ISA this build or CPU lacks.
// double always runs the scalar path (packed->isa() says so).
template <typename T>
std::shared_ptr<const PackedPointwise<T>> pack_pointwise(Isa isa, Layout layout, const T* weight,
                                                         int64_t c_out, int64_t c_in,
                                                         int num_threads = 1);

// Runs the fused block on up to `num_threads` threads (<= 1: the calling thread only).
// `packed` must match g.layout, g.in_channels and g.out_channels. Throws std::invalid_argument on a
// geometry that validate() rejects or on a mismatched packing.
// Threads come from the process's OpenMP runtime when one is loaded (PyTorch's), else from a
// persistent pool owned by the library (parallel.h). Safe to call from several threads at once
// (with the same or different packed weights). `residual` may be the same buffer as `y` (each
// element is read before it is written); x must not overlap y.
template <typename T>
void joint_forward(const PackedPointwise<T>& packed, const JointGeometry& g,
                   const JointTensors<T>& t, int num_threads);

// CPU feature detection and naming.
bool isa_supported(Isa isa);  // compiled in and supported by this CPU
Isa best_isa();               // the fastest supported path
const char* isa_name(Isa isa); // "scalar", "avx2", "avx512", "neon"

}  // namespace lwk
