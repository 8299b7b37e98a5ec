// A minimal check macro for the C++ tests: count failures, print the first few, exit non-zero.
#pragma once

#include <cstdio>

inline int& check_failures() {
  static int n = 0;
  return n;
}

#define CHECK(cond, ...)                                                     \
  do {                                                                       \
    if (!(cond)) {                                                           \
      if (++check_failures() <= 20) {                                        \
        std::printf("%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                            \
        std::printf("\n");                                                   \
      }                                                                      \
    }                                                                        \
  } while (0)

inline int check_result(const char* name) {
  std::printf("%s: %s (%d failures)\n", name, check_failures() ? "FAILED" : "ok", check_failures());
  return check_failures() ? 1 : 0;
}
