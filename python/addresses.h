// Tensors cross the binding as raw data addresses (Python ints, 0 for "absent"); these turn them
// back into typed pointers.
#pragma once

#include <cstdint>

namespace lwk_bind {

template <typename T>
const T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<const T*>(address);
}

}  // namespace lwk_bind
