// The GPU layout of 2:4 + INT4 weights (Sparse24Layout.MMA for sparse24_int4_gemm) and the
// register decode of the CUDA kernel (csrc/sparse24/sparse24_int4_gemm_sm80.cu). Torch-free and
// __host__ __device__: the kernel calls exactly these functions,
// tests/cpp/test_sparse24_int4_mma.cpp runs them on the CPU, and
// python/bitpress/sparse24/layout_mma_int4.py writes the same layout.
//
// The kept values are the A operand of mma.sp.m16n8k32 exactly as in the bf16/fp16 layout
// (bitpress/sparse24/sparse24_mma_layout.h): tile (nt, kt) = 16 rows of W x 32 dense K, value v
// (0..7) of lane l is the A-fragment value a_v (sparse24_mma_a_coords). Here each value is a 4-bit
// code, so a lane's 8 codes of a tile are ONE 32-bit word:
//
//   qvalues_mma int32 [N, K/16]   the interchange shape, holding the words [N/16, K/32, 32] in
//                                 order: word (nt K/32 + kt) 32 + l is lane l's codes of tile
//                                 (nt, kt); code v sits in nibble sparse24_int4_mma_nibble(v) =
//                                 (v >> 1) + 4 (v & 1), i.e. nibbles hold v = 0, 2, 4, 6, 1, 3,
//                                 5, 7.
//   meta_mma    int32 [N/16, ceil(K/64), 32]   exactly the bf16/fp16 layout's metadata.
//   scales, zeros [G, N]          the interchange tensors as they are (float32 / float16 /
//                                 bfloat16, contiguous): the kernel copies the 64 columns of its
//                                 block for the groups a stage touches.
//
// Why the interleave: (word >> 4p) & 0x000F000F = codes (v_2p, v_2p+1) in the two 16-bit halves,
// the pair that A register p holds (a_2p, a_2p+1: both of row g for p = 0, 2, of row g + 8 for
// p = 1, 3). One lop3 per register puts each code under the magic exponent (the int4 kernel's
// trick, bitpress/int4/int4_mma_dequant.h): bits = half2(M + q_a, M + q_b), M = 1024 (fp16) or
// 128 (bf16), exact. With the zero point split as z = zi + zf (zi = floor(z) clamped to 0..15):
//   d2 = bits - half2(M + zi)                       exact (q - zi in -15..15)
//   w2 = fma(d2, half2(s, s), half2(c, c))          one rounding; c = round(-zf s), -0 when z is
//                                                   an integer
// so a symmetric weight (z = 8) and an asymmetric one with an integer zero point (GPTQ) are
// round((q - z) s), the bits of a float computation rounded once, and a float zero point costs
// one more rounding, of the small correction -zf s (|zf| < 1).
#pragma once

#include <math.h>
#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "bitpress/common/macros.h"
#include "bitpress/int4/int4_mma_dequant.h"
#include "bitpress/sparse24/sparse24_mma_layout.h"

namespace bitpress {

// Nibble of code v (0..7, the A-fragment value index) in its lane's word, and the inverse.
BITPRESS_INLINE int sparse24_int4_mma_nibble(int v) { return (v >> 1) + 4 * (v & 1); }
BITPRESS_INLINE int sparse24_int4_mma_value_of_nibble(int i) { return 2 * (i & 3) + (i >> 2); }

// Word offset of (tile row nt, k-tile kt, lane) in qvalues_mma; KT = K / 32.
BITPRESS_INLINE int64_t sparse24_int4_mma_word_index(int64_t nt, int64_t kt, int lane, int64_t KT) {
  return (nt * KT + kt) * 32 + lane;
}

// Row (0..15) of the tile that A register p (0..3, values a_2p, a_2p+1) of lane `lane` holds.
BITPRESS_INLINE int sparse24_int4_mma_reg_row(int lane, int p) { return (lane >> 2) + 8 * (p & 1); }

// half2(M + q_a, M + q_b) of A register p from a lane's word (one lop3 on the GPU).
template <DType T>
BITPRESS_INLINE uint32_t sparse24_int4_mma_offset_pair(uint32_t word, int p) {
  return int4_mma_offset_pair<T>(word, p);
}

// A half2 of one 16-bit value in both halves.
BITPRESS_INLINE uint32_t sparse24_int4_mma_splat(uint32_t h) { return (h & 0xFFFFu) * 0x10001u; }

// The per-(group, row) constants of the decode from the loaded floats (z = 8 when symmetric):
// z_bits = M + zi (the subtrahend), s_bits = s rounded to T, c_bits = round_T(-(z - zi) s_T)
// (-0 for an integer z, so that fma(d, s, c) = d s rounded once, sign of a zero product kept).
// A NaN zero point gives zi = 0 and a NaN c: every weight of the group NaN, as in the reference.
template <DType T>
BITPRESS_INLINE void sparse24_int4_mma_group_consts(float s, float z, uint32_t* z_bits,
                                                    uint32_t* s_bits, uint32_t* c_bits) {
  // fmaxf returns the other operand for a NaN: zi = 0. Kept in float (M + zi is exact in T), so
  // that no integer conversion sits next to the decode.
  const float zi = fminf(fmaxf(floorf(z), 0.f), 15.f);
  *z_bits = int4_mma_scale_bits<T>(T == DType::kFloat16 ? 1024.f + zi : 128.f + zi);
  *s_bits = int4_mma_scale_bits<T>(s);
  const float s_t = int4_mma_half_to_float<T>(*s_bits);
  const float zf = z - zi;
  *c_bits = zf == 0.f ? 0x8000u : int4_mma_scale_bits<T>(-zf * s_t);
}

// w2 = fma(bits - z2, s2, c2) on half2 registers: the A register of mma.sp. Device: sub.rn is
// exact here; fma.rn rounds once (bf16 on sm_80 has only fma.rn.bf16x2: bits - z2 = fma(z2, -1,
// bits)). Host: (q - zi) s_T is exact in float (5-bit times 11- or 8-bit significands); the sum
// with c (-0 for integer zero points) is then rounded to T.
template <DType T>
BITPRESS_INLINE uint32_t sparse24_int4_mma_decode(uint32_t bits, uint32_t z2, uint32_t s2,
                                                  uint32_t c2) {
#if defined(__CUDA_ARCH__)
  uint32_t d2, w2;
  if constexpr (T == DType::kFloat16) {
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d2) : "r"(bits), "r"(z2));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(w2) : "r"(d2), "r"(s2), "r"(c2));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d2) : "r"(z2), "r"(0xBF80BF80u), "r"(bits));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(w2) : "r"(d2), "r"(s2), "r"(c2));
  }
  return w2;
