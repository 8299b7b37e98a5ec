// The GPU layout of INT4 weights ("bitpress int4 mma tiles"): what the CUDA and Triton int4_gemm
// kernels read. Torch-free; the index math is __host__ __device__ so that the CPU repack, the
// CUDA repack and the CUDA GEMM kernel share one definition (tests/cpp/test_int4_mma.cpp and
// tests/cpp/test_int4_gemm_repack.cpp).
//
// Rows (K). As in the CPU tile layout, rows are reordered once so that each group's rows are
// consecutive (act-order resolved at load time, ExLlama-style), but every group is padded with
// zero rows to the same length `group_rows`, a multiple of 16 (the k of one mma.sync.m16n8k16):
//   Kp = G * group_rows,   perm [Kp] = source row of x for each packed row (-1: padding row),
// so the group of packed row k is k / group_rows and of k-tile kt is kt / (group_rows / 16): no
// per-tile lookup, and a 16-row k-tile never straddles two groups. GPTQ checkpoints (act-order
// or not) have groups of exactly group_size rows, so nothing is padded for group sizes that are
// multiples of 16.
//
// Columns (N). Np = 64 * Nt, Nt = ceil(N / 64); columns past N are zero.
//
// qweight int32 [Kp/16, Nt * 128]. Row kt holds k-tile kt (packed rows 16kt..16kt+15); within it
// the 128 words of n-tile nt (columns 64nt..64nt+63) are contiguous, word nt*128 + 4*lane + w.
// Those 4 words of one lane are exactly its B fragments of mma.sync.m16n8k16 (PTX ISA, "matrix
// fragments for mma.m16n8k16", B is k16 x n8, "col"): for n8-block j (columns 64nt+8j..+7) lane
// l holds b0,b1 = rows 2t, 2t+1 and b2,b3 = rows 2t+8, 2t+9 of column 8j + g, with g = l / 4,
// t = l % 4. Word w of lane l carries n8-blocks j = 2w and 2w+1: values
//   v0..v3 = (b0, b1, b2, b3) of block 2w,   v4..v7 = (b0, b1, b2, b3) of block 2w+1,
// with v_{2p} in nibble p and v_{2p+1} in nibble p + 4 (nibble i holds v[kRowOfNibble[i]],
// kRowOfNibble = 0,2,4,6,1,3,5,7, the interleave of the CPU tile layout and of Marlin). Then
//   (word >> 4p) & 0x000F000F  =  (v_{2p}, v_{2p+1}) in the low / high 16 bits,
// and OR-ing the magic exponent of 1024.0 (fp16, 0x6400) or 128.0 (bf16, 0x4300) turns it into
// the half2 register (1024 + q_a, 1024 + q_b) / (128 + q_a, 128 + q_b): p = 0, 1 are the two B
// registers of block 2w, p = 2, 3 those of block 2w+1. One 128-bit load per lane per k16 x n64
// tile, no shuffles.
//
// scales float32 [G, Np], zeros uint8 [G, Np] (real zero points; absent: symmetric, 8),
// group_starts int32 [G+1] = arange(G + 1) * (group_rows / 16) (first k-tile of each group).
#pragma once

#include <stdint.h>

#include "bitpress/common/macros.h"

namespace bitpress {

constexpr int kInt4MmaTileK = 16;       // rows of a k-tile: the k of mma.m16n8k16
constexpr int kInt4MmaTileN = 64;       // columns of an n-tile: 8 n8-blocks
constexpr int kInt4MmaTileWords = 128;  // int32 words of one k16 x n64 tile: 32 lanes x 4

// Fragment value v (0..7) of a word -> its nibble, and back. (The table is for host code: a
// namespace-scope constexpr array is not addressable from device code; device code uses the
// functions.)
constexpr int kInt4MmaRowOfNibble[8] = {0, 2, 4, 6, 1, 3, 5, 7};
BITPRESS_INLINE int int4_mma_nibble_of_value(int v) { return (v >> 1) + 4 * (v & 1); }
BITPRESS_INLINE int int4_mma_value_of_nibble(int i) { return 2 * (i & 3) + (i >> 2); }

// Position (row kk in 0..15, column nn in 0..63) inside a k16 x n64 tile of value v (0..7) of
// word w (0..3) of lane `lane` (0..31).
BITPRESS_INLINE void int4_mma_value_coords(int lane, int w, int v, int* kk, int* nn) {
  const int g = lane >> 2, t = lane & 3;
  const int j = 2 * w + (v >> 2);  // n8-block
  const int i = v & 3;             // b_i of that block
  *kk = 2 * t + (i & 1) + 8 * (i >> 1);
  *nn = 8 * j + g;
}

// Inverse: the (lane, word, value) holding tile position (kk, nn).
BITPRESS_INLINE void int4_mma_locate(int kk, int nn, int* lane, int* w, int* v) {
  const int j = nn >> 3, g = nn & 7;
  const int t = (kk & 7) >> 1;
  const int i = (kk & 1) + 2 * (kk >> 3);
  *lane = 4 * g + t;
  *w = j >> 1;
  *v = 4 * (j & 1) + i;
}

// Word offset in qweight of (k-tile kt, n-tile nt, lane, word w); Nt = n-tiles per k-tile row.
BITPRESS_INLINE int64_t int4_mma_word_index(int64_t kt, int64_t nt, int lane, int w, int64_t Nt) {
  return kt * Nt * kInt4MmaTileWords + nt * kInt4MmaTileWords + 4 * lane + w;
}

}  // namespace bitpress
