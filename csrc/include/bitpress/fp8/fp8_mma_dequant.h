// E4M3 -> fp16x2 / bf16x2 B fragments of mma.m16n8k16 by bit operations on packed 32-bit
// registers, and the index math of the CUDA fp8_weight_gemm kernel
// (csrc/fp8/fp8_weight_gemm_sm80.cu). Torch-free and __host__ __device__: the kernel calls exactly
// these functions, and tests/cpp/test_fp8_mma.cpp runs them on the CPU (all 256 codes for both
// output types; a whole warp's fragment loads and mma emulated from the PTX fragment tables).
//
// Decode (the idea of vLLM's FP8 Marlin; the code is bitpress's). An E4M3 byte s.eeee.mmm placed
// in the high byte of a 16-bit lane and shifted right keeps its sign and puts eeee.mmm at the top
// of a half's exponent and mantissa fields:
//   fp16:  s | (eeee.mmm << 7)  = 2^(e - 15) (1 + m/8), the E4M3 value 2^(e - 7) (1 + m/8) / 2^8
//   bf16:  s | (eeee.mmm << 4)  = 2^(e - 127) (1 + m/8) = the E4M3 value / 2^120
// and subnormals (e = 0) map to subnormals with the same factor. One packed multiply by 2^8
// (fp16) or 2^120 (bf16) fixes the bias; it is exact (a power of two, and every E4M3 value is an
// fp16 and a bf16 value: 3 mantissa bits, exponents -9 .. 8). E4M3 has no infinity; its NaN
// (s.1111.111) would come out as +-480, so the NaN codes get their exponent field filled (an OR
// after the multiply): NaN weights give NaN outputs, as in the reference.
//
// Fragment order: mma.m16n8k16's B registers hold, for column n = g (g = lane / 4, t = lane % 4),
// b0b1 = rows 2t, 2t+1 and b2b3 = rows 2t+8, 2t+9 (PTX ISA, "matrix fragments for mma.m16n8k16
// with floating point type"). The kernel reads W [N, K] rows as they are (no repacked layout):
// a thread loads 4 consecutive bytes k0..k0+3 of its row n, and the mma's row index is a
// permutation of k inside each 16-k step, applied to A as well (fp8_gemm_k_of_mma_row): b0b1 =
// bytes 0, 1 and b2b3 = bytes 2, 3, so that A's registers a0a1 / a4a5 take x[k0, k0+1] and
// x[k0+2, k0+3], 8 contiguous bytes of a row of x.
#pragma once

#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "bitpress/common/macros.h"
#include "bitpress/cuda/primitives.cuh"

namespace bitpress {

// ---------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------

// prmt.b32 d, a, 0, sel: byte i of d is byte (sel >> 4i) & 7 of the 8-byte value {0, a} (PTX
// ISA, "prmt", default mode; selector bit 3 of each nibble, the sign replication, unused here).
BITPRESS_INLINE uint32_t fp8_mma_prmt(uint32_t a, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0u), "r"(sel));
  return d;
#else
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (sel >> (4 * i)) & 7u;
    const uint32_t byte = s < 4 ? (a >> (8 * s)) & 0xFFu : 0u;
    d |= byte << (8 * i);
  }
  return d;
#endif
}

// Selectors putting bytes (0, 1) / (2, 3) of a word into the high bytes of the two 16-bit lanes.
constexpr uint32_t kFp8MmaSelLo = 0x1404u;
constexpr uint32_t kFp8MmaSelHi = 0x3424u;

template <DType T>
struct Fp8MmaDecode;
template <>
struct Fp8MmaDecode<DType::kFloat16> {
  static constexpr int kShift = 1;               // s.eeee.mmm.00000000 -> s.0eeee.mmm.0000000
  static constexpr uint32_t kMagMask = 0x3F80u;  // exponent + mantissa bits that carry the code
  static constexpr uint32_t kBias = 0x5C00u;     // 256.0 = 2^(15 - 7)
  static constexpr uint32_t kNanOr = 0x2000u;    // 480 (0x5F80) | 0x2000 = 0x7F80, a NaN
};
template <>
struct Fp8MmaDecode<DType::kBFloat16> {
  static constexpr int kShift = 4;  // s.eeee.mmm.00000000 -> s.0000eeee.mmm0000
  static constexpr uint32_t kMagMask = 0x07F0u;
  static constexpr uint32_t kBias = 0x7B80u;   // 2^120 = 2^(127 - 7)
  static constexpr uint32_t kNanOr = 0x3C00u;  // 480 (0x43F0) | 0x3C00 = 0x7FF0, a NaN
};

// The half-type bits of a float known to be exactly representable (host side of the multiply).
template <DType T>
BITPRESS_INLINE float fp8_mma_half_to_float(uint32_t h) {
  return T == DType::kFloat16 ? half_bits_to_float(uint16_t(h)) : bf16_bits_to_float(uint16_t(h));
}
template <DType T>
BITPRESS_INLINE uint32_t fp8_mma_float_to_half(float f) {
  return T == DType::kFloat16 ? float_to_half_bits(f) : float_to_bf16_bits(f);
}

