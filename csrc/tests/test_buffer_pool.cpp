// Tests of the output buffer pool (buffer_pool.h): reuse by size, never two holders of one buffer,
// the limit, trimming, and releases from many threads at once (run under ASan/UBSan in CI).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

#include "buffer_pool.h"
#include "check.h"

namespace {

using lwk_test::g_failures;

void test_reuse_and_alignment() {
  lwk::pool_set_limit(std::size_t(64) << 20);
  lwk::pool_trim();
  const lwk::BufferPoolStats s0 = lwk::pool_stats();
  void* a = lwk::pool_acquire(100000);
  void* b = lwk::pool_acquire(100000);
  CHECK(a != b, "two live buffers must differ");
  CHECK(reinterpret_cast<std::uintptr_t>(a) % 64 == 0, "buffers are 64-byte aligned");
  std::memset(a, 1, 100000);
  std::memset(b, 2, 100000);
  lwk::pool_release(a, 100000);
  CHECK(lwk::pool_stats().cached_bytes == s0.cached_bytes + 102400, "a released buffer waits (in whole pages)");
  void* c = lwk::pool_acquire(99000);  // the same number of pages: served from the cache
  CHECK(c == a, "a request of the same rounded size reuses the released buffer");
  CHECK(lwk::pool_stats().hits == s0.hits + 1, "the reuse counts as a hit");
  void* d = lwk::pool_acquire(200000);
  CHECK(d != a && d != b, "a different size never gets a live buffer");
  lwk::pool_release(b, 100000);
  lwk::pool_release(c, 99000);
  lwk::pool_release(d, 200000);
  lwk::pool_trim();
  CHECK(lwk::pool_stats().cached_bytes == 0, "trim frees every cached buffer");
}

void test_limit() {
  lwk::pool_trim();
  lwk::pool_set_limit(3 * 4096);
  void* p[4];
  for (void*& q : p) q = lwk::pool_acquire(4096);
  for (void* q : p) lwk::pool_release(q, 4096);
  CHECK(lwk::pool_stats().cached_bytes == 3 * 4096, "no more than the limit waits");
  lwk::pool_set_limit(4096);
  CHECK(lwk::pool_stats().cached_bytes == 4096, "lowering the limit frees the excess");
  lwk::pool_set_limit(0);
  CHECK(lwk::pool_stats().cached_bytes == 0, "limit 0 keeps nothing");
  void* q = lwk::pool_acquire(0);  // zero bytes: still a valid, distinct buffer
  CHECK(q != nullptr, "a zero-byte request gets a buffer");
  lwk::pool_release(q, 0);
  lwk::pool_release(nullptr, 10);  // ignored
}

void test_threads() {
  lwk::pool_set_limit(std::size_t(16) << 20);
  std::vector<std::thread> threads;
  std::vector<int> bad(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([t, &bad] {
      for (int i = 0; i < 2000; ++i) {
        const std::size_t n = 4096 * std::size_t(1 + (i + t) % 5);
        auto* a = static_cast<unsigned char*>(lwk::pool_acquire(n));
        std::memset(a, t, n);
        for (std::size_t k = 0; k < n; k += 512) bad[t] += a[k] != static_cast<unsigned char>(t);
        lwk::pool_release(a, n);
      }
    });
  }
  for (auto& th : threads) th.join();
  int total = 0;
  for (int v : bad) total += v;
  CHECK(total == 0, "no buffer is handed to two threads at once (%d overwritten bytes)", total);
  lwk::pool_trim();
}

}  // namespace

int main() {
  test_reuse_and_alignment();
  test_limit();
  test_threads();
  if (g_failures) {
    std::fprintf(stderr, "%d buffer pool check(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("buffer pool: all checks passed\n");
  return 0;
}
