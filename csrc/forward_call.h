// The per-call machinery of the fused forward ops (joint_forward, inverted_residual_forward),
// ISA-independent and compiled with baseline flags: planning a call (the Plan's geometry, tensors
// and work decomposition), the per-worker scratch layout, the per-call tables (folded depthwise
// weights, border tables, the plane's tables) and the dispatch of the work items onto threads.
// Each op checks its arguments, picks its tiling and then runs these steps in order. Not part of
// the public API.
#pragma once

#include <cstddef>
#include <cstdint>

#include "internal.h"
#include "joint_block.h"
#include "tiling.h"

namespace lwk {
namespace detail {

inline bool valid_isa(Isa isa) {
  return isa == Isa::kScalar || isa == Isa::kAvx2 || isa == Isa::kAvx512 || isa == Isa::kNeon;
}
inline bool valid_layout(Layout l) { return l == Layout::kNCHW || l == Layout::kNHWC; }
inline bool valid_act(Activation a) {
  return a == Activation::kNone || a == Activation::kRelu || a == Activation::kRelu6 ||
         a == Activation::kHardswish || a == Activation::kSilu;
}
inline const char* layout_name(Layout l) { return l == Layout::kNHWC ? "NHWC" : "NCHW"; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
// bytes rounded up to whole kScratchAlign units.
inline std::size_t aligned_bytes(int64_t bytes) {
  return static_cast<std::size_t>(round_up(bytes, static_cast<int64_t>(kScratchAlign)));
}

// The Plan's geometry, tensors and work decomposition for tiling `tl` (g: the depthwise ->
// pointwise part of the op; t.x is the depthwise input).
template <typename T>
Plan<T> plan_call(const JointGeometry& g, const JointTensors<T>& t, const PackedImpl<T>& packed,
                  const Tiling& tl);

// One worker's scratch (Plan's per-worker scratch comment): sets the offsets, ldt, the plane's
// geometry and scratch_bytes. An op that needs more per-worker scratch appends it afterwards.
template <typename T>
void lay_out_worker_scratch(Plan<T>& plan, const JointGeometry& g, const Tiling& tl,
                            const IsaOps<T>& ops);

// Runs the planned call (after lay_out_worker_scratch and anything the op adds to the per-worker
// scratch): in shared-depthwise mode (`shared_dw`) a first phase of (unit, channel chunk) items for
// `dw_units` units (a joint block: every tile of every image), chunks in whole multiples of
// `chunk_multiple` channels; the per-call tables; the work items; the workers' statistics added
// into t.y_sum/t.y_sumsq.
template <typename T>
void execute_call(Plan<T>& plan, const JointGeometry& g, const JointTensors<T>& t, const IsaOps<T>* ops,
                  int threads, bool shared_dw, int64_t dw_units, int64_t chunk_multiple);

// fold_depthwise (joint_block.h) for NHWC (`nhwc`) or NCHW, without its argument checks.
template <typename T>
void fold_depthwise_into(bool nhwc, int64_t C, int64_t taps, const T* weight, const T* scale,
                         const T* shift, T* dw_w, T* dw_b);

}  // namespace detail
}  // namespace lwk