// d = a * b per 16-bit lane, exact here (b a power of two, products representable). fp16:
// mul.rn.f16x2 (HMUL2); bf16: fma.rn.bf16x2 with -0 as addend (sm_80 has no bf16x2 multiply; -0
// keeps the sign of a zero product). Both keep subnormal inputs (no .ftz).
template <DType T>
BITPRESS_INLINE uint32_t fp8_mma_mul2(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  if constexpr (T == DType::kFloat16) {
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  }
  return d;
#else
  uint32_t d = 0;
  for (int h = 0; h < 2; ++h) {
    const float x = fp8_mma_half_to_float<T>((a >> (16 * h)) & 0xFFFFu);
    const float y = fp8_mma_half_to_float<T>((b >> (16 * h)) & 0xFFFFu);
    d |= fp8_mma_float_to_half<T>(x * y) << (16 * h);
  }
  return d;
#endif
}

// Bit 7 of each byte of the result set where that byte of `w` is a NaN code (s.1111.111): adding
// 1 to the low 7 bits carries into bit 7 exactly for 0x7F, and never across bytes.
BITPRESS_INLINE uint32_t fp8_mma_nan_bytes(uint32_t w) {
  return ((w & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u;
}

// The two B registers (b0b1, b2b3) of 4 E4M3 codes w = bytes (c0, c1, c2, c3), low byte first:
// out[0] = T2(c0, c1), out[1] = T2(c2, c3), each lane the exact value of its code (NaN for NaN).
template <DType T>
BITPRESS_INLINE void fp8_mma_decode4(uint32_t w, uint32_t (&out)[2]) {
  using D = Fp8MmaDecode<T>;
  const uint32_t nan = fp8_mma_nan_bytes(w);
  for (int r = 0; r < 2; ++r) {
    const uint32_t sel = r == 0 ? kFp8MmaSelLo : kFp8MmaSelHi;
    const uint32_t v = fp8_mma_prmt(w, sel);  // code bytes in bits 8-15 and 24-31
    const uint32_t bits = (v & 0x80008000u) | ((v >> D::kShift) & (D::kMagMask * 0x10001u));
    const uint32_t val = fp8_mma_mul2<T>(bits, D::kBias * 0x10001u);
    // prmt moves each NaN flag (bit 7 of its byte) to bit 15 / 31 of the lane; times kNanOr in
    // each lane (no carry: kNanOr < 2^16).
    const uint32_t nanf = (fp8_mma_prmt(nan, sel) >> 15) & 0x00010001u;
    out[r] = val | (nanf * D::kNanOr);
  }
}

// The 4 codes of w as floats times s (fp32 product, one rounding): the dense dequantization of
// the large-M path (fp8_weight_dequantize_kernel). Decoded through bf16 (exact) and widened.
BITPRESS_INLINE void fp8_dequant4_float(uint32_t w, float s, float (&f)[4]) {
  uint32_t b[2];
  fp8_mma_decode4<DType::kBFloat16>(w, b);
  f[0] = bits_float(b[0] << 16) * s;
  f[1] = bits_float(b[0] & 0xFFFF0000u) * s;
  f[2] = bits_float(b[1] << 16) * s;
  f[3] = bits_float(b[1] & 0xFFFF0000u) * s;
}

// The E4M3 value of code c as a double (the definition: tests compare the decode with it).
inline double fp8_e4m3_value(uint32_t c) {
  const int e = int((c >> 3) & 0xF), m = int(c & 7);
  const double sign = (c & 0x80) ? -1.0 : 1.0;
  if (e == 15 && m == 7) return sign * __builtin_nan("");
  const double mag = e == 0 ? m / 8.0 * (1.0 / 64.0) : (1.0 + m / 8.0) * double(1 << e) / 128.0;
  return sign * mag;
}

// ---------------------------------------------------------------------------------------------
// Tiles of the CUDA kernel (csrc/fp8/fp8_weight_gemm_sm80.cu)
// ---------------------------------------------------------------------------------------------
//
// A block of 256 threads (8 warps) computes a BM x BN = 16 MT x 128 tile of y over a range of K
// stages of BK = 128. Warp w takes the 64 columns wn = w % 2 of the block and the 32 k of slice
// wk = w / 2 of every stage; the 4 k-slices' partial sums are added through shared memory at the
// end. BN = BK = 128 is also the block of the DeepSeek-V3 scales: one stage of one block has one
// block scale.
constexpr int kFp8GemmThreads = 256;
constexpr int kFp8GemmBK = 128;    // k per stage; 128 bytes of a weight row
constexpr int kFp8GemmBN = 128;    // columns (weight rows) per block
constexpr int kFp8GemmKWarps = 4;  // k-slices of 32 per stage
constexpr int kFp8GemmChunk = 16;  // bytes of one cp.async

// Weight stage: 128 rows of W x 128 bytes = 8 chunks per row. Warp (wn, wk) reads, for n8-block j,
// rows 64 wn + 8 j + g with one LDS.64 per lane at bytes 32 wk + 8 t: chunk 2 wk + t / 2. A half
// warp (16 lanes: g = 0..3, t = 0..3) touches rows r..r+3 at the same two logical chunks; the
// XOR with 2 (row % 4) spreads the four rows over the 8 chunks of a 128-byte bank line
// (conflict-free), and stays a permutation of each row's 8 chunks.
BITPRESS_INLINE int fp8_gemm_b_smem_chunk(int row, int chunk) {
  return row * 8 + (chunk ^ ((row & 3) << 1));
}
// cp.async chunk c (0..1023) of the weight stage: row c / 8, chunk c % 8 (k 16 (c % 8) of the
// stage): 8 consecutive threads read one 128-byte row segment (coalesced).
BITPRESS_INLINE void fp8_gemm_b_load_coords(int c, int* row, int* chunk) {
  *row = c >> 3;
  *chunk = c & 7;
}
// Byte offset in the (swizzled) weight stage of the 8 bytes lane `lane` of warp (wn, wk) reads
// for n8-block j.
BITPRESS_INLINE int fp8_gemm_b_lane_offset(int wn, int wk, int j, int lane) {
  const int row = 64 * wn + 8 * j + (lane >> 2), t = lane & 3;
  return fp8_gemm_b_smem_chunk(row, 2 * wk + (t >> 1)) * kFp8GemmChunk + 8 * (t & 1);
}

// Activation stage: BM rows x 128 halves = 16 chunks per row (256 bytes). Lane (g, t) of k-slice
// wk reads rows g and g + 8 of each m16 tile with one LDS.128 each, at chunk 4 wk + t (halves
// 32 wk + 8 t .. +7). A quarter warp (8 lanes: g = 0, 1) reads two rows at the same chunks 256
// bytes apart (same banks); the XOR with 4 (row % 2) moves odd rows to the other half of the bank
// line.
BITPRESS_INLINE int fp8_gemm_a_smem_chunk(int row, int chunk) {
  return row * 16 + (chunk ^ ((row & 1) << 2));
}
BITPRESS_INLINE void fp8_gemm_a_load_coords(int c, int* row, int* chunk) {
  *row = c >> 4;
  *chunk = c & 15;
}
BITPRESS_INLINE int fp8_gemm_a_lane_chunk(int wk, int lane) { return 4 * wk + (lane & 3); }

// The k (0..31, within the warp's 32-k slice) that row r (0..15) of k16 step s (0, 1) of the mma
// stands for, for the lane with t = (r % 8) / 2: the lane's 8 weight bytes are k 8t .. 8t+7, and
// step s uses bytes 4s .. 4s+3 of them: b0b1 (rows 2t, 2t+1) = bytes 4s, 4s+1; b2b3 (rows 2t+8,
// 2t+9) = bytes 4s+2, 4s+3. A's registers follow the same map: a0a1 / a2a3 (k rows 2t, 2t+1) =
// halves 8t + 4s + {0, 1} of the A row, a4a5 / a6a7 = 8t + 4s + {2, 3}, i.e. words 2s and 2s+1 of
// the lane's LDS.128 of that row.
BITPRESS_INLINE int fp8_gemm_k_of_mma_row(int s, int r) {
  const int t = (r & 7) >> 1;
  return 8 * t + 4 * s + 2 * (r >> 3) + (r & 1);
}

// mma.m16n8k16 C fragment of n8-block j: c_i is row g + 8 (i / 2), column 8 j + 2 t + i % 2 of the
// warp's 16 x 64 tile (PTX ISA, C/D layout).
BITPRESS_INLINE void fp8_gemm_c_coords(int lane, int j, int i, int* row, int* col) {
  *row = (lane >> 2) + 8 * (i >> 1);
  *col = 8 * j + 2 * (lane & 3) + (i & 1);
}

// Split-K: split s of S takes stages [s T / S, (s + 1) T / S) (none empty when S <= T).
BITPRESS_INLINE void fp8_gemm_split_range(int64_t T, int S, int s, int64_t* begin, int64_t* end) {
  *begin = T * s / S;
  *end = T * (s + 1) / S;
}

// Epilogue: the fp32 sum (already times its scales) plus the bias (any dtype, added in fp32),
// rounded once to T.
template <DType T>
BITPRESS_INLINE uint16_t fp8_gemm_epilogue(float acc, const void* bias, DType bias_dtype,
                                           int64_t n) {
  const float v = bias != nullptr ? acc + load_as_float(bias, bias_dtype, n) : acc;
#if defined(__CUDA_ARCH__)
  uint16_t h;
  if constexpr (T == DType::kFloat16) {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  } else {
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  }
  return h;
#else
  return uint16_t(fp8_mma_float_to_half<T>(v));
#endif
}

}  // namespace bitpress
