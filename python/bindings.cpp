// pybind11 binding of the torch-free CPU kernels (module lwkernels._C).
//
// Tensors cross this boundary as raw data addresses (Python ints, 0 for "absent"): the Python
// layer (lwkernels/cpu/backend.py) owns validation, memory layout and lifetime, so this file only
// converts arguments, releases the GIL and calls csrc/.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "../csrc/joint_block.h"
#include "../csrc/parallel.h"
#include "addresses.h"
#include "enum_names.h"
#include "geometry_fields.h"
#include "operands.h"

namespace py = pybind11;

void bind_training(py::module_& m);  // train_bindings.cpp
void bind_output_tensors(py::module_& m);  // output_tensors.cpp
void bind_dense_conv(py::module_& m);  // dense_conv_bindings.cpp
void bind_inverted_residual(py::module_& m);  // inverted_residual_bindings.cpp
void bind_state_snapshot(py::module_& m);  // state_snapshot.cpp
void bind_call_sequence(py::module_& m);  // call_sequence_bindings.cpp

namespace {

using lwk_bind::as_ptr;

using lwk_bind::activation_from_name;
using lwk_bind::isa_from_name;
using lwk_bind::layout_from_name;

template <typename T>
void bind_dtype(py::module_& m, const char* suffix) {
  using Packed = lwk::PackedPointwise<T>;
  const std::string packed_name = std::string("PackedPointwise") + suffix;
  // pybind11 holders cannot be shared_ptr<const T>; the object is immutable all the same.
  py::class_<Packed, std::shared_ptr<Packed>>(m, packed_name.c_str())
      .def_property_readonly("isa", [](const Packed& p) { return lwk::isa_name(p.isa()); })
      .def_property_readonly("layout", [](const Packed& p) {
        return p.layout() == lwk::Layout::kNHWC ? "nhwc" : "nchw";
      })
      .def_property_readonly("out_channels", &Packed::out_channels)
      .def_property_readonly("in_channels", &Packed::in_channels);

  // One name per dtype; joint_forward below is overloaded on the packed type instead.
  m.def(
      (std::string("pack_pointwise_") + suffix).c_str(),
      [](const std::string& isa, const std::string& layout, std::uintptr_t weight, int64_t c_out,
         int64_t c_in, int num_threads) {
        const T* w = as_ptr<T>(weight);
        std::shared_ptr<const Packed> packed;
        {
          py::gil_scoped_release release;
          packed = lwk::pack_pointwise<T>(isa_from_name(isa), layout_from_name(layout), w, c_out, c_in,
                                          num_threads);
        }
        return std::const_pointer_cast<Packed>(packed);
      },
      py::arg("isa"), py::arg("layout"), py::arg("weight"),
      py::arg("out_channels"), py::arg("in_channels"), py::arg("num_threads") = 1);

  m.def(
      (std::string("fold_depthwise_") + suffix).c_str(),
      [](const std::string& layout, int64_t channels, int64_t taps, std::uintptr_t weight,
         std::uintptr_t scale, std::uintptr_t shift, std::uintptr_t folded_weight,
         std::uintptr_t folded_shift) {
        lwk::fold_depthwise<T>(layout_from_name(layout), channels, taps, as_ptr<T>(weight),
                               as_ptr<T>(scale), as_ptr<T>(shift),
                               reinterpret_cast<T*>(folded_weight), reinterpret_cast<T*>(folded_shift));
      },
      py::arg("layout"), py::arg("channels"), py::arg("taps"), py::arg("weight"), py::arg("scale"),
      py::arg("shift"), py::arg("folded_weight"), py::arg("folded_shift"),
      "The depthwise weights times scale in the layout's order, and the shift, as the kernels read "
      "them (a call given them with dw_folded=True skips its own fold).");

  m.def(
      "joint_forward",
      [](const Packed& packed, const lwk::JointGeometry& geometry, std::uintptr_t x,
         std::uintptr_t dw_weight, std::uintptr_t dw_scale, std::uintptr_t dw_shift,
         const std::string& mid_act, std::uintptr_t pw_scale, std::uintptr_t pw_shift,
         std::uintptr_t residual, const std::string& out_act, std::uintptr_t y, int num_threads,
         std::uintptr_t y_sum, std::uintptr_t y_sumsq, bool dw_folded) {
        auto t = lwk_bind::joint_operands<T>(dw_weight, dw_scale, dw_shift, mid_act, pw_scale,
                                             pw_shift, out_act);
        t.x = as_ptr<T>(x);
        t.residual = as_ptr<T>(residual);
        t.y = reinterpret_cast<T*>(y);
        t.y_sum = reinterpret_cast<double*>(y_sum);
        t.y_sumsq = reinterpret_cast<double*>(y_sumsq);
        t.dw_folded = dw_folded;
        py::gil_scoped_release release;
        lwk::joint_forward<T>(packed, geometry, t, num_threads);
      },
      py::arg("packed"), py::arg("geometry"), py::arg("x"), py::arg("dw_weight"),
      py::arg("dw_scale"), py::arg("dw_shift"), py::arg("mid_act"), py::arg("pw_scale"),
      py::arg("pw_shift"), py::arg("residual"), py::arg("out_act"), py::arg("y"),
      py::arg("num_threads"), py::arg("y_sum") = 0, py::arg("y_sumsq") = 0,
      py::arg("dw_folded") = false);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lwkernels CPU kernels (torch-free); use through lwkernels, not directly.";

  py::class_<lwk::JointGeometry> joint_geometry(m, "JointGeometry");
  lwk_bind::bind_geometry(joint_geometry, lwk_bind::conv_fields<lwk::JointGeometry>(), {"layout"},
                          [](lwk::JointGeometry& g, const py::kwargs& kw) {
                            lwk_bind::set_layout(g, kw, "JointGeometry");
                          });
  joint_geometry.def("validate", [](const lwk::JointGeometry& g) { return lwk::validate(g); });

  bind_dtype<float>(m, "f32");
  bind_dtype<double>(m, "f64");

  m.def("isa_supported", [](const std::string& name) { return lwk::isa_supported(isa_from_name(name)); });
  m.def("best_isa", []() { return std::string(lwk::isa_name(lwk::best_isa())); });
  // os.environ.get(name) without the Mapping's encoding and lookups (the replays read
  // LWKERNELS_CPU_ISA on every call; lwkernels/cpu/backend.py isa_env). os.environ's writes go
  // through putenv/unsetenv, so both see the same value; decoded as os.environ decodes it.
  m.def(
      "environment_value",
      [](const py::str& name) -> py::object {
        const char* value = std::getenv(std::string(name).c_str());
        if (value == nullptr) return py::none();
        PyObject* decoded = PyUnicode_DecodeFSDefault(value);
        if (decoded == nullptr) throw py::error_already_set();  // (out of memory: the decoder escapes bad bytes)
        return py::reinterpret_steal<py::object>(decoded);
      },
      py::arg("name"), "The environment variable's value, None when it is unset.");
  m.def("set_parallel_backend", [](const std::string& name) {
    if (name == "auto") return lwk::set_parallel_backend(lwk::ParallelBackend::kAuto);
    if (name == "threadpool") return lwk::set_parallel_backend(lwk::ParallelBackend::kThreadPool);
    if (name == "openmp") return lwk::set_parallel_backend(lwk::ParallelBackend::kHostOpenMP);
    throw std::invalid_argument("unknown parallel backend '" + name +
                                "' (expected auto, openmp or threadpool)");
  });
  m.def("parallel_backend_in_use", &lwk::parallel_backend_in_use);
  bind_training(m);
  bind_output_tensors(m);
  bind_dense_conv(m);
  bind_inverted_residual(m);
  bind_state_snapshot(m);
  bind_call_sequence(m);
}
