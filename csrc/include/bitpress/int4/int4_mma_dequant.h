// INT4 -> half2 B fragments of mma.m16n8k16 (the lop3 / magic-number trick), and the index math
// of the CUDA int4_gemm kernel (csrc/int4/int4_gemm_sm80.cu). Torch-free and __host__ __device__:
// the kernel calls exactly these functions, and tests/cpp/test_int4_mma.cpp runs them on the CPU
// (every nibble, zero point and a sweep of scales; a whole warp's mma emulated from smem).
//
// Dequantization (weights in the mma layout, bitpress/int4/int4_mma_layout.h):
//   bits = ((word >> 4p) & 0x000F000F) | magic          one lop3.b32
//        = half2(M + q_a, M + q_b)                      M = 1024 (fp16, 0x6400) or 128 (bf16,
//        0x4300)
//   b    = (bits - half2(M + z)) * half2(s)             two packed half ops
// M + q is exact: fp16 has 10 mantissa bits and 1024's ulp is 1; bf16 has 7 and 128's ulp is 1,
// so 128..143 are exact too. (The fp16 form of Marlin's "0x00F000F0 then * 1/16" cannot be used
// for bf16: bit 7 of a bf16 is the exponent's LSB; the layout instead puts the nibble pairs at
// every 4-bit shift.) The subtraction is exact (|q - z| <= 15), so the only rounding is the one
// of the product (q - z) * s, which is round_to_half((q - z) * s) with s already in the half type:
// W = round((q - z) * s_h), the same as a float computation rounded once.
#pragma once

#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "bitpress/common/macros.h"
#include "bitpress/cuda/primitives.cuh"

namespace bitpress {

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

// The exponent bits of M in each 16-bit half: 1024.0 in fp16, 128.0 in bf16.
template <DType T>
struct Int4MmaMagic;
template <>
struct Int4MmaMagic<DType::kFloat16> {
  static constexpr uint32_t kHalf = 0x6400u;
};
template <>
struct Int4MmaMagic<DType::kBFloat16> {
  static constexpr uint32_t kHalf = 0x4300u;
};

constexpr uint32_t kInt4MmaPairMask = 0x000F000Fu;

// (a & b) | c. lop3's immediate is the truth table of the function on the operand patterns
// a = 0xF0, b = 0xCC, c = 0xAA: (0xF0 & 0xCC) | 0xAA = 0xEA (PTX ISA, "lop3").
BITPRESS_INLINE uint32_t int4_mma_and_or(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  return (a & b) | c;
#endif
}

// half2(M + q_a, M + q_b) from nibbles p and p + 4 of a layout word (p = 0..3).
template <DType T>
BITPRESS_INLINE uint32_t int4_mma_offset_pair(uint32_t word, int p) {
  return int4_mma_and_or(word >> (4 * p), kInt4MmaPairMask, Int4MmaMagic<T>::kHalf * 0x10001u);
}

// half2(M + z, M + z) of zero point z (0..15): the subtrahend of int4_mma_sub_mul.
template <DType T>
BITPRESS_INLINE uint32_t int4_mma_zero_pair(uint32_t z) {
  return (Int4MmaMagic<T>::kHalf | z) * 0x10001u;
}

// A float scale rounded (nearest even) to the half type; cvt.rn gives the same bits as the
// shared helpers (tests/cpp/test_helpers.cpp checks the helpers against IEEE references).
template <DType T>
BITPRESS_INLINE uint32_t int4_mma_scale_bits(float s) {
#if defined(__CUDA_ARCH__)
  uint16_t h;
  if constexpr (T == DType::kFloat16) {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(s));
  } else {
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(s));
  }
  return h;
#else
  return T == DType::kFloat16 ? float_to_half_bits(s) : float_to_bf16_bits(s);
#endif
}

template <DType T>
BITPRESS_INLINE uint32_t int4_mma_scale_pair(float s) {
  return int4_mma_scale_bits<T>(s) * 0x10001u;
}

template <DType T>
BITPRESS_INLINE float int4_mma_half_to_float(uint32_t h) {
  return T == DType::kFloat16 ? half_bits_to_float(uint16_t(h)) : bf16_bits_to_float(uint16_t(h));
}

template <DType T>
BITPRESS_INLINE uint32_t int4_mma_float_to_half(float f) {
  return T == DType::kFloat16 ? float_to_half_bits(f) : float_to_bf16_bits(f);
}

