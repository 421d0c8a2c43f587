// pybind11 binding of the fused inverted-residual kernel (csrc/inverted_residual.h) for
// lwkernels.cpu.prepared_inverted_residual. Tensors cross as raw data addresses (0 for "absent"),
// as in bindings.cpp: the Python layer owns validation, layout and lifetime.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../csrc/inverted_residual.h"
#include "enum_names.h"

namespace py = pybind11;

namespace {

template <typename T>
const T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<const T*>(address);
}

template <typename T>
void bind_forward(py::module_& m) {
  m.def(
      "inverted_residual_forward",
      [](const lwk::PackedPointwise<T>& expand, const lwk::PackedPointwise<T>& project,
         const lwk::InvertedResidualGeometry& g, std::uintptr_t x, std::uintptr_t expand_scale,
         std::uintptr_t expand_shift, const std::string& expand_act, std::uintptr_t dw_weight,
         std::uintptr_t dw_scale, std::uintptr_t dw_shift, const std::string& mid_act,
         std::uintptr_t project_scale, std::uintptr_t project_shift, std::uintptr_t residual,
         const std::string& out_act, std::uintptr_t y, int num_threads) {
        lwk::InvertedResidualTensors<T> t;
        t.x = as_ptr<T>(x);
        t.expand_scale = as_ptr<T>(expand_scale);
        t.expand_shift = as_ptr<T>(expand_shift);
        t.expand_act = lwk_bind::activation_from_name(expand_act);
        t.dw_weight = as_ptr<T>(dw_weight);
        t.dw_scale = as_ptr<T>(dw_scale);
        t.dw_shift = as_ptr<T>(dw_shift);
        t.mid_act = lwk_bind::activation_from_name(mid_act);
        t.project_scale = as_ptr<T>(project_scale);
        t.project_shift = as_ptr<T>(project_shift);
        t.residual = as_ptr<T>(residual);
        t.out_act = lwk_bind::activation_from_name(out_act);
        t.y = reinterpret_cast<T*>(y);
        py::gil_scoped_release release;
        lwk::inverted_residual_forward<T>(expand, project, g, t, num_threads);
      },
      py::arg("expand"), py::arg("project"), py::arg("geometry"), py::arg("x"), py::arg("expand_scale"),
      py::arg("expand_shift"), py::arg("expand_act"), py::arg("dw_weight"), py::arg("dw_scale"),
      py::arg("dw_shift"), py::arg("mid_act"), py::arg("project_scale"), py::arg("project_shift"),
      py::arg("residual"), py::arg("out_act"), py::arg("y"), py::arg("num_threads"));
}

}  // namespace

void bind_inverted_residual(py::module_& m) {
  py::class_<lwk::InvertedResidualGeometry>(m, "InvertedResidualGeometry")
      .def(py::init([](int64_t batch, int64_t in_channels, int64_t in_h, int64_t in_w,
                       int64_t expanded_channels, int64_t out_channels, int64_t out_h, int64_t out_w,
                       int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                       int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                       const std::string& layout, bool transpose_io) {
             lwk::InvertedResidualGeometry g;
             g.batch = batch;
             g.in_channels = in_channels;
             g.in_h = in_h;
             g.in_w = in_w;
             g.expanded_channels = expanded_channels;
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
             g.layout = lwk_bind::layout_from_name(layout);
             g.transpose_io = transpose_io;
             return g;
           }),
           py::kw_only(), py::arg("batch"), py::arg("in_channels"), py::arg("in_h"), py::arg("in_w"),
           py::arg("expanded_channels"), py::arg("out_channels"), py::arg("out_h"), py::arg("out_w"),
           py::arg("kernel_h"), py::arg("kernel_w"), py::arg("stride_h"), py::arg("stride_w"),
           py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"), py::arg("dil_w"), py::arg("layout"),
           py::arg("transpose_io") = false)
      .def_readonly("transpose_io", &lwk::InvertedResidualGeometry::transpose_io)
      .def("validate", [](const lwk::InvertedResidualGeometry& g) { return lwk::validate(g); });
  bind_forward<float>(m);
  bind_forward<double>(m);
  m.def("set_expand_band_budget_bytes", &lwk::set_expand_band_budget_bytes, py::arg("bytes"),
        "Test hook: the byte budget of a work item's band of expanded rows (0 = default).");
}
