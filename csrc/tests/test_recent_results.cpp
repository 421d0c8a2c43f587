// Tests of RecentResults (recent_results.h) and of the tilings it remembers: a remembered result is
// the one computed, a full memory forgets its oldest entry, and choose_tiling answers on a thread
// that has seen other geometries and settings what a fresh thread computes.
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#include "check.h"
#include "internal.h"
#include "recent_results.h"
#include "tiling.h"

namespace {

using lwk_test::g_failures;

void test_remembers_and_forgets() {
  lwk::detail::RecentResults<2, int64_t, 4> recent;
  int computed = 0;
  auto get = [&](int64_t a, int64_t b) {
    return recent.get({a, b}, [&] {
      ++computed;
      return a * 100 + b;
    });
  };
  CHECK(get(1, 2) == 102 && computed == 1, "the first request computes");
  CHECK(get(1, 2) == 102 && computed == 1, "a repeated key is remembered");
  CHECK(get(2, 1) == 201 && computed == 2, "keys differ in every position");
  for (int64_t k = 3; k <= 5; ++k) get(k, 0);  // fills the four entries, then replaces the oldest
  CHECK(recent.size() == 4, "the memory holds at most its entries (%zu)", recent.size());
  const int before = computed;
  CHECK(get(1, 2) == 102 && computed == before + 1, "the oldest entry was forgotten and is recomputed");
  CHECK(get(5, 0) == 500 && computed == before + 1, "a recent entry is still remembered");
}

// Geometries of the joint blocks of MobileNetV1 and MobileNetV2-class models, and awkward ones.
std::vector<lwk::JointGeometry> geometries() {
  std::vector<lwk::JointGeometry> out;
  const int64_t shapes[][5] = {  // batch, C, CO, output side, kernel
      {1, 32, 64, 112, 3},  {1, 512, 512, 14, 3}, {1, 1024, 1024, 7, 3}, {8, 256, 256, 28, 3},
      {1, 1152, 320, 7, 3}, {2, 96, 24, 56, 5},   {1, 7, 13, 9, 3},       {3, 160, 160, 1, 1}};
  for (const auto& s : shapes) {
    lwk::JointGeometry g;
    g.batch = s[0];
    g.in_channels = s[1];
    g.out_channels = s[2];
    g.in_h = g.in_w = g.out_h = g.out_w = s[3];
    g.kernel_h = g.kernel_w = s[4];
    g.pad_h = g.pad_w = s[4] / 2;
    out.push_back(g);
  }
  return out;
}

bool same(const lwk::detail::Tiling& a, const lwk::detail::Tiling& b) {
  return a.tile_px == b.tile_px && a.n_tiles == b.n_tiles && a.co_chunk == b.co_chunk && a.n_co == b.n_co &&
         a.shared_dw == b.shared_dw;
}

lwk::detail::Tiling on_fresh_thread(const lwk::JointGeometry& g, const lwk::detail::TileShape& ts, int threads) {
  lwk::detail::Tiling t{};
  std::thread([&] { t = lwk::detail::choose_tiling(g, 4, ts, threads); }).join();
  return t;
}

void test_tilings_follow_settings() {
  using lwk::detail::TileShape;
  const TileShape shapes[] = {{8, 16, 48, true}, {4, 8, 24, false}};
  const std::size_t budgets[] = {0, 16384, 1 << 20};
  int checked = 0, differ = 0, differ_mode = 0;
  // The settings vary innermost, so that a key missing one would return another setting's
  // remembered tiling. Twice over, so that the second pass finds every answer remembered.
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& g : geometries()) {
      for (const TileShape& ts : shapes) {
        for (int threads : {1, 2}) {
          for (int mode : {-1, 0, 1}) {
            lwk::detail::set_shared_depthwise(mode);
            for (std::size_t budget : budgets) {
              lwk::detail::set_tile_budget_bytes(budget);
              const lwk::detail::Tiling here = lwk::detail::choose_tiling(g, 4, ts, threads);
              const lwk::detail::Tiling fresh = on_fresh_thread(g, ts, threads);
              CHECK(same(here, fresh),
                    "pass %d, budget %zu, mode %d, %lld->%lld at %lld, %d threads: remembered tiling "
                    "%lld px x %lld, %lld ch x %lld differs from a fresh thread's %lld px x %lld, %lld ch x %lld",
                    pass, budget, mode, (long long)g.in_channels, (long long)g.out_channels,
                    (long long)g.out_h, threads, (long long)here.tile_px, (long long)here.n_tiles,
                    (long long)here.co_chunk, (long long)here.n_co, (long long)fresh.tile_px,
                    (long long)fresh.n_tiles, (long long)fresh.co_chunk, (long long)fresh.n_co);
              ++checked;
              if (pass == 0 && mode == -1 && budget == 16384) {
                // The budget changes the answer somewhere (else this test could not fail).
                lwk::detail::set_tile_budget_bytes(0);
                differ += !same(on_fresh_thread(g, ts, threads), here);
                lwk::detail::set_tile_budget_bytes(budget);
              }
              if (pass == 0 && mode == 1 && budget == 0) {
                lwk::detail::set_shared_depthwise(0);
                differ_mode += !same(on_fresh_thread(g, ts, threads), here);
                lwk::detail::set_shared_depthwise(mode);
              }
            }
          }
        }
      }
    }
  }
  lwk::detail::set_tile_budget_bytes(0);
  lwk::detail::set_shared_depthwise(-1);
  CHECK(differ > 0, "a 16 KiB tile budget changed no tiling of the grid");
  CHECK(differ_mode > 0, "forcing the shared-depthwise mode changed no tiling of the grid");
  std::printf("tilings: %d checked against fresh threads, %d changed by a smaller budget, %d by the shared mode\n",
              checked, differ, differ_mode);
}

}  // namespace

int main() {
  test_remembers_and_forgets();
  test_tilings_follow_settings();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("recent results: all checks passed\n");
  return 0;
}
