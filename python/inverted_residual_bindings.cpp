// pybind11 binding of the fused inverted-residual kernel (csrc/inverted_residual.h) for
// lwkernels.cpu.prepared_inverted_residual. Tensors cross as raw data addresses (0 for "absent"),
// as in bindings.cpp: the Python layer owns validation, layout and lifetime.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../csrc/inverted_residual.h"
#include "addresses.h"
#include "enum_names.h"
#include "geometry_fields.h"
#include "operands.h"

namespace py = pybind11;

namespace {

using lwk_bind::as_ptr;

template <typename T>
void bind_forward(py::module_& m) {
  m.def(
      "inverted_residual_forward",
      [](const lwk::PackedPointwise<T>& expand, const lwk::PackedPointwise<T>& project,
         const lwk::InvertedResidualGeometry& g, std::uintptr_t x, std::uintptr_t expand_scale,
         std::uintptr_t expand_shift, const std::string& expand_act, std::uintptr_t dw_weight,
         std::uintptr_t dw_scale, std::uintptr_t dw_shift, const std::string& mid_act,
         std::uintptr_t project_scale, std::uintptr_t project_shift, std::uintptr_t residual,
         const std::string& out_act, std::uintptr_t y, int num_threads, bool dw_folded) {
        auto t = lwk_bind::inverted_residual_operands<T>(expand_scale, expand_shift, expand_act,
                                                         dw_weight, dw_scale, dw_shift, mid_act,
                                                         project_scale, project_shift, out_act);
        t.x = as_ptr<T>(x);
        t.residual = as_ptr<T>(residual);
        t.y = reinterpret_cast<T*>(y);
        t.dw_folded = dw_folded;
        py::gil_scoped_release release;
        lwk::inverted_residual_forward<T>(expand, project, g, t, num_threads);
      },
      py::arg("expand"), py::arg("project"), py::arg("geometry"), py::arg("x"), py::arg("expand_scale"),
      py::arg("expand_shift"), py::arg("expand_act"), py::arg("dw_weight"), py::arg("dw_scale"),
      py::arg("dw_shift"), py::arg("mid_act"), py::arg("project_scale"), py::arg("project_shift"),
      py::arg("residual"), py::arg("out_act"), py::arg("y"), py::arg("num_threads"),
      py::arg("dw_folded") = false);
}

}  // namespace

void bind_inverted_residual(py::module_& m) {
  using G = lwk::InvertedResidualGeometry;
  py::class_<G> geometry(m, "InvertedResidualGeometry");
  auto fields = lwk_bind::conv_fields<G>();
  fields.push_back({"expanded_channels", &G::expanded_channels});
  lwk_bind::bind_geometry(geometry, fields, {"layout", "transpose_io"}, [](G& g, const py::kwargs& kw) {
    lwk_bind::set_layout(g, kw, "InvertedResidualGeometry");
    g.transpose_io = kw.contains("transpose_io") && kw["transpose_io"].cast<bool>();
  });
  geometry.def_readonly("transpose_io", &G::transpose_io)
      .def("validate", [](const G& g) { return lwk::validate(g); });
  bind_forward<float>(m);
  bind_forward<double>(m);
  m.def("set_expand_band_budget_bytes", &lwk::set_expand_band_budget_bytes, py::arg("bytes"),
        "Test hook: the byte budget of a work item's band of expanded rows (0 = default).");
}
