// A fixed list of the fused kernels' calls (joint blocks, inverted residuals, dense convolutions,
// layout transposes), run back to back by one call, each reading what an earlier one wrote.
//
// A model's fused modules called one by one from Python spend time between their kernels on
// Python itself, and at batch 1 that time grows: the kernels evict the interpreter's objects from
// the caches, so each of the ~20 calls of a fused MobileNetV2 or MNASNet found its glue cold
// (docs/performance.md). A CallSequence is built once per input signature with every call's
// operands bound (the weights and per-channel parameters stay where the caller keeps them; the
// caller guarantees they outlive the sequence and do not change) and then runs the whole list
// from one native call. It also folds each call's depthwise weights once (fold_depthwise), which a
// single call does every time before its workers start.
//
// Tensors flow through numbered slots: kInput (the caller's input, read only), kOutput (the
// caller's output) and two work slots the sequence owns, sized to the largest tensor placed in
// them. A call reads one slot, writes another and may add a third as its residual.
//
// Every call of a sequence has the same batch, and images never mix, so a run may take the batch
// in groups of images, each group through every call before the next group starts. That keeps the
// tensors in flight (and the work slots, sized for one group) within the last-level cache: a batch
// of 8 MobileNetV1 images at 224 moves ~40 MB through each early block, which went to memory
// and cost 5-15% of the call (docs/performance.md). Results do not depend on the grouping: the
// kernels compute every output element in the same order whatever the batch.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "dense_conv.h"
#include "inverted_residual.h"
#include "joint_block.h"

namespace lwk {

template <typename T>
class CallSequence {
 public:
  static constexpr int kInput = 0, kOutput = 1, kWorkA = 2, kWorkB = 3;
  static constexpr int kNoSlot = -1;  // as a residual: none

  CallSequence() = default;
  CallSequence(const CallSequence&) = delete;
  CallSequence& operator=(const CallSequence&) = delete;

  // The joint block of `packed` and `g` with the operands of `operands` (its x, residual and y are
  // ignored: they come from the slots).
  void add_joint(std::shared_ptr<const PackedPointwise<T>> packed, const JointGeometry& g,
                 const JointTensors<T>& operands, int x, int residual, int y);
  void add_inverted_residual(std::shared_ptr<const PackedPointwise<T>> expand,
                             std::shared_ptr<const PackedPointwise<T>> project,
                             const InvertedResidualGeometry& g,
                             const InvertedResidualTensors<T>& operands, int x, int residual,
                             int y);
  // (out_layout kNHWC: the output channels-last, see dense_conv_forward)
  void add_dense_conv(const DenseConvGeometry& g, const T* weight, const T* shift, Activation act,
                      Isa isa, int x, int y, Layout out_layout = Layout::kNCHW);
  // `batch` images of channels x pixels from NCHW to NHWC (to_nhwc) or back, by `isa`'s transpose.
  void add_transpose(int64_t batch, int64_t channels, int64_t pixels, bool to_nhwc, Isa isa, int x, int y);

  // Runs every call in order on up to `num_threads` threads: x (elements of the first call's
  // input) in, y (the last call's output) out. Not safe to run concurrently on one sequence (the
  // work slots are its own); throws std::invalid_argument for an empty sequence or null tensors.
  void run(const T* x, T* y, int num_threads);

  // Images per group (see above): 0 (the default) chooses from the cache budget, kGroupBytes of
  // the largest call's input and output per group; n > 0 takes n images at a time.
  void set_image_group(int64_t images);
  // Images the next run takes per group (the batch itself when it runs whole).
  int64_t image_group() const;
  static constexpr int64_t kGroupBytes = int64_t(12) << 20;

  // Per-step wall times, for profiling inside one native call (forward hooks cannot see its
  // calls): while on, every run records how long each call took, and how its threads spent that
  // time, summed over the image groups. Either way the last run's times are dropped.
  void set_step_timing(bool on);
  // Seconds per call of the last timed run, in the order added (empty before one).
  const std::vector<double>& step_seconds() const { return step_seconds_; }
  // Per call of the last timed run: seconds inside its parallel regions (the rest of
  // step_seconds the calling thread worked alone: set-up, serial parts), and the seconds its
  // threads' tasks ran, summed over the threads (parallel.h's RegionTimes). With step_threads
  // threads, step_threads * step_seconds - step_busy_seconds is the thread time a call left idle.
  const std::vector<double>& step_region_seconds() const { return step_region_seconds_; }
  const std::vector<double>& step_busy_seconds() const { return step_busy_seconds_; }
  // The num_threads of the last timed run (0 before one).
  int step_threads() const { return step_threads_; }

  std::size_t size() const { return steps_.size(); }
  // Elements each end of the sequence expects (0 before the first call is added).
  int64_t input_elems() const { return input_elems_; }
  int64_t output_elems() const { return output_elems_; }

 private:
  // A call on `images` images; the slots point at the first of them.
  using Step = std::function<void(T* const* slots, int64_t images, int num_threads)>;
  // Checks the slots of a call on `batch` images reading x_elems and writing y_elems in all, sizes
  // the work slots.
  void place(int x, int residual, int y, int64_t batch, int64_t x_elems, int64_t y_elems);
  // A joint or inverted-residual call: checks its geometry and depthwise operand, places its slots,
  // folds its depthwise weights (dw_channels of them) once, and adds the step that binds the slots
  // and runs forward(g, operands, num_threads).
  template <class Geometry, class Operands, class Forward>
  void add_fused(const Geometry& g, Operands operands, int64_t dw_channels, int x, int residual, int y,
                 Forward forward);

  std::vector<Step> steps_;
  int64_t slot_elems_[4] = {0, 0, 0, 0};
  int64_t input_elems_ = 0, output_elems_ = 0;
  int64_t batch_ = -1;             // every call's (-1: no call yet)
  int64_t widest_call_elems_ = 0;  // the most input + output elements of one call
  bool groupable_ = true;          // false when the output slot also serves as a work slot
  int64_t image_group_ = 0;        // set_image_group's
  bool step_timing_ = false;
  std::vector<double> step_seconds_, step_region_seconds_, step_busy_seconds_;
  int step_threads_ = 0;
  struct FreeAligned {
    void operator()(T* p) const;
  };
  std::unique_ptr<T, FreeAligned> work_[2];  // cache-line aligned, as the callers' tensors are
  int64_t work_capacity_[2] = {0, 0};
};

}  // namespace lwk
