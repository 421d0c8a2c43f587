// Tests of the NCHW <-> NHWC image transposes (transpose.h) on every path this CPU runs, float and
// double, 1 and 2 threads: the result must equal the element-by-element definition exactly, on
// shapes with whole register tiles, ragged edges on either side, one channel or one pixel, several
// images, the 64-pixel band edges and a 1024-channel image (rows 4 KiB apart). The destination's
// guard elements around the image must stay untouched.
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string_view>
#include <vector>

#include "check.h"
#include "joint_block.h"
#include "transpose.h"

namespace {

using lwk::Isa;
using lwk_test::g_failures;

template <typename T>
void run_case(Isa isa, int64_t batch, int64_t channels, int64_t pixels, bool to_nhwc, int threads) {
  const int64_t n = batch * channels * pixels;
  constexpr int64_t kGuard = 17;
  std::vector<T> src(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) src[i] = static_cast<T>(i % 65521) + T(0.25);
  std::vector<T> dst(static_cast<std::size_t>(n + 2 * kGuard), T(-7));
  lwk::transpose_images<T>(src.data(), dst.data() + kGuard, batch, channels, pixels, to_nhwc, isa, threads);
  int64_t wrong = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t p = 0; p < pixels; ++p) {
        const int64_t nchw = (b * channels + c) * pixels + p, nhwc = (b * pixels + p) * channels + c;
        const T want = to_nhwc ? src[nchw] : src[nhwc];
        const T got = dst[kGuard + (to_nhwc ? nhwc : nchw)];
        wrong += got != want;
      }
    }
  }
  int64_t guards = 0;
  for (int64_t i = 0; i < kGuard; ++i) guards += (dst[i] != T(-7)) + (dst[kGuard + n + i] != T(-7));
  CHECK(wrong == 0 && guards == 0, "%s %s batch %lld channels %lld pixels %lld %s threads %d: %lld wrong, %lld "
        "guard elements written", lwk::isa_name(isa), sizeof(T) == 4 ? "float" : "double",
        static_cast<long long>(batch), static_cast<long long>(channels), static_cast<long long>(pixels),
        to_nhwc ? "to NHWC" : "to NCHW", threads, static_cast<long long>(wrong), static_cast<long long>(guards));
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string_view(argv[1]) == "--quick";
  std::vector<Isa> isas;
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (lwk::isa_supported(i)) isas.push_back(i);
  }
  struct Shape { int64_t batch, channels, pixels; };
  std::vector<Shape> shapes = {{1, 1, 1},   {1, 1, 37},  {1, 37, 1},   {1, 16, 16},  {1, 8, 8},
                               {1, 4, 4},   {1, 3, 50},  {2, 17, 33},  {1, 32, 64},  {3, 24, 65},
                               {1, 64, 196}, {2, 40, 49}, {1, 96, 129}, {1, 1024, 49}, {0, 5, 5}};
  if (!quick) shapes.push_back({1, 32, 12544});
  int runs = 0;
  for (Isa isa : isas) {
    for (const Shape& s : shapes) {
      for (bool to_nhwc : {true, false}) {
        for (int threads : {1, 2}) {
          run_case<float>(isa, s.batch, s.channels, s.pixels, to_nhwc, threads);
          run_case<double>(isa, s.batch, s.channels, s.pixels, to_nhwc, threads);
          runs += 2;
        }
      }
    }
  }
  bool threw = false;
  try {
    float v = 0;
    lwk::transpose_images<float>(&v, &v + 1, 1, 1, 1, true, static_cast<Isa>(99), 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "an unknown path must be refused with std::invalid_argument");
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all checks passed (%d transposes)\n", runs);
  return 0;
}
