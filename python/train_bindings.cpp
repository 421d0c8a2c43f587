// pybind11 binding of the training kernels (csrc/train_kernels.h) into lwkernels._C.
//
// As in bindings.cpp, tensors cross as raw data addresses (0 = absent) and the Python layer
// (lwkernels/ops/training.py) owns validation, layout and lifetime. `dtype` is "f32" or "f64";
// per-channel statistics are float64 buffers. Geometry: [N, C, H, W, OH, OW, KH, KW, stride_h, stride_w, pad_h,
// pad_w, dil_h, dil_w] for the depthwise kernels, [N, C, HW] for the per-channel passes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../csrc/train_kernels.h"
#include "enum_names.h"

namespace py = pybind11;

namespace {

constexpr auto layout_of = lwk_bind::layout_from_name;
constexpr auto act_of = lwk_bind::activation_from_name;
constexpr auto isa_of = lwk_bind::isa_from_name;

lwk::train::DwGeometry dw_geometry(const std::vector<int64_t>& v, const std::string& layout) {
  if (v.size() != 14) throw std::invalid_argument("depthwise geometry needs 14 integers");
  lwk::train::DwGeometry g;
  g.N = v[0]; g.C = v[1]; g.H = v[2]; g.W = v[3]; g.OH = v[4]; g.OW = v[5];
  g.KH = v[6]; g.KW = v[7]; g.stride_h = v[8]; g.stride_w = v[9]; g.pad_h = v[10]; g.pad_w = v[11];
  g.dil_h = v[12]; g.dil_w = v[13];
  g.layout = layout_of(layout);
  return g;
}

lwk::train::ChannelGeometry channel_geometry(const std::vector<int64_t>& v, const std::string& layout) {
  if (v.size() != 3) throw std::invalid_argument("channel geometry needs [N, C, HW]");
  lwk::train::ChannelGeometry g;
  g.N = v[0]; g.C = v[1]; g.HW = v[2];
  g.layout = layout_of(layout);
  return g;
}

template <typename T>
T* p(std::uintptr_t a) { return reinterpret_cast<T*>(a); }
double* d(std::uintptr_t a) { return reinterpret_cast<double*>(a); }

// Calls fn.template operator()<T>() for the named dtype.
template <typename F>
void by_dtype(const std::string& dtype, F&& fn) {
  if (dtype == "f32") {
    fn(float{});
  } else if (dtype == "f64") {
    fn(double{});
  } else {
    throw std::invalid_argument("dtype must be f32 or f64, got '" + dtype + "'");
  }
}

}  // namespace

void bind_training(py::module_& m) {
  using std::uintptr_t;
  using Geo = std::vector<int64_t>;
  m.def("train_dw_forward",
        [](const std::string& dtype, const std::string& isa, const Geo& geo, const std::string& layout,
           uintptr_t x, uintptr_t w, uintptr_t scale, uintptr_t shift, const std::string& act,
           uintptr_t raw, uintptr_t out, uintptr_t sum, uintptr_t sumsq, int threads) {
          const auto g = dw_geometry(geo, layout);
          const auto a_ = act_of(act);
          const auto i_ = isa_of(isa);
          by_dtype(dtype, [&](auto tag) {
            using T = decltype(tag);
            lwk::train::DwForwardArgs<T> a;
            a.x = p<T>(x); a.w = p<T>(w); a.scale = p<T>(scale); a.shift = p<T>(shift); a.act = a_;
            a.raw = p<T>(raw); a.out = p<T>(out); a.sum = d(sum); a.sumsq = d(sumsq);
            py::gil_scoped_release release;
            lwk::train::dw_forward<T>(g, a, i_, threads);
          });
        });
  m.def("train_dw_backward",
        [](const std::string& dtype, const std::string& isa, const Geo& geo, const std::string& layout,
           uintptr_t x, uintptr_t w, uintptr_t grad, uintptr_t grad_x, uintptr_t grad_w, int threads) {
          const auto g = dw_geometry(geo, layout);
          const auto i_ = isa_of(isa);
          by_dtype(dtype, [&](auto tag) {
            using T = decltype(tag);
            py::gil_scoped_release release;
            lwk::train::dw_backward<T>(g, p<T>(x), p<T>(w), p<T>(grad), p<T>(grad_x), p<T>(grad_w), i_,
                                       threads);
          });
        });
  m.def("train_affine_act",
        [](const std::string& dtype, const std::string& isa, const Geo& geo, const std::string& layout,
           uintptr_t z, uintptr_t scale, uintptr_t shift, uintptr_t residual, const std::string& act,
           uintptr_t y, int threads) {
          const auto g = channel_geometry(geo, layout);
          const auto a_ = act_of(act);
          const auto i_ = isa_of(isa);
          by_dtype(dtype, [&](auto tag) {
            using T = decltype(tag);
            py::gil_scoped_release release;
            lwk::train::affine_act<T>(g, p<T>(z), p<T>(scale), p<T>(shift), p<T>(residual), a_, p<T>(y),
                                      i_, threads);
          });
        });
  // act_in, act_in_scale, act_in_shift, act_in_residual: the activation's input as the forward
  // computed it (act_in * act_in_scale + act_in_shift + act_in_residual; train_kernels.h ActInput),
  // needed for hardswish and silu, optional for the others (0 = absent).
  m.def("train_act_backward_reduce",
        [](const std::string& dtype, const std::string& isa, const Geo& geo, const std::string& layout,
           uintptr_t grad, uintptr_t act_out, const std::string& act, uintptr_t z, uintptr_t center,
           uintptr_t gb, uintptr_t sum_g, uintptr_t sum_gz, int threads, uintptr_t act_in,
           uintptr_t act_in_scale, uintptr_t act_in_shift, uintptr_t act_in_residual) {
          const auto g = channel_geometry(geo, layout);
          const auto a_ = act_of(act);
          const auto i_ = isa_of(isa);
          by_dtype(dtype, [&](auto tag) {
            using T = decltype(tag);
            lwk::train::ActInput<T> in;
            in.src = p<T>(act_in);
            in.scale = p<T>(act_in_scale);
            in.shift = p<T>(act_in_shift);
            in.residual = p<T>(act_in_residual);
            py::gil_scoped_release release;
            lwk::train::act_backward_reduce<T>(g, p<T>(grad), p<T>(act_out), a_, in, p<T>(z),
                                               p<T>(center), p<T>(gb), d(sum_g), d(sum_gz), i_,
                                               threads);
          });
        },
        py::arg("dtype"), py::arg("isa"), py::arg("geo"), py::arg("layout"), py::arg("grad"),
        py::arg("act_out"), py::arg("act"), py::arg("z"), py::arg("center"), py::arg("gb"),
        py::arg("sum_g"), py::arg("sum_gz"), py::arg("threads"), py::arg("act_in") = 0,
        py::arg("act_in_scale") = 0, py::arg("act_in_shift") = 0, py::arg("act_in_residual") = 0);
  m.def("train_affine_backward_apply",
        [](const std::string& dtype, const std::string& isa, const Geo& geo, const std::string& layout,
           uintptr_t gb, uintptr_t z, uintptr_t a, uintptr_t b, uintptr_t k, uintptr_t out, int threads) {
          const auto g = channel_geometry(geo, layout);
          const auto i_ = isa_of(isa);
          by_dtype(dtype, [&](auto tag) {
            using T = decltype(tag);
            py::gil_scoped_release release;
            lwk::train::affine_backward_apply<T>(g, p<T>(gb), p<T>(z), p<T>(a), p<T>(b), p<T>(k), p<T>(out),
                                                 i_, threads);
          });
        });
}
