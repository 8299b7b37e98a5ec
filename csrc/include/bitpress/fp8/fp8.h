// FP8 E4M3 (OCP "e4m3fn", torch.float8_e4m3fn) conversions shared by the CPU and CUDA kernels.
//
// E4M3: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. Exponent 0 holds the subnormals
// m * 2^-9; the code S.1111.111 (0x7F / 0xFF) is NaN; there are no infinities; the largest finite
// value is 0x7E = 1.75 * 2^8 = 448.
//
// The bitpress quantization rule (fp8_quantize, every backend): q = E4M3(x) rounded to nearest
// even, saturated to +-448 (so +-inf and anything beyond 448 give +-448), NaN stays NaN (sign
// kept, as torch's cast does). That is torch's `x.clamp(-448, 448).to(torch.float8_e4m3fn)`:
// torch's cast alone does not saturate (it turns |x| >= 464 into NaN).
//
// Decoding is exact into bfloat16 (8-bit exponent, 7 mantissa bits: E4M3 is a subset, its
// subnormals included) and so into float16, float32 and wider.
#pragma once

#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "bitpress/common/macros.h"

namespace bitpress {

constexpr float kE4M3Max = 448.0f;
constexpr uint8_t kE4M3MaxCode = 0x7E;  // +448
constexpr uint8_t kE4M3NaNCode = 0x7F;  // +NaN (0xFF: -NaN)

// The smallest scale fp8_quantize computes: scale = max(amax / 448, FLT_MIN). An all-zero row
// (amax 0) gets this finite, nonzero scale; so does a row whose amax / 448 underflows, so that
// x / scale never divides by zero (0/0 would be NaN). 2^-126, the smallest normal float32.
constexpr float kFp8MinScale = 1.17549435e-38f;

BITPRESS_INLINE bool e4m3_is_nan(uint8_t code) { return (code & 0x7F) == 0x7F; }

// E4M3 code -> bfloat16 bits, exact. Normal codes (exponent e > 0): rebias the exponent by
// 127 - 7 = 120 and widen the mantissa by 4 bits, one shift and one add of the magnitude. The 7
// subnormal magnitudes m * 2^-9 (m = 1..7) are normal in bf16: listed.
BITPRESS_INLINE uint16_t e4m3_to_bf16_bits(uint8_t code) {
  const uint16_t sign = uint16_t((code & 0x80u) << 8);
  const uint32_t mag = code & 0x7Fu;
  uint16_t out;
  if (mag == 0x7Fu) {
    out = 0x7FC0u;  // quiet NaN
  } else if (mag >= 8u) {
    out = uint16_t((mag << 4) + (120u << 7));
  } else {
    // m * 2^-9: 0, 2^-9, 2^-8, 1.5*2^-8, 2^-7, 1.25*2^-7, 1.5*2^-7, 1.75*2^-7.
    constexpr uint16_t kSub[8] = {0x0000, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};
    out = kSub[mag];
  }
  return uint16_t(sign | out);
}

// E4M3 code -> float32, exact (the bf16 bits widened).
BITPRESS_INLINE float e4m3_to_float(uint8_t code) {
  return bits_float(uint32_t(e4m3_to_bf16_bits(code)) << 16);
}

// E4M3 code -> float16 bits of value * 2^-8, exact for every finite code (subnormals included:
// the magnitude shifted into fp16's exponent/mantissa fields, the exponent bias 15 against 7).
// Vector decoders use it with a hardware fp16 -> fp32 conversion (F16C vcvtph2ps, exact and not
// subject to DAZ) and fold the 2^8 into the scale. NaN codes map to 1.875 (a finite value):
// callers that care test e4m3_is_nan.
BITPRESS_INLINE uint16_t e4m3_to_half_bits_scaled(uint8_t code) {
  return uint16_t(((code & 0x80u) << 8) | ((code & 0x7Fu) << 7));
}

// float32 -> E4M3 code: round to nearest even, saturate to +-448, NaN -> NaN (sign kept).
// The rounding follows c10::detail::fp8e4m3fn_from_fp32_value (torch's cast) on |x| < 448,
// so it equals x.clamp(-448, 448).to(torch.float8_e4m3fn) bit for bit.
BITPRESS_INLINE uint8_t float_to_e4m3(float f) {
  uint32_t bits = float_bits(f);
  const uint8_t sign = uint8_t((bits >> 24) & 0x80u);
  bits &= 0x7FFFFFFFu;
  if (bits > 0x7F800000u) return uint8_t(sign | kE4M3NaNCode);
  if (bits >= 0x43E00000u) return uint8_t(sign | kE4M3MaxCode);  // |f| >= 448 (and inf)
  uint8_t out;
  if (bits < (121u << 23)) {
    // |f| < 2^-6 (the smallest normal E4M3): adding 2^14 aligns the 2^-9 subnormal step with
    // float32's last mantissa bit, so the float add rounds to nearest even for us.
    constexpr uint32_t kDenormMagic = 141u << 23;  // 2^14
    const uint32_t r = float_bits(bits_float(bits) + bits_float(kDenormMagic));
    out = uint8_t(r - kDenormMagic);
  } else {
    // Normal: rebias the exponent (-120) and round the 20 dropped mantissa bits to nearest even.
    const uint32_t odd = (bits >> 20) & 1u;
    bits += (uint32_t(7 - 127) << 23) + 0x7FFFFu + odd;
    out = uint8_t(bits >> 20);
  }
  return uint8_t(sign | out);
}

}  // namespace bitpress