// (q2 - z2) * s2 on half2 registers. Device: sub/mul.rn.f16x2 (explicit .rn: ptxas may not fuse
// them into an fma, which would round differently); bf16 on sm_80 has only fma.rn.bf16x2, so
// q - z = fma(z, -1, q) (exact) and the product = fma(d, s, -0) (one rounding; -0 keeps the sign
// of a zero product). Neither flushes subnormals (no .ftz). Host: the same values in float, where
// both operations are exact (a 5-bit integer times an 11- or 8-bit significand), then rounded
// once to nearest even.
template <DType T>
BITPRESS_INLINE uint32_t int4_mma_sub_mul(uint32_t q2, uint32_t z2, uint32_t s2) {
#if defined(__CUDA_ARCH__)
  uint32_t d, r;
  if constexpr (T == DType::kFloat16) {
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(q2), "r"(z2));
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(d), "r"(s2));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(z2), "r"(0xBF80BF80u), "r"(q2));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(d), "r"(s2), "r"(0x80008000u));
  }
  return r;
#else
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const float q = int4_mma_half_to_float<T>((q2 >> (16 * h)) & 0xFFFFu);
    const float z = int4_mma_half_to_float<T>((z2 >> (16 * h)) & 0xFFFFu);
    const float s = int4_mma_half_to_float<T>((s2 >> (16 * h)) & 0xFFFFu);
    out |= int4_mma_float_to_half<T>((q - z) * s) << (16 * h);
  }
  return out;
#endif
}

// B register p (0..3) of a layout word: p = 0, 1 are b0b1 / b2b3 of n8-block 2w, p = 2, 3 those
// of block 2w + 1 (int4_mma_layout.h: (word >> 4p) & 0x000F000F = values (v_2p, v_2p+1)).
BITPRESS_INLINE int int4_mma_block_of_reg(int w, int p) { return 2 * w + (p >> 1); }
BITPRESS_INLINE int int4_mma_half_of_reg(int p) { return p & 1; }

// ---------------------------------------------------------------------------------------------
// Tiles of the CUDA kernel (csrc/int4/int4_gemm_sm80.cu)
// ---------------------------------------------------------------------------------------------
//
// A block of kInt4GemmThreads = 256 threads (8 warps) computes a BM x BN = 16 MT x 128 tile of y
// over a range of K stages; a stage is BK = 128 rows of K = 8 k-tiles. Warp w takes n-tile
// wn = w % 2 of the block and the k-tiles wk, wk + 4 (wk = w / 2) of every stage, so each warp
// keeps only MT x 8 n8-blocks of accumulators; the 4 k-partial sums are added through shared
// memory at the end (Marlin's split of a stage's k across warps).
constexpr int kInt4GemmThreads = 256;
constexpr int kInt4GemmStageKTiles = 8;  // BK = 128
constexpr int kInt4GemmBlockNTiles = 2;  // BN = 128
constexpr int kInt4GemmKWarps = 4;       // warps sharing one n-tile, each with 2 k-tiles a stage
constexpr int kInt4GemmChunk = 16;       // bytes of one cp.async / ldmatrix row / LDS.128

// A (activations) stage in shared memory: BM rows of 128 halves = 16 chunks of 16 bytes. The
// 8 row addresses of one ldmatrix 8x8 matrix share a logical chunk; with a 256-byte row pitch
// they would all fall in the same 4 banks (8-way conflict), so the chunk is XOR-swizzled with the
// row's low 3 bits (bitpress/cuda/primitives.cuh): the 8 rows of a matrix land in 8 distinct
// 16-byte bank groups.
BITPRESS_INLINE int int4_gemm_a_smem_chunk(int row, int chunk) {
  return swizzled_chunk_index(row, chunk, 16);
}

// cp.async chunk c (0 .. 16 BM - 1) of the A stage: its row and its chunk in the row (k offset
// 8 * chunk within the stage).
BITPRESS_INLINE void int4_gemm_a_load_coords(int c, int* row, int* chunk) {
  *row = c >> 4;
  *chunk = c & 15;
}

// ldmatrix.x4 of the m16 x k16 A fragment of stage k-tile kk (0..7): lane l gives the address of
// row l % 16 and k-half l / 16. Matrices 0..3 are then (rows 0-7, k 0-7), (rows 8-15, k 0-7),
// (rows 0-7, k 8-15), (rows 8-15, k 8-15): registers a0a1, a2a3, a4a5, a6a7 of mma.m16n8k16
// (PTX ISA, "matrix fragments for mma.m16n8k16 with floating point type": a0a1 row g cols 2t,
// 2t+1; a2a3 row g+8; a4a5 row g cols 2t+8, 2t+9; a6a7 row g+8 cols 2t+8, 2t+9).
BITPRESS_INLINE void int4_gemm_a_ldmatrix_coords(int lane, int kk, int* row, int* chunk) {
  *row = lane & 15;
  *chunk = 2 * kk + (lane >> 4);
}

