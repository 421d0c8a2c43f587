// The dense convolution's ISA-independent part: validation, planning, scratch and thread dispatch.
#include "dense_conv.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "conv_geometry.h"
#include "internal.h"
#include "work_sharing.h"

namespace lwk {

std::string validate(const DenseConvGeometry& g) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (g.out_channels < 1) return "out_channels must be >= 1, got " + s(g.out_channels);
  if (g.out_channels > detail::kConvDimMax) return "a size, stride, padding or dilation exceeds 2^30";
  std::string msg = detail::validate_conv(detail::conv_shape_of(g));
  if (!msg.empty()) return msg;
  if (g.in_channels * g.kernel_h * g.kernel_w > kDenseConvMaxTaps) {
    return "in_channels x kernel taps must be at most " + s(kDenseConvMaxTaps) + ", got " +
           s(g.in_channels * g.kernel_h * g.kernel_w);
  }
  if (!detail::fits_int64_index({g.batch, g.out_channels, g.out_h, g.out_w})) {
    return "tensor sizes overflow 64-bit indexing";
  }
  return msg;
}

namespace {

// The calling thread's scratch for the workers' padded rows and tap vectors, and the NHWC
// output's transposed weights: a new allocation of the stem's ~30 KiB on every call went through
// malloc's consolidation of the small blocks the Python side had just freed.
thread_local detail::ScratchBuf t_dense_scratch;
template <typename T>
thread_local std::vector<T> t_nhwc_operands;

}  // namespace

template <typename T>
void dense_conv_forward(const DenseConvGeometry& g, const T* x, const T* weight, const T* shift,
                        Activation act, T* y, Isa isa, int num_threads, Layout out_layout) {
  const std::string err = validate(g);
  if (!err.empty()) throw std::invalid_argument("dense_conv_forward: " + err);
  if (out_layout != Layout::kNCHW && out_layout != Layout::kNHWC) {
    throw std::invalid_argument("dense_conv_forward: unknown output layout value");
  }
  if (g.batch == 0) return;
  if (x == nullptr || weight == nullptr || y == nullptr) {
    throw std::invalid_argument("dense_conv_forward: x, weight and y must not be null");
  }
  if (act != Activation::kNone && act != Activation::kRelu && act != Activation::kRelu6 &&
      act != Activation::kHardswish && act != Activation::kSilu) {
    throw std::invalid_argument("dense_conv_forward: unknown activation value");
  }
  if (!isa_supported(isa)) {
    throw std::invalid_argument(std::string("dense_conv_forward: the '") + isa_name(isa) +
                                "' path is not supported by this build or this CPU");
  }
  const detail::IsaOps<T>* ops = detail::ops_for<T>(isa);
  if (ops == nullptr) throw std::invalid_argument("dense_conv_forward: no kernel for this ISA");
  detail::DensePlan<T> p;
  p.C = g.in_channels;
  p.H = g.in_h;
  p.Wd = g.in_w;
  p.CO = g.out_channels;
  p.OH = g.out_h;
  p.OW = g.out_w;
  p.KH = g.kernel_h;
  p.KW = g.kernel_w;
  p.stride_h = g.stride_h;
  p.stride_w = g.stride_w;
  p.pad_h = g.pad_h;
  p.pad_w = g.pad_w;
  p.dil_h = g.dil_h;
  p.dil_w = g.dil_w;
  p.taps = g.in_channels * g.kernel_h * g.kernel_w;
  // A padded row must hold the copied input and everything the last vector's taps read:
  // pixels up to a whole vector past the row's end, at the stride, plus the kernel's extent.
  const int64_t vw = ops->vw * detail::kDenseConvVectors;  // pixels per pass
  const int64_t group = out_layout == Layout::kNHWC ? std::max<int64_t>(vw, detail::kDenseNhwcPixels) : vw;
  const int64_t last_px = (g.out_w + group - 1) / group * group - 1;
  p.row_len = std::max(g.pad_w + g.in_w, last_px * g.stride_w + (g.kernel_w - 1) * g.dil_w + 1);
  p.row_len = (p.row_len + 15) / 16 * 16;
  p.nhwc_out = out_layout == Layout::kNHWC;
  p.scratch_elems = (p.taps * vw + g.in_channels * g.kernel_h * p.row_len + 15) / 16 * 16;
  // NHWC output: the weights transposed to [tap][channel] and the shifts, zero-padded to whole
  // pairs of vectors, once per call.
  std::vector<T>& nhwc_operands = t_nhwc_operands<T>;
  if (p.nhwc_out) {
    p.co_pad = detail::dense_nhwc_channels(g.out_channels, ops->vw);
    nhwc_operands.assign(static_cast<std::size_t>((p.taps + 1) * p.co_pad), T(0));
    T* wt = nhwc_operands.data();
    for (int64_t co = 0; co < g.out_channels; ++co) {
      for (int64_t t = 0; t < p.taps; ++t) wt[t * p.co_pad + co] = weight[co * p.taps + t];
      if (shift != nullptr) wt[p.taps * p.co_pad + co] = shift[co];
    }
    p.w_nhwc = wt;
    p.shift_nhwc = wt + p.taps * p.co_pad;
  }
  p.x = x;
  p.w = weight;
  p.shift = shift;
  p.act = act;
  p.y = y;
  const int64_t n_rows = g.batch * g.out_h;
  const int tasks = detail::tasks_for(n_rows, 1, std::max(1, num_threads));
  T* scratch = static_cast<T*>(t_dense_scratch.get(static_cast<std::size_t>(p.scratch_elems * tasks) * sizeof(T)));
  detail::share_work(n_rows, 1, tasks, [&](int task, int64_t begin, int64_t end) {
    ops->run_dense_rows(p, begin, end, scratch + p.scratch_elems * task);
  });
}

template void dense_conv_forward<float>(const DenseConvGeometry&, const float*, const float*,
                                        const float*, Activation, float*, Isa, int, Layout);
template void dense_conv_forward<double>(const DenseConvGeometry&, const double*, const double*,
                                         const double*, Activation, double*, Isa, int, Layout);

}  // namespace lwk
