// pybind11 binding of the torch-free CPU kernels (module lwkernels._C).
//
// Tensors cross this boundary as raw data addresses (Python ints, 0 for "absent"): the Python
// layer (lwkernels/cpu/backend.py) owns validation, memory layout and lifetime, so this file only
// converts arguments, releases the GIL and calls csrc/.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../csrc/joint_block.h"
#include "../csrc/parallel.h"
#include "enum_names.h"

namespace py = pybind11;

void bind_training(py::module_& m);  // train_bindings.cpp
void bind_output_tensors(py::module_& m);  // output_tensors.cpp
void bind_dense_conv(py::module_& m);  // dense_conv_bindings.cpp
void bind_inverted_residual(py::module_& m);  // inverted_residual_bindings.cpp

namespace {

using lwk_bind::activation_from_name;
using lwk_bind::isa_from_name;
using lwk_bind::layout_from_name;

template <typename T>
const T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<const T*>(address);
}

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
      "joint_forward",
      [](const Packed& packed, const lwk::JointGeometry& geometry, std::uintptr_t x,
         std::uintptr_t dw_weight, std::uintptr_t dw_scale, std::uintptr_t dw_shift,
         const std::string& mid_act, std::uintptr_t pw_scale, std::uintptr_t pw_shift,
         std::uintptr_t residual, const std::string& out_act, std::uintptr_t y, int num_threads,
         std::uintptr_t y_sum, std::uintptr_t y_sumsq) {
        lwk::JointTensors<T> t;
        t.x = as_ptr<T>(x);
        t.dw_weight = as_ptr<T>(dw_weight);
        t.dw_scale = as_ptr<T>(dw_scale);
        t.dw_shift = as_ptr<T>(dw_shift);
        t.mid_act = activation_from_name(mid_act);
        t.pw_scale = as_ptr<T>(pw_scale);
        t.pw_shift = as_ptr<T>(pw_shift);
        t.residual = as_ptr<T>(residual);
        t.out_act = activation_from_name(out_act);
        t.y = reinterpret_cast<T*>(y);
        t.y_sum = reinterpret_cast<double*>(y_sum);
        t.y_sumsq = reinterpret_cast<double*>(y_sumsq);
        py::gil_scoped_release release;
        lwk::joint_forward<T>(packed, geometry, t, num_threads);
      },
      py::arg("packed"), py::arg("geometry"), py::arg("x"), py::arg("dw_weight"),
      py::arg("dw_scale"), py::arg("dw_shift"), py::arg("mid_act"), py::arg("pw_scale"),
      py::arg("pw_shift"), py::arg("residual"), py::arg("out_act"), py::arg("y"),
      py::arg("num_threads"), py::arg("y_sum") = 0, py::arg("y_sumsq") = 0);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lwkernels CPU kernels (torch-free); use through lwkernels, not directly.";

  py::class_<lwk::JointGeometry>(m, "JointGeometry")
      .def(py::init([](int64_t batch, int64_t in_channels, int64_t in_h, int64_t in_w,
                       int64_t out_channels, int64_t out_h, int64_t out_w, int64_t kernel_h,
                       int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                       int64_t pad_w, int64_t dil_h, int64_t dil_w, const std::string& layout) {
             lwk::JointGeometry g;
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
             g.layout = layout_from_name(layout);
             return g;
           }),
           py::kw_only(), py::arg("batch"), py::arg("in_channels"), py::arg("in_h"),
           py::arg("in_w"), py::arg("out_channels"), py::arg("out_h"), py::arg("out_w"),
           py::arg("kernel_h"), py::arg("kernel_w"), py::arg("stride_h"), py::arg("stride_w"),
           py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"), py::arg("dil_w"),
           py::arg("layout"))
      .def_readonly("batch", &lwk::JointGeometry::batch)
      .def_readonly("in_channels", &lwk::JointGeometry::in_channels)
      .def_readonly("in_h", &lwk::JointGeometry::in_h)
      .def_readonly("in_w", &lwk::JointGeometry::in_w)
      .def_readonly("out_channels", &lwk::JointGeometry::out_channels)
      .def_readonly("out_h", &lwk::JointGeometry::out_h)
      .def_readonly("out_w", &lwk::JointGeometry::out_w)
      .def_readonly("kernel_h", &lwk::JointGeometry::kernel_h)
      .def_readonly("kernel_w", &lwk::JointGeometry::kernel_w)
      .def_readonly("stride_h", &lwk::JointGeometry::stride_h)
      .def_readonly("stride_w", &lwk::JointGeometry::stride_w)
      .def_readonly("pad_h", &lwk::JointGeometry::pad_h)
      .def_readonly("pad_w", &lwk::JointGeometry::pad_w)
      .def_readonly("dil_h", &lwk::JointGeometry::dil_h)
      .def_readonly("dil_w", &lwk::JointGeometry::dil_w)
      .def("validate", [](const lwk::JointGeometry& g) { return lwk::validate(g); });

  bind_dtype<float>(m, "f32");
  bind_dtype<double>(m, "f64");

  m.def("isa_supported", [](const std::string& name) { return lwk::isa_supported(isa_from_name(name)); });
  m.def("best_isa", []() { return std::string(lwk::isa_name(lwk::best_isa())); });
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
}
