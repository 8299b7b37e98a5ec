// Element types of the kernel API and exact float <-> fp16/bf16 conversions.
//
// The conversions are bit-exact round-to-nearest-even, identical to what torch's
// `.to(torch.float16/bfloat16)` and the CUDA intrinsics (__float2half_rn, __float2bfloat16_rn)
// produce, so that the CPU kernels, the CUDA kernels and the plain-torch reference agree bit
// for bit wherever the math is the same. They are __host__ __device__ and unit-tested on the CPU
// (tests/cpp/test_helpers.cpp), exhaustively for 16-bit inputs.
#pragma once

#include <stdint.h>
#include <string.h>

#include "bitpress/common/macros.h"

namespace bitpress {

// Every element type of the API, with its size (dtype_size) and torch's name (dtype_name). The
// numeric values are part of the ABI: append, never renumber.
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat8E4M3 = 3,  // float8_e4m3fn: 1 sign, 4 exponent, 3 mantissa bits; max 448, no infinities
  kFloat8E5M2 = 4,  // float8_e5m2: 1 sign, 5 exponent, 2 mantissa bits; IEEE-like (inf, NaN)
};

// Size of one element in bytes; 0 for a value that is no enumerator (the API takes DType from
// callers that may cast ints: check with dtype_known, or treat 0 as an invalid argument).
BITPRESS_INLINE constexpr int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat8E4M3:
    case DType::kFloat8E5M2:
      return 1;
  }
  return 0;
}

// torch's name of the dtype (torch.float8_e4m3fn, ...); "unknown" for a value that is no
// enumerator.
BITPRESS_INLINE constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat8E4M3:
      return "float8_e4m3fn";
    case DType::kFloat8E5M2:
      return "float8_e5m2";
  }
  return "unknown";
}

// Whether `t` is one of the enumerators.
BITPRESS_INLINE constexpr bool dtype_known(DType t) { return dtype_size(t) != 0; }

// Whether `t` is fp32, fp16 or bf16: the types the int4 and spec_verify kernels load and store
// (activations, scales, logits, outputs). fp8 is a valid DType that they reject.
BITPRESS_INLINE constexpr bool dtype_valid(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

BITPRESS_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

BITPRESS_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// bfloat16 is the top half of a float32: widening is a shift.
BITPRESS_INLINE float bf16_bits_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// Round to nearest even by adding 0x7fff plus the lowest kept bit; NaNs stay quiet NaNs
// (adding could otherwise carry a NaN payload into infinity).
BITPRESS_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

BITPRESS_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  if (em >= 0x7c00u) return bits_float(sign | 0x7f800000u | ((em & 0x3ffu) << 13));  // inf/NaN
  if (em >= 0x0400u) return bits_float(sign | ((em << 13) + ((127u - 15u) << 23)));  // normal
  // Subnormal or zero: em * 2^-24 is exact in float32.
  const float v = float(em) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

// Round to nearest even. Normal results: bias the exponent and add 0xfff plus the lowest kept
// mantissa bit before truncating 13 bits. Subnormal results: adding a magic float (2^-1 * 2^-13
// above the fp16 subnormal grid) lets the FPU's own RNE place the 10 mantissa bits.
// (F. Giesen, "float->half variants", 2016.) Requires IEEE float addition (no flush-to-zero).
BITPRESS_INLINE uint16_t float_to_half_bits(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint32_t o;
  if (u >= (143u << 23)) {  // |f| >= 2^16: inf, or NaN kept quiet
    o = (u > 0x7f800000u) ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {        // |f| < 2^-14: fp16 subnormal or zero
    const uint32_t magic = 126u << 23;  // 0.5f
    o = float_bits(bits_float(u) + bits_float(magic)) - magic;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd;
    o = u >> 13;  // values in [65520, 65536) carry into the exponent and become inf, as they must
  }
  return uint16_t(o | sign);
}

// Load one element of type `t` at index i of `p` as float. Only for fp32, fp16 and bf16
// (dtype_valid, which every caller checks first): any other type is read as fp32. (An explicit
// fp32 case with a NaN default would be safer, but it changes the SASS of the GEMM epilogues,
// which call this in unrolled loops.)
BITPRESS_INLINE float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16:
      return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kBFloat16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

}  // namespace bitpress
