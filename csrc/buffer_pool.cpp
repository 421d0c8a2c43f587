#include "buffer_pool.h"

#include <map>
#include <mutex>
#include <new>
#include <vector>

namespace lwk {
namespace {

constexpr std::size_t kAlign = 64;
constexpr std::size_t kPage = 4096;

std::size_t rounded(std::size_t bytes) {
  const std::size_t b = bytes ? bytes : 1;
  return (b + kPage - 1) / kPage * kPage;
}

struct Pool {
  std::mutex mu;
  std::map<std::size_t, std::vector<void*>> free_by_size;
  std::size_t cached = 0;
  std::size_t limit = std::size_t(1) << 30;  // 1 GiB; lwkernels sets its own default
  std::uint64_t hits = 0, misses = 0;

  // Frees cached buffers, largest first, until at most `keep` bytes remain. Holds mu.
  void shrink_to(std::size_t keep) {
    while (cached > keep && !free_by_size.empty()) {
      auto it = std::prev(free_by_size.end());
      while (!it->second.empty() && cached > keep) {
        ::operator delete(it->second.back(), std::align_val_t(kAlign));
        it->second.pop_back();
        cached -= it->first;
      }
      if (it->second.empty()) free_by_size.erase(it);
    }
  }
};

// Never destroyed: tensors holding pooled buffers may be freed during interpreter shutdown,
// after static destructors would have run.
Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

}  // namespace

void* pool_acquire(std::size_t bytes) {
  const std::size_t size = rounded(bytes);
  Pool& P = pool();
  {
    std::lock_guard<std::mutex> lock(P.mu);
    auto it = P.free_by_size.find(size);
    if (it != P.free_by_size.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      P.cached -= size;
      ++P.hits;
      return p;
    }
    ++P.misses;
  }
  return ::operator new(size, std::align_val_t(kAlign));
}

void pool_release(void* p, std::size_t bytes) noexcept {
  if (p == nullptr) return;
  const std::size_t size = rounded(bytes);
  Pool& P = pool();
  {
    std::lock_guard<std::mutex> lock(P.mu);
    if (P.cached + size <= P.limit) {
      try {
        P.free_by_size[size].push_back(p);
        P.cached += size;
        return;
      } catch (...) {  // no memory for the bookkeeping: free the buffer instead
      }
    }
  }
  ::operator delete(p, std::align_val_t(kAlign));
}

void pool_set_limit(std::size_t bytes) {
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  P.limit = bytes;
  P.shrink_to(bytes);
}

void pool_trim() {
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  P.shrink_to(0);
}

BufferPoolStats pool_stats() {
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  BufferPoolStats s;
  s.cached_bytes = P.cached;
  s.limit_bytes = P.limit;
  s.hits = P.hits;
  s.misses = P.misses;
  return s;
}

}  // namespace lwk
