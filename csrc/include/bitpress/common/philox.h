// Philox4x32-10, the counter-based generator of Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3" (SC 2011; Random123). A pure function of a 128-bit counter and a 64-bit key, so that
// any element of a stream is computed on its own, in any order, by any thread, with the same bits
// on the CPU, on a GPU and in the plain-torch reference (python/bitpress/reference.py implements
// the same rounds in int64 arithmetic; the Triton backend calls tl.philox, which is the same
// function: the tests check all of them against each other and against Random123's kat_vectors).
//
// The streams of bitpress (documented here once, used by every backend):
//
//   key     = (seed mod 2^32, seed >> 32)                      seed: int64, taken as its 64 bits
//   counter = (offset mod 2^32, offset >> 32, position, 0)     offset: int64, position: uint32
//
// spec_verify draws one counter per (row, position): word 0 drives the accept test and word 1 the
// token sampled at that position (the correction or the bonus token); words 2 and 3 are unused.
//
// A float uniform in [0, 1) keeps the top 24 bits of a word: u = (bits >> 8) * 2^-24. Every value
// is exact in float32, u < 1 always, and u = 0 is possible (P = 2^-24).
#pragma once

#include <stdint.h>

#include "bitpress/common/macros.h"

namespace bitpress {

struct Philox4x32 {
  uint32_t v[4];
};

// Round constants of Philox4x32 (Random123, philox.h): multipliers and the Weyl key increments.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

BITPRESS_INLINE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds; the key is bumped between rounds (not after the last).
BITPRESS_INLINE Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                         uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = philox_mulhi(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = philox_mulhi(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The four words at (seed, offset, position) of the streams described above.
BITPRESS_INLINE Philox4x32 philox_stream(int64_t seed, int64_t offset, uint32_t position) {
  const uint64_t s = uint64_t(seed), o = uint64_t(offset);
  return philox4x32_10(uint32_t(o), uint32_t(o >> 32), position, 0u, uint32_t(s),
                       uint32_t(s >> 32));
}

// u = (bits >> 8) * 2^-24: 24 random bits, exact in float32, in [0, 1).
BITPRESS_INLINE float uniform_from_bits(uint32_t bits) {
  return float(bits >> 8) * 5.9604644775390625e-08f;
}

}  // namespace bitpress
