// Scalar arithmetic of the bf16 dot-product instructions, as the Intel SDM defines it for
// TDPBF16PS and VDPBF16PS: bf16 inputs with denormals as zero (DAZ), float32 results with
// denormals flushed to zero (FTZ). Used by the host emulations of the microkernel variants.
#pragma once

#include <stdint.h>
#include <string.h>

namespace bitpress {

// bf16 bits -> float32 with DAZ (a denormal bf16 input counts as zero).
inline float bf16_daz(uint16_t h) {
  uint32_t u = (h & 0x7f80) ? uint32_t(h) << 16 : uint32_t(h & 0x8000) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// FTZ: a denormal float32 result becomes a zero of the same sign.
inline float ftz(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7f800000) == 0) u &= 0x80000000;
  memcpy(&f, &u, 4);
  return f;
}

}  // namespace bitpress
