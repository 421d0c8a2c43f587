// RecentResults: a calling thread's memory of a pure function's recent results, keyed by a fixed
// number of integers. The fused calls choose their tiling on every call with cost models that take
// microseconds (up to ~7 us for a 512->512 block at 14x14), on the caller's thread while the other
// threads wait, for the few geometries a model repeats on every call. Not part of the public API.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace lwk {
namespace detail {

template <std::size_t N, class Value, std::size_t Entries = 64>
class RecentResults {
 public:
  using Key = std::array<int64_t, N>;

  // The value remembered for `key`, else compute() remembered in place of the oldest entry once
  // all are taken. The key must hold everything compute() reads (settings included).
  template <class Compute>
  Value get(const Key& key, Compute compute) {
    for (std::size_t i = 0; i < used_; ++i) {
      if (keys_[i] == key) return values_[i];
    }
    const Value value = compute();
    const std::size_t slot = used_ < Entries ? used_++ : oldest_++ % Entries;
    keys_[slot] = key;
    values_[slot] = value;
    return value;
  }

  std::size_t size() const { return used_; }

 private:
  std::array<Key, Entries> keys_{};
  std::array<Value, Entries> values_{};
  std::size_t used_ = 0, oldest_ = 0;
};

}  // namespace detail
}  // namespace lwk
