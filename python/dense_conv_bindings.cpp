// pybind11 binding of the dense-convolution kernel (csrc/dense_conv.h) for lwkernels.cpu.stem.
// Tensors cross as raw data addresses, as in bindings.cpp: the Python layer owns validation,
// layout and lifetime.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../csrc/dense_conv.h"
#include "enum_names.h"
#include "geometry_fields.h"

namespace py = pybind11;

namespace {

template <typename T>
void bind_forward(py::module_& m, const char* name) {
  m.def(
      name,
      [](const lwk::DenseConvGeometry& g, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t shift,
         const std::string& act, std::uintptr_t y, const std::string& isa, int num_threads,
         const std::string& out_layout) {
        const lwk::Activation a = lwk_bind::activation_from_name(act);
        const lwk::Isa i = lwk_bind::isa_from_name(isa);
        const lwk::Layout l = lwk_bind::layout_from_name(out_layout);
        py::gil_scoped_release release;
        lwk::dense_conv_forward<T>(g, reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(weight),
                                   reinterpret_cast<const T*>(shift), a, reinterpret_cast<T*>(y), i,
                                   num_threads, l);
      },
      py::arg("geometry"), py::arg("x"), py::arg("weight"), py::arg("shift"), py::arg("act"), py::arg("y"),
      py::arg("isa"), py::arg("num_threads"), py::arg("out_layout") = "nchw");
}

}  // namespace

void bind_dense_conv(py::module_& m) {
  py::class_<lwk::DenseConvGeometry> geometry(m, "DenseConvGeometry");
  lwk_bind::bind_geometry(geometry, lwk_bind::conv_fields<lwk::DenseConvGeometry>(), {},
                          [](lwk::DenseConvGeometry&, const py::kwargs&) {});
  geometry.def("validate", [](const lwk::DenseConvGeometry& g) { return lwk::validate(g); });
  m.attr("DENSE_CONV_MAX_TAPS") = lwk::kDenseConvMaxTaps;
  bind_forward<float>(m, "dense_conv_forward_f32");
  bind_forward<double>(m, "dense_conv_forward_f64");
}