// B (weights) stage: 8 k-tiles x 2 n-tiles x 512 bytes, chunk c = (kk * 2 + ntl) * 32 + lane:
// the layout's 128-word tiles copied as they are, so warp (wn, kk) reads its 32 lanes' 16 bytes
// contiguously (LDS.128, conflict-free). cp.async chunk c comes from (k-tile kk, n-tile ntl of
// the block, lane) of the global layout.
BITPRESS_INLINE void int4_gemm_b_load_coords(int c, int* kk, int* ntl, int* lane) {
  *kk = c >> 6;
  *ntl = (c >> 5) & 1;
  *lane = c & 31;
}
BITPRESS_INLINE int int4_gemm_b_smem_chunk(int kk, int ntl, int lane) {
  return (kk * kInt4GemmBlockNTiles + ntl) * 32 + lane;
}

// Scales / zeros of a stage: the groups g0..g1 its k-tiles touch (at most 8, one per k-tile),
// each a row of 128 columns of the block; float scales in chunks of 4, uint8 zeros in 16.
BITPRESS_INLINE int int4_gemm_group_of_ktile(int64_t kt, int64_t tiles_per_group) {
  return int(kt / tiles_per_group);
}
// cp.async chunk c of the scales (c < 32 ng) / zeros (c < 8 ng): group g0 + gi, block column col.
BITPRESS_INLINE void int4_gemm_s_load_coords(int c, int* gi, int* col) {
  *gi = c >> 5;
  *col = 4 * (c & 31);
}
BITPRESS_INLINE void int4_gemm_z_load_coords(int c, int* gi, int* col) {
  *gi = c >> 3;
  *col = 16 * (c & 7);
}
// Element index (float or byte) of group g0 + gi, block column col in the stage's scales / zeros.
BITPRESS_INLINE int int4_gemm_sz_smem_index(int gi, int col) {
  return gi * kInt4GemmBlockNTiles * 64 + col;
}

// mma.m16n8k16 C fragment of n8-block j: c_i (i = 0..3) is row g + 8 (i / 2), column
// 8 j + 2 t + i % 2 of the warp's 16 x 64 tile (g = lane / 4, t = lane % 4; PTX ISA, C/D layout).
BITPRESS_INLINE void int4_gemm_c_coords(int lane, int j, int i, int* row, int* col) {
  *row = (lane >> 2) + 8 * (i >> 1);
  *col = 8 * j + 2 * (lane & 3) + (i & 1);
}

// Column of the scale / zero point lane `lane` needs for n8-block j: B column 8 j + g.
BITPRESS_INLINE int int4_gemm_b_col(int lane, int j) { return 8 * j + (lane >> 2); }

// Split-K: split s of S takes stages [s T / S, (s + 1) T / S) of the T stages (sizes differ by at
// most one; none is empty when S <= T).
BITPRESS_INLINE void int4_gemm_split_range(int64_t T, int S, int s, int64_t* begin, int64_t* end) {
  *begin = T * s / S;
  *end = T * (s + 1) / S;
}

// Act-order gather (int4_gemm_gather_kernel): element k of a row of x_perm is x[perm[k]]; 0 for a
// padding row (perm = -1); NaN (nan_bits) for a value outside [-1, K), which the kernel cannot
// reject without a host sync, so that every output of the row is NaN rather than a read past x.
BITPRESS_INLINE uint16_t int4_gemm_gather_value(const uint16_t* x_row, int64_t K, int32_t src,
                                                uint16_t nan_bits) {
  if (src >= 0 && src < K) return x_row[src];
  return src == -1 ? uint16_t(0) : nan_bits;
}
template <DType T>
BITPRESS_INLINE uint16_t int4_mma_nan_bits() {
  return T == DType::kFloat16 ? uint16_t(0x7E00) : uint16_t(0x7FC0);
}

// Epilogue (the GEMM kernel at S = 1, the split-K reduction otherwise): the fp32 sum plus the
// bias (any dtype, added in fp32), rounded once to T (round to nearest even; cvt.rn on the GPU).
template <DType T>
BITPRESS_INLINE uint16_t int4_gemm_epilogue(float acc, const void* bias, DType bias_dtype,
                                            int64_t n) {
  const float v = bias != nullptr ? acc + load_as_float(bias, bias_dtype, n) : acc;
  return uint16_t(int4_mma_scale_bits<T>(v));
}

}  // namespace bitpress
