// pybind11 binding of the dense-convolution kernel (csrc/dense_conv.h) for lwkernels.cpu.stem.
// Tensors cross as raw data addresses, as in bindings.cpp: the Python layer owns validation,
// layout and lifetime.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../csrc/dense_conv.h"
#include "enum_names.h"

namespace py = pybind11;

namespace {

template <typename T>
void bind_forward(py::module_& m, const char* name) {
  m.def(
      name,
      [](const lwk::DenseConvGeometry& g, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t shift,
         const std::string& act, std::uintptr_t y, const std::string& isa, int num_threads) {
        const lwk::Activation a = lwk_bind::activation_from_name(act);
        const lwk::Isa i = lwk_bind::isa_from_name(isa);
        py::gil_scoped_release release;
        lwk::dense_conv_forward<T>(g, reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(weight),
                                   reinterpret_cast<const T*>(shift), a, reinterpret_cast<T*>(y), i,
                                   num_threads);
      },
      py::arg("geometry"), py::arg("x"), py::arg("weight"), py::arg("shift"), py::arg("act"), py::arg("y"),
      py::arg("isa"), py::arg("num_threads"));
}

}  // namespace

void bind_dense_conv(py::module_& m) {
  py::class_<lwk::DenseConvGeometry>(m, "DenseConvGeometry")
      .def(py::init([](int64_t batch, int64_t in_channels, int64_t in_h, int64_t in_w, int64_t out_channels,
                       int64_t out_h, int64_t out_w, int64_t kernel_h, int64_t kernel_w, int64_t stride_h,
                       int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w) {
             lwk::DenseConvGeometry g;
             g.batch = batch;
             g.in_channels = in_channels;
             g.in_h = in_h;
             g.in_w = in_w;
             g.out_channels = out_channels;
             g.out_h = out_h;
             g.out_w = out_w;
             g.kernel_h = kernel_h;
             g.kernel_w = kernel_w;
             g.stride_h = stride_h;
             g.stride_w = stride_w;
             g.pad_h = pad_h;
             g.pad_w = pad_w;
             g.dil_h = dil_h;
             g.dil_w = dil_w;
             return g;
           }),
           py::kw_only(), py::arg("batch"), py::arg("in_channels"), py::arg("in_h"), py::arg("in_w"),
           py::arg("out_channels"), py::arg("out_h"), py::arg("out_w"), py::arg("kernel_h"),
           py::arg("kernel_w"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"),
           py::arg("dil_h"), py::arg("dil_w"))
      .def("validate", [](const lwk::DenseConvGeometry& g) { return lwk::validate(g); });
  m.attr("DENSE_CONV_MAX_TAPS") = lwk::kDenseConvMaxTaps;
  bind_forward<float>(m, "dense_conv_forward_f32");
  bind_forward<double>(m, "dense_conv_forward_f64");
}
