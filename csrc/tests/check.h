// The C++ tests' assertion, shared by every test program: CHECK(cond, printf-style message)
// reports a failed condition with its file and line and counts it in g_failures, without
// stopping, so that one run lists every failure; main() turns a non-zero count into a failing
// exit status.
#pragma once

#include <cstdio>

namespace lwk_test {

inline int g_failures = 0;

}  // namespace lwk_test

#define CHECK(cond, ...)                                           \
  do {                                                             \
    if (!(cond)) {                                                 \
      ++::lwk_test::g_failures;                                    \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);    \
      std::fprintf(stderr, __VA_ARGS__);                           \
      std::fprintf(stderr, "\n");                                  \
    }                                                              \
  } while (0)
