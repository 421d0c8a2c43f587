#include "call_sequence.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "internal.h"
#include "parallel.h"
#include "transpose.h"

namespace lwk {

namespace {

int64_t elems(int64_t batch, int64_t channels, int64_t h, int64_t w) { return batch * channels * h * w; }

// A call's depthwise weights and shift folded once for the sequence's lifetime (its operands do
// not change while it exists), instead of on every call before the workers start (~13 us for
// 1152 channels of 5x5); `dw` points its call at them.
template <typename T>
struct FoldedDepthwise {
  std::vector<T> weight, shift;
};

template <typename T, class Tensors>
std::shared_ptr<FoldedDepthwise<T>> fold_once(Layout layout, int64_t channels, int64_t taps, Tensors& dw) {
  auto f = std::make_shared<FoldedDepthwise<T>>();
  if (dw.dw_folded) return f;
  f->weight.resize(static_cast<std::size_t>(channels * taps));
  f->shift.resize(static_cast<std::size_t>(channels));
  fold_depthwise<T>(layout, channels, taps, dw.dw_weight, dw.dw_scale, dw.dw_shift, f->weight.data(),
                    f->shift.data());
  dw.dw_weight = f->weight.data();
  dw.dw_scale = nullptr;
  dw.dw_shift = f->shift.data();
  dw.dw_folded = true;
  return f;
}

}  // namespace

template <typename T>
void CallSequence<T>::place(int x, int residual, int y, int64_t batch, int64_t x_elems, int64_t y_elems) {
  auto valid = [](int s) { return s >= kInput && s <= kWorkB; };
  if (!valid(x) || !valid(y)) throw std::invalid_argument("CallSequence: a slot is out of range");
  if (batch_ >= 0 && batch != batch_) {
    throw std::invalid_argument("CallSequence: every call must have the same batch (" + std::to_string(batch_) +
                                " before, " + std::to_string(batch) + " now)");
  }
  if (y == kInput) throw std::invalid_argument("CallSequence: no call may write the input slot");
  if (x == y) throw std::invalid_argument("CallSequence: a call must not write the slot it reads");
  if (residual != kNoSlot && !valid(residual)) {
    throw std::invalid_argument("CallSequence: the residual slot is out of range");
  }
  // The residual has the output's size: the input's (which this call sets if it reads it first),
  // what an earlier call left in a work slot, or the call's own output.
  if (residual != kNoSlot && residual != y) {
    const int64_t have = residual == kInput ? (x == kInput ? x_elems : input_elems_) : slot_elems_[residual];
    if (have < y_elems) {
      throw std::invalid_argument("CallSequence: the residual slot holds fewer elements than the output");
    }
  }
  if (x == kInput) {
    if (input_elems_ != 0 && input_elems_ != x_elems) {
      throw std::invalid_argument("CallSequence: calls read the input slot with different sizes");
    }
    input_elems_ = x_elems;
  } else if (slot_elems_[x] < x_elems) {
    throw std::invalid_argument("CallSequence: a call reads " + std::to_string(x_elems) +
                                " elements from a slot no earlier call filled that far");
  }
  // Groups of images find the output slot at the group's first image, which needs one size for
  // every call that writes it and none that reads it.
  if (x == kOutput || residual == kOutput || (y == kOutput && output_elems_ != 0 && output_elems_ != y_elems)) {
    groupable_ = false;
  }
  batch_ = batch;
  widest_call_elems_ = std::max(widest_call_elems_, x_elems + y_elems);
  slot_elems_[y] = std::max(slot_elems_[y], y_elems);
  if (y == kOutput) output_elems_ = y_elems;
}

template <typename T>
void CallSequence<T>::set_image_group(int64_t images) {
  if (images < 0) throw std::invalid_argument("CallSequence: the image group must be >= 0 (0: by cache budget)");
  image_group_ = images;
}

template <typename T>
int64_t CallSequence<T>::image_group() const {
  if (batch_ <= 1 || !groupable_) return std::max<int64_t>(batch_, 0);
  if (image_group_ > 0) return std::min(image_group_, batch_);
  const int64_t per_image = widest_call_elems_ / batch_ * int64_t(sizeof(T));
  const int64_t most = std::max<int64_t>(1, kGroupBytes / std::max<int64_t>(1, per_image));
  if (most >= batch_) return batch_;
  const int64_t groups = (batch_ + most - 1) / most;
  return (batch_ + groups - 1) / groups;  // equal groups: 8 images at most 3 a time go 3 + 3 + 2
}

template <typename T>
template <class Geometry, class Operands, class Forward>
void CallSequence<T>::add_fused(const Geometry& g, Operands operands, int64_t dw_channels, int x,
                                int residual, int y, Forward forward) {
  const std::string err = validate(g);
  if (!err.empty()) throw std::invalid_argument("CallSequence: " + err);
  if (operands.dw_weight == nullptr) throw std::invalid_argument("CallSequence: dw_weight is null");
  if (operands.y_transposed && residual != kNoSlot) {
    throw std::invalid_argument("CallSequence: a call writing the other layout (y_transposed) takes no residual");
  }
  place(x, residual, y, g.batch, elems(g.batch, g.in_channels, g.in_h, g.in_w),
        elems(g.batch, g.out_channels, g.out_h, g.out_w));
  auto folded = fold_once<T>(g.layout, dw_channels, g.kernel_h * g.kernel_w, operands);
  steps_.push_back([folded = std::move(folded), g, t = operands, x, residual, y,
                    forward = std::move(forward)](T* const* slots, int64_t images, int threads) mutable {
    (void)folded;  // (kept alive with the step)
    Geometry group = g;
    group.batch = images;
    t.x = slots[x];
    t.residual = residual == kNoSlot ? nullptr : slots[residual];
    t.y = slots[y];
    forward(group, t, threads);
  });
}

template <typename T>
void CallSequence<T>::add_joint(std::shared_ptr<const PackedPointwise<T>> packed,
                                const JointGeometry& g, const JointTensors<T>& operands, int x,
                                int residual, int y) {
  if (!packed) throw std::invalid_argument("CallSequence: packed weights are null");
  add_fused(g, operands, g.in_channels, x, residual, y,
            [packed = std::move(packed)](const JointGeometry& geo, const JointTensors<T>& t, int threads) {
              joint_forward<T>(*packed, geo, t, threads);
            });
}

template <typename T>
void CallSequence<T>::add_inverted_residual(std::shared_ptr<const PackedPointwise<T>> expand,
                                            std::shared_ptr<const PackedPointwise<T>> project,
                                            const InvertedResidualGeometry& g,
                                            const InvertedResidualTensors<T>& operands, int x,
                                            int residual, int y) {
  if (!expand || !project) throw std::invalid_argument("CallSequence: packed weights are null");
  add_fused(g, operands, g.expanded_channels, x, residual, y,
            [expand = std::move(expand), project = std::move(project)](
                const InvertedResidualGeometry& geo, const InvertedResidualTensors<T>& t, int threads) {
              inverted_residual_forward<T>(*expand, *project, geo, t, threads);
            });
}

template <typename T>
void CallSequence<T>::add_dense_conv(const DenseConvGeometry& g, const T* weight, const T* shift,
                                     Activation act, Isa isa, int x, int y, Layout out_layout) {
  const std::string err = validate(g);
  if (!err.empty()) throw std::invalid_argument("CallSequence: " + err);
  if (out_layout != Layout::kNCHW && out_layout != Layout::kNHWC) {
    throw std::invalid_argument("CallSequence: unknown output layout value");
  }
  place(x, kNoSlot, y, g.batch, elems(g.batch, g.in_channels, g.in_h, g.in_w),
        elems(g.batch, g.out_channels, g.out_h, g.out_w));
  steps_.push_back([g, weight, shift, act, isa, x, y, out_layout](T* const* slots, int64_t images, int threads) {
    DenseConvGeometry group = g;
    group.batch = images;
    dense_conv_forward<T>(group, slots[x], weight, shift, act, slots[y], isa, threads, out_layout);
  });
}

template <typename T>
void CallSequence<T>::add_transpose(int64_t batch, int64_t channels, int64_t pixels, bool to_nhwc,
                                    Isa isa, int x, int y) {
  if (batch < 0 || channels < 1 || pixels < 1) {
    throw std::invalid_argument("CallSequence: a transpose needs batch >= 0, channels and pixels >= 1");
  }
  if (!isa_supported(isa)) {
    throw std::invalid_argument(std::string("CallSequence: this build or CPU lacks the ") + isa_name(isa) +
                                " path");
  }
  place(x, kNoSlot, y, batch, batch * channels * pixels, batch * channels * pixels);
  steps_.push_back([channels, pixels, to_nhwc, isa, x, y](T* const* slots, int64_t images, int threads) {
    transpose_images<T>(slots[x], slots[y], images, channels, pixels, to_nhwc, isa, threads);
  });
}

template <typename T>
void CallSequence<T>::FreeAligned::operator()(T* p) const {
  detail::aligned_free_bytes(p);
}

template <typename T>
void CallSequence<T>::set_step_timing(bool on) {
  step_timing_ = on;
  step_seconds_.clear();
  step_region_seconds_.clear();
  step_busy_seconds_.clear();
  step_threads_ = 0;
}

template <typename T>
void CallSequence<T>::run(const T* x, T* y, int num_threads) {
  if (steps_.empty()) throw std::invalid_argument("CallSequence: no calls to run");
  if ((x == nullptr && input_elems_ > 0) || (y == nullptr && output_elems_ > 0)) {
    throw std::invalid_argument("CallSequence: x or y is null");
  }
  const int64_t batch = std::max<int64_t>(batch_, 0);
  const int64_t group = image_group();
  T* work[2];
  for (int w = 0; w < 2; ++w) {  // sized for one group
    const int64_t need = batch > 0 ? slot_elems_[kWorkA + w] / batch * group : slot_elems_[kWorkA + w];
    if (need > work_capacity_[w]) {
      work_[w].reset(static_cast<T*>(detail::aligned_alloc_bytes(static_cast<std::size_t>(need) * sizeof(T))));
      work_capacity_[w] = need;
    }
    work[w] = work_[w].get();
  }
  const int64_t in_per_image = batch > 0 ? input_elems_ / batch : 0;
  const int64_t out_per_image = batch > 0 ? output_elems_ / batch : 0;
  if (step_timing_) {
    step_seconds_.assign(steps_.size(), 0.0);
    step_region_seconds_.assign(steps_.size(), 0.0);
    step_busy_seconds_.assign(steps_.size(), 0.0);
    step_threads_ = std::max(1, num_threads);
  }
  auto run_steps = [&] {
    int64_t n0 = 0;
    do {  // (once for a batch of 0)
      const int64_t images = std::min(group, batch - n0);
      // (no call writes the input slot)
      T* slots[4] = {x ? const_cast<T*>(x) + n0 * in_per_image : nullptr,
                     y ? y + n0 * out_per_image : nullptr, work[0], work[1]};
      if (step_timing_) {
        for (std::size_t i = 0; i < steps_.size(); ++i) {
          detail::RegionTimes regions;
          {
            const detail::ScopedRegionTiming timing(&regions);
            const auto start = std::chrono::steady_clock::now();
            steps_[i](slots, images, num_threads);
            step_seconds_[i] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          }
          step_region_seconds_[i] += regions.wall;
          step_busy_seconds_[i] += regions.busy;
        }
      } else {
        for (Step& step : steps_) step(slots, images, num_threads);
      }
      n0 += images;
    } while (n0 < batch);
  };
  // Every call's threads in one region (parallel.h): a region per call cost ~3 us of fork and join.
  parallel_session(num_threads, [](void* f) { (*static_cast<decltype(run_steps)*>(f))(); }, &run_steps);
}

template class CallSequence<float>;
template class CallSequence<double>;

}  // namespace lwk
