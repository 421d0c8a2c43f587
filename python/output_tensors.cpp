// Tensors for the kernels' outputs whose memory comes from lwk's buffer pool (csrc/buffer_pool.h),
// handed to PyTorch through DLPack: `pooled_tensor(shape, strides, itemsize)` returns a "dltensor"
// capsule for torch.from_dlpack, whose deleter gives the buffer back to the pool when PyTorch frees
// the tensor's storage. Only the DLPack ABI is used (declared below), no torch headers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <new>
#include <stdexcept>
#include <vector>

#include "buffer_pool.h"

namespace py = pybind11;

namespace {

// The DLPack ABI (dlpack.h, unversioned DLManagedTensor), as much of it as a CPU float tensor needs.
struct DLDevice {
  int32_t device_type;  // kDLCPU = 1
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // kDLFloat = 2
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

// What a capsule owns: the buffer, its size and the shape/strides arrays DLTensor points to.
struct Owner {
  DLManagedTensor managed{};
  std::vector<int64_t> shape, strides;
  std::size_t bytes = 0;
};

void release_owner(DLManagedTensor* self) {
  Owner* owner = static_cast<Owner*>(self->manager_ctx);
  lwk::pool_release(self->dl_tensor.data, owner->bytes);
  delete owner;
}

// A capsule PyTorch never consumed (still named "dltensor") owns its tensor.
void capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    managed->deleter(managed);
  }
}

py::capsule pooled_tensor(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides,
                          int itemsize) {
  if (shape.size() != strides.size()) throw std::invalid_argument("pooled_tensor: shape and strides differ in rank");
  if (itemsize != 4 && itemsize != 8) throw std::invalid_argument("pooled_tensor: itemsize must be 4 or 8");
  // Bytes spanned by the strides (dense layouts: the element count), at least one element.
  int64_t span = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0 || strides[i] < 0) throw std::invalid_argument("pooled_tensor: negative size or stride");
    if (shape[i] == 0) span = 0;
  }
  if (span != 0) {
    for (std::size_t i = 0; i < shape.size(); ++i) span += (shape[i] - 1) * strides[i];
  }
  auto* owner = new Owner;
  owner->shape = shape;
  owner->strides = strides;
  owner->bytes = static_cast<std::size_t>(span > 0 ? span : 1) * static_cast<std::size_t>(itemsize);
  try {
    owner->managed.dl_tensor.data = lwk::pool_acquire(owner->bytes);
  } catch (...) {
    delete owner;
    throw;
  }
  DLTensor& t = owner->managed.dl_tensor;
  t.device = DLDevice{1, 0};
  t.ndim = static_cast<int32_t>(shape.size());
  t.dtype = DLDataType{2, static_cast<uint8_t>(itemsize * 8), 1};
  t.shape = owner->shape.data();
  t.strides = owner->strides.data();
  t.byte_offset = 0;
  owner->managed.manager_ctx = owner;
  owner->managed.deleter = &release_owner;
  return py::capsule(&owner->managed, "dltensor", &capsule_destructor);
}

}  // namespace

void bind_output_tensors(py::module_& m) {
  m.def("pooled_tensor", &pooled_tensor, py::arg("shape"), py::arg("strides"), py::arg("itemsize"),
        "A DLPack capsule of an uninitialised CPU float tensor whose memory comes from the output "
        "buffer pool and goes back to it when the tensor is freed.");
  m.def("set_output_pool_limit", [](std::size_t bytes) { lwk::pool_set_limit(bytes); }, py::arg("bytes"));
  m.def("trim_output_pool", &lwk::pool_trim);
  m.def("output_pool_stats", [] {
    const lwk::BufferPoolStats s = lwk::pool_stats();
    py::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["limit_bytes"] = s.limit_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  });
}
