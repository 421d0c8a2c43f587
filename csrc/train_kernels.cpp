// Training kernels: argument checks and the choice of instruction-set variant. The loop bodies
// live in train_impl.h (baseline variant compiled here, AVX2 in train_kernels_avx2.cpp).
#define LWK_TRAIN_NS baseline
#include "train_impl.h"

#include <stdexcept>
#include <string>

namespace lwk {
namespace train {

const TrainOps<float>* baseline_train_ops_f32() { return baseline::ops_table<float>(); }
const TrainOps<double>* baseline_train_ops_f64() { return baseline::ops_table<double>(); }

namespace {

template <typename T>
const TrainOps<T>* pick(Isa isa);

template <>
const TrainOps<float>* pick<float>(Isa isa) {
#if defined(LWK_HAVE_AVX2)
  // AVX-512 CPUs run the AVX2 training kernels (they are memory-bound; no 512-bit variant yet).
  if ((isa == Isa::kAvx2 || isa == Isa::kAvx512) && isa_supported(Isa::kAvx2)) {
    return avx2_train_ops_f32();
  }
#else
  (void)isa;
#endif
  return baseline_train_ops_f32();
}

template <>
const TrainOps<double>* pick<double>(Isa) {
  return baseline_train_ops_f64();
}

void check(const DwGeometry& g) {
  const std::string msg = validate(g);
  if (!msg.empty()) throw std::invalid_argument(msg);
}

void check(const ChannelGeometry& g) {
  if (g.N < 0 || g.C < 1 || g.HW < 0) throw std::invalid_argument("invalid channel geometry");
}

void check(Activation a, const char* where) {
  if (a != Activation::kNone && a != Activation::kRelu && a != Activation::kRelu6 &&
      a != Activation::kHardswish && a != Activation::kSilu) {
    throw std::invalid_argument(std::string(where) + ": unknown activation value");
  }
}

}  // namespace

std::string validate(const DwGeometry& g) {
  detail::ConvShape c;
  c.batch = g.N;
  c.channels = g.C;
  c.in_h = g.H;
  c.in_w = g.W;
  c.out_h = g.OH;
  c.out_w = g.OW;
  c.kernel_h = g.KH;
  c.kernel_w = g.KW;
  c.stride_h = g.stride_h;
  c.stride_w = g.stride_w;
  c.pad_h = g.pad_h;
  c.pad_w = g.pad_w;
  c.dil_h = g.dil_h;
  c.dil_w = g.dil_w;
  c.layout = g.layout;
  return detail::validate_conv(c);
}

template <typename T>
void dw_forward(const DwGeometry& g, const DwForwardArgs<T>& a, Isa isa, int num_threads) {
  check(g);
  if ((a.sum == nullptr) != (a.sumsq == nullptr))
    throw std::invalid_argument("dw_forward: sum and sumsq must be given together");
  check(a.act, "dw_forward");
  pick<T>(isa)->dw_forward(g, a, num_threads);
}

template <typename T>
void dw_backward(const DwGeometry& g, const T* x, const T* w, const T* grad, T* grad_x, T* grad_w,
                 Isa isa, int num_threads) {
  check(g);
  pick<T>(isa)->dw_backward(g, x, w, grad, grad_x, grad_w, num_threads);
}

template <typename T>
void affine_act(const ChannelGeometry& g, const T* z, const T* scale, const T* shift,
                const T* residual, Activation act, T* y, Isa isa, int num_threads) {
  check(g);
  check(act, "affine_act");
  pick<T>(isa)->affine_act(g, z, scale, shift, residual, act, y, num_threads);
}

template <typename T>
void act_backward_reduce(const ChannelGeometry& g, const T* grad, const T* act_out, Activation act,
                         const ActInput<T>& act_in, const T* z, const T* center, T* gb,
                         double* sum_g, double* sum_gz, Isa isa, int num_threads) {
  check(g);
  check(act, "act_backward_reduce");
  if (z != nullptr && (center == nullptr || sum_gz == nullptr))
    throw std::invalid_argument("act_backward_reduce: z needs center and sum_gz");
  if ((act == Activation::kHardswish || act == Activation::kSilu) && act_in.src == nullptr) {
    throw std::invalid_argument(
        "act_backward_reduce: the hardswish and silu gradients need the activation's input "
        "(act_in), not only its output");
  }
  pick<T>(isa)->act_backward_reduce(g, grad, act_out, act, act_in, z, center, gb, sum_g, sum_gz,
                                    num_threads);
}

template <typename T>
void affine_backward_apply(const ChannelGeometry& g, const T* gb, const T* z, const T* a,
                           const T* b, const T* k, T* out, Isa isa, int num_threads) {
  check(g);
  pick<T>(isa)->affine_backward_apply(g, gb, z, a, b, k, out, num_threads);
}

#define LWK_TRAIN_INSTANTIATE(T)                                                                  \
  template void dw_forward<T>(const DwGeometry&, const DwForwardArgs<T>&, Isa, int);            \
  template void dw_backward<T>(const DwGeometry&, const T*, const T*, const T*, T*, T*, Isa,    \
                               int);                                                              \
  template void affine_act<T>(const ChannelGeometry&, const T*, const T*, const T*, const T*,   \
                              Activation, T*, Isa, int);                                          \
  template void act_backward_reduce<T>(const ChannelGeometry&, const T*, const T*, Activation,  \
                                       const ActInput<T>&, const T*, const T*, T*, double*,       \
                                       double*, Isa, int);                                         \
  template void affine_backward_apply<T>(const ChannelGeometry&, const T*, const T*, const T*,  \
                                         const T*, const T*, T*, Isa, int);
LWK_TRAIN_INSTANTIATE(float)
LWK_TRAIN_INSTANTIATE(double)
#undef LWK_TRAIN_INSTANTIATE

}  // namespace train
}  // namespace lwk
