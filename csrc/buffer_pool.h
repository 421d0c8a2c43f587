// A cache of the host buffers that hold the kernels' outputs, so that a network called again and
// again gets memory that is already mapped and touched.
//
// Why: PyTorch's CPU allocator passes allocations of this size (hundreds of KiB to tens of MiB) to
// malloc, which maps them afresh and unmaps them when freed, so every call of a block paid a page
// fault per 4 KiB page of its output (1,500 a LightweightNet call at batch 1, about a third of
// its time). Buffers released here wait, by size, for the next request of that size, up to a
// limit on the bytes kept; beyond it they are freed at once. Torch-free, thread-safe; buffers
// are 64-byte aligned. The bindings hand them to PyTorch as tensors whose deleter releases them
// here (python/output_tensors.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace lwk {

struct BufferPoolStats {
  std::size_t cached_bytes = 0;  // released and waiting for reuse
  std::size_t limit_bytes = 0;   // the most that waits
  std::uint64_t hits = 0;        // acquisitions served from the cache
  std::uint64_t misses = 0;      // acquisitions that allocated
};

// A buffer of at least `bytes` bytes (sizes are rounded up to whole 4 KiB pages, so that shapes
// whose sizes differ a little share buffers). Throws std::bad_alloc when memory runs out.
void* pool_acquire(std::size_t bytes);

// Returns a buffer from pool_acquire(bytes) (the same `bytes`). Callable from any thread, also
// while the process exits.
void pool_release(void* p, std::size_t bytes) noexcept;

// The most bytes that may wait for reuse (0: none; buffers are then freed when released). Frees
// cached buffers beyond it.
void pool_set_limit(std::size_t bytes);

// Frees every cached buffer (buffers in use are unaffected).
void pool_trim();

BufferPoolStats pool_stats();

}  // namespace lwk
