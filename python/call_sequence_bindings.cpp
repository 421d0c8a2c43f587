// pybind11 binding of CallSequence (csrc/call_sequence.h) for lwkernels.cpu.prepared_sequence.
// Operands cross as raw data addresses (0 for "absent"), as in bindings.cpp; the Python layer keeps
// the tensors behind them alive and unchanged while the sequence exists.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>

#include "../csrc/call_sequence.h"
#include "addresses.h"
#include "enum_names.h"
#include "operands.h"

namespace py = pybind11;

namespace {

using lwk_bind::as_ptr;

template <typename T>
void bind_sequence(py::module_& m, const char* name) {
  using Seq = lwk::CallSequence<T>;
  using Packed = lwk::PackedPointwise<T>;
  py::class_<Seq>(m, name)
      .def(py::init<>())
      .def_readonly_static("INPUT", &Seq::kInput)
      .def_readonly_static("OUTPUT", &Seq::kOutput)
      .def_readonly_static("WORK_A", &Seq::kWorkA)
      .def_readonly_static("WORK_B", &Seq::kWorkB)
      .def_readonly_static("NO_SLOT", &Seq::kNoSlot)
      .def(
          "add_joint",
          [](Seq& s, std::shared_ptr<Packed> packed, const lwk::JointGeometry& g,
             std::uintptr_t dw_weight, std::uintptr_t dw_scale, std::uintptr_t dw_shift,
             const std::string& mid_act, std::uintptr_t pw_scale, std::uintptr_t pw_shift,
             const std::string& out_act, int x, int residual, int y, bool y_transposed) {
            auto operands = lwk_bind::joint_operands<T>(dw_weight, dw_scale, dw_shift, mid_act,
                                                        pw_scale, pw_shift, out_act);
            operands.y_transposed = y_transposed;
            s.add_joint(std::move(packed), g, operands, x, residual, y);
          },
          py::arg("packed"), py::arg("geometry"), py::arg("dw_weight"), py::arg("dw_scale"),
          py::arg("dw_shift"), py::arg("mid_act"), py::arg("pw_scale"), py::arg("pw_shift"),
          py::arg("out_act"), py::arg("x"), py::arg("residual"), py::arg("y"),
          py::arg("y_transposed") = false)
      .def(
          "add_inverted_residual",
          [](Seq& s, std::shared_ptr<Packed> expand, std::shared_ptr<Packed> project,
             const lwk::InvertedResidualGeometry& g, std::uintptr_t expand_scale,
             std::uintptr_t expand_shift, const std::string& expand_act, std::uintptr_t dw_weight,
             std::uintptr_t dw_scale, std::uintptr_t dw_shift, const std::string& mid_act,
             std::uintptr_t project_scale, std::uintptr_t project_shift, const std::string& out_act,
             int x, int residual, int y, bool y_transposed) {
            auto operands = lwk_bind::inverted_residual_operands<T>(
                expand_scale, expand_shift, expand_act, dw_weight, dw_scale, dw_shift, mid_act,
                project_scale, project_shift, out_act);
            operands.y_transposed = y_transposed;
            s.add_inverted_residual(std::move(expand), std::move(project), g, operands, x, residual, y);
          },
          py::arg("expand"), py::arg("project"), py::arg("geometry"), py::arg("expand_scale"),
          py::arg("expand_shift"), py::arg("expand_act"), py::arg("dw_weight"), py::arg("dw_scale"),
          py::arg("dw_shift"), py::arg("mid_act"), py::arg("project_scale"),
          py::arg("project_shift"), py::arg("out_act"), py::arg("x"), py::arg("residual"),
          py::arg("y"), py::arg("y_transposed") = false)
      .def(
          "add_dense_conv",
          [](Seq& s, const lwk::DenseConvGeometry& g, std::uintptr_t weight, std::uintptr_t shift,
             const std::string& act, const std::string& isa, int x, int y, const std::string& out_layout) {
            s.add_dense_conv(g, as_ptr<T>(weight), as_ptr<T>(shift),
                             lwk_bind::activation_from_name(act), lwk_bind::isa_from_name(isa), x, y,
                             lwk_bind::layout_from_name(out_layout));
          },
          py::arg("geometry"), py::arg("weight"), py::arg("shift"), py::arg("act"), py::arg("isa"),
          py::arg("x"), py::arg("y"), py::arg("out_layout") = "nchw")
      .def(
          "add_transpose",
          [](Seq& s, int64_t batch, int64_t channels, int64_t pixels, bool to_nhwc, const std::string& isa,
             int x, int y) {
            s.add_transpose(batch, channels, pixels, to_nhwc, lwk_bind::isa_from_name(isa), x, y);
          },
          py::arg("batch"), py::arg("channels"), py::arg("pixels"), py::arg("to_nhwc"), py::arg("isa"),
          py::arg("x"), py::arg("y"))
      .def(
          "run",
          [](Seq& s, std::uintptr_t x, std::uintptr_t y, int num_threads) {
            py::gil_scoped_release release;
            s.run(as_ptr<T>(x), reinterpret_cast<T*>(y), num_threads);
          },
          py::arg("x"), py::arg("y"), py::arg("num_threads"))
      .def("set_image_group", &Seq::set_image_group, py::arg("images"),
           "Images per group of a run: 0 (default) from the cache budget, n > 0 n at a time.")
      .def_property_readonly("image_group", &Seq::image_group)
      .def("set_step_timing", &Seq::set_step_timing, py::arg("on"),
           "While on, each run records how long every call took (step_seconds).")
      .def_property_readonly("step_seconds", &Seq::step_seconds,
                             "Seconds per call of the last timed run, in the order added.")
      .def_property_readonly("step_region_seconds", &Seq::step_region_seconds,
                             "Per call of the last timed run: seconds inside its parallel regions.")
      .def_property_readonly("step_busy_seconds", &Seq::step_busy_seconds,
                             "Per call of the last timed run: seconds its tasks ran, summed over threads.")
      .def_property_readonly("step_threads", &Seq::step_threads,
                             "The thread count of the last timed run (0 before one).")
      .def("__len__", &Seq::size)
      .def_property_readonly("input_elems", &Seq::input_elems)
      .def_property_readonly("output_elems", &Seq::output_elems);
}

}  // namespace

void bind_call_sequence(py::module_& m) {
  bind_sequence<float>(m, "CallSequence_f32");
  bind_sequence<double>(m, "CallSequence_f64");
}