#else
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const float b = int4_mma_half_to_float<T>((bits >> (16 * h)) & 0xFFFFu);
    const float zz = int4_mma_half_to_float<T>((z2 >> (16 * h)) & 0xFFFFu);
    const float s = int4_mma_half_to_float<T>((s2 >> (16 * h)) & 0xFFFFu);
    const float c = int4_mma_half_to_float<T>((c2 >> (16 * h)) & 0xFFFFu);
    out |= int4_mma_float_to_half<T>((b - zz) * s + c) << (16 * h);
  }
  return out;
#endif
}

// ---------------------------------------------------------------------------------------------
// Tiles of the CUDA kernel
// ---------------------------------------------------------------------------------------------
//
// Block = 256 threads = 8 warps: 4 tile rows (64 output features) x 2 k-warps; a stage is 256
// dense K = 8 k-tiles = 4 metadata pairs; k-warp wk computes pairs wk and wk + 2 of every stage.
constexpr int kSparse24Int4StageK = 256;
constexpr int kSparse24Int4StageKTiles = kSparse24Int4StageK / kSparse24MmaTileK;  // 8
constexpr int kSparse24Int4StagePairs = kSparse24Int4StageK / kSparse24MmaPairK;   // 4
constexpr int kSparse24Int4BlockNTiles = 4;
constexpr int kSparse24Int4BlockN = kSparse24Int4BlockNTiles * kSparse24MmaTileN;  // 64
// At most 8 groups meet a stage (group_size % 32 == 0, stages start at multiples of 256): the
// scale (zero) rows of a stage take 8 x 256 bytes whatever the dtype.
constexpr int kSparse24Int4StageGroups = 8;
constexpr int kSparse24Int4GroupRowBytes = 256;

// The codes of a stage: chunk c (0..255, 16 bytes = 4 words = lanes 4q..4q+3) of tile row ntl,
// stage k-tile kk. In shared memory the chunks keep this order, so word (ntl 8 + kk) 32 + lane is
// lane `lane`'s word of that tile: one conflict-free LDS.32 per lane per tile.
BITPRESS_INLINE void sparse24_int4_q_load_coords(int c, int* ntl, int* kk, int* q) {
  *ntl = c >> 6;
  *kk = (c >> 3) & 7;
  *q = c & 7;
}

// The metadata of a stage: chunk c (0..127) of tile row ntl, stage pair pp, lanes 4q..4q+3.
BITPRESS_INLINE void sparse24_int4_m_load_coords(int c, int* ntl, int* pp, int* q) {
  *ntl = c >> 5;
  *pp = (c >> 3) & 3;
  *q = c & 7;
}

// Group size in dense K of a kernel call (group_size = -1: one group over K).
BITPRESS_INLINE int64_t sparse24_int4_group_k(int64_t group_size, int64_t K) {
  return group_size == -1 ? (K > 0 ? K : 1) : group_size;
}

// The groups [g0, g1] that stage st touches (dense K [256 st, min(256 st + 256, K))).
BITPRESS_INLINE void sparse24_int4_stage_groups(int64_t st, int64_t K, int64_t gk, int64_t* g0,
                                                int64_t* g1) {
  const int64_t k0 = st * kSparse24Int4StageK;
  const int64_t k1 = (k0 + kSparse24Int4StageK < K ? k0 + kSparse24Int4StageK : K) - 1;
  *g0 = k0 / gk;
  *g1 = k1 / gk;
}

// Scale / zero chunk c (0..127) of a stage with elements of `esize` bytes (2 or 4): group row gi
// (0.. of the stage) and the first of its 16 / esize block columns.
BITPRESS_INLINE void sparse24_int4_sz_load_coords(int c, int esize, int* gi, int* col) {
  const int per_row = kSparse24Int4BlockN * esize / 16;  // 8 or 16 chunks
  *gi = c / per_row;
  *col = (c % per_row) * (16 / esize);
}

// Group row gi of a stage in shared memory starts at byte gi * 256; element `col` (block column)
// at gi * 256 + col * esize.
BITPRESS_INLINE int sparse24_int4_sz_smem_byte(int gi, int col, int esize) {
  return gi * kSparse24Int4GroupRowBytes + col * esize;
}

// The group of absolute k-tile kt, with tiles_per_group = group K / 32 (32-bit: a division per
// k-tile in the kernel's inner loop; K < 2^36 keeps kt in range).
BITPRESS_INLINE int sparse24_int4_group_of_ktile(int kt, int tiles_per_group) {
  return kt / tiles_per_group;
}

}  // namespace bitpress
