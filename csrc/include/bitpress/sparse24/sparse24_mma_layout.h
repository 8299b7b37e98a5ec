// The GPU layout of 2:4 sparse weights ("bitpress sparse24 mma", Sparse24Layout.MMA): what the
// CUDA sparse24_gemm kernel reads. Torch-free; the index math is __host__ __device__ so that the
// CUDA kernel, its host emulation (tests/cpp/test_sparse24_mma.cpp) and the Python converter
// (python/bitpress/sparse24/layout_mma.py, checked against a generated fixture) share one
// definition.
//
// The kernel computes y^T = W x^T with W [N, K] as the sparse operand A of
// mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{bf16,f16}: a tile of A is 16 rows of
// W (16 output features) x 32 dense K, stored as 16 x 16 kept values plus 2-bit indices. x^T is B
// (k32 x n8: 8 rows of x), so a decode step with M <= 16 uses one or two n8 tiles over M.
//
// PTX ISA facts this layout serves ("Matrix multiply-accumulate operation using mma.sp with sparse
// matrix A", "Sparse matrix storage", "Matrix fragments for sparse mma.m16n8k32 with .f16 and
// .bf16 types"): with g = lane / 4, t = lane % 4,
//   * A fragment: four .b32 registers a0..a7 (two kept values each), laid out as the dense
//     m16n8k16 A fragment over the 16 compressed columns: a_i sits at row g (i = 0, 1, 4, 5) or
//     g + 8 (i = 2, 3, 6, 7), compressed column 2t + (i & 1) (+ 8 for i >= 4). Compressed columns
//     2j and 2j + 1 are the two kept values of group j (dense columns 4j..4j+3), lower K first.
//   * metadata e (one .b32): with sparsity selector s (0 or 1 for this shape) lanes 4g + 2s and
//     4g + 2s + 1 supply it; lane 4g + 2s + p holds, in bits [15:0], row g, dense columns
//     16p..16p+15 and in bits [31:16] row g + 8, same columns; one nibble per group of 4, lower
//     groups in lower bits, nibble = idx0 | idx1 << 2 (the interchange nibble). The
//     ::ordered_metadata variant requires idx0 < idx1, which the interchange format guarantees;
//     0b0000, 0b0101, 0b1010, 0b1111 are invalid (undefined results).
//   * B fragment (dense, "col"): b_i at k = 2t + (i & 1) + 8 (i >> 1), column g (i = 0..7).
//   * C/D fragment: c0, c1 at row g, columns 2t, 2t + 1; c2, c3 at row g + 8.
//
// Shapes (N % 16 == 0 and K % 32 == 0: whole tiles; other weights keep the ROW layout):
//   values_mma [N, K/2]  weight dtype, the interchange shape (N and K are read from it), holding
//                        the tiles [N/16, K/32, 256] in order. Tile (nt, kt) = rows 16nt..16nt+15,
//                        dense columns 32kt..32kt+31; its 256 values are lane-major: value v
//                        (0..7) of lane l is element 8l + v, i.e. lane l's A fragment a_v, one
//                        16-byte load per lane per tile.
//   meta_mma   int32 [N/16, ceil(K/64), 32]   Pair kp of tile row nt covers k-tiles 2kp
//                        (selector 0) and 2kp + 1 (selector 1): word l is the e register of
//                        lane l, for k-tile 2kp + (t >> 1), half p = t & 1 (lanes with t < 2 feed
//                        selector 0, lanes with t >= 2 selector 1). Every lane loads one 32-bit
//                        word per 64 K and passes it to both mma.sp.
// Padding: when K/32 is odd, the selector-1 half of the last pair describes no k-tile; it holds
// nibbles 0x4 (idx0 = 0, idx1 = 1: valid and ordered) and is never used.
#pragma once

#include <stdint.h>

#include "bitpress/common/macros.h"

namespace bitpress {

constexpr int kSparse24MmaTileN = 16;        // rows of W per tile: the m of mma.sp.m16n8k32
constexpr int kSparse24MmaTileK = 32;        // dense K per tile: the k of mma.sp.m16n8k32
constexpr int kSparse24MmaTileValues = 256;  // kept values per tile: 32 lanes x 8
constexpr int kSparse24MmaPairK = 64;        // dense K whose metadata one word per lane holds
constexpr int kSparse24MmaPairWords = 32;    // words per (tile row, pair): one per lane
constexpr int kSparse24MmaPadNibble = 0x4;   // metadata of a padding half: idx0 0, idx1 1

// K rounded up to the metadata pair: meta_mma has sparse24_mma_padded_k(K) / 64 pairs per row.
BITPRESS_INLINE int64_t sparse24_mma_padded_k(int64_t K) {
  return (K + kSparse24MmaPairK - 1) / kSparse24MmaPairK * kSparse24MmaPairK;
}

// A fragment: value v (0..7) of lane (0..31) -> row r (0..15) and compressed column c (0..15) of
// the tile. Dense group of c is c / 2, its kept value c % 2.
BITPRESS_INLINE void sparse24_mma_a_coords(int lane, int v, int* r, int* c) {
  const int g = lane >> 2, t = lane & 3;
  *r = g + 8 * ((v >> 1) & 1);
  *c = 2 * t + (v & 1) + 8 * (v >> 2);
}

// Inverse: the (lane, v) holding row r, compressed column c.
BITPRESS_INLINE void sparse24_mma_a_locate(int r, int c, int* lane, int* v) {
  *lane = 4 * (r & 7) + ((c & 7) >> 1);
  *v = (c & 1) + 2 * (r >> 3) + 4 * (c >> 3);
}

// Element offset of (tile row nt, k-tile kt, lane, value v) in values_mma; KT = K / 32.
BITPRESS_INLINE int64_t sparse24_mma_value_index(int64_t nt, int64_t kt, int lane, int v,
                                                 int64_t KT) {
  return (nt * KT + kt) * kSparse24MmaTileValues + 8 * lane + v;
}

// Metadata word of lane `lane` in a pair: nibble i (0..7) of the word describes row r (0..15) of
// the tile, group j (0..7, dense columns 4j..4j+3) of k-tile 2kp + dkt (dkt 0 or 1).
BITPRESS_INLINE void sparse24_mma_meta_coords(int lane, int i, int* r, int* dkt, int* j) {
  const int g = lane >> 2, t = lane & 3;
  *r = g + 8 * (i >> 2);
  *dkt = t >> 1;
  *j = 4 * (t & 1) + (i & 3);
}

// Inverse: the lane and nibble describing row r, group j of k-tile dkt of a pair.
BITPRESS_INLINE void sparse24_mma_meta_locate(int r, int dkt, int j, int* lane, int* i) {
  *lane = 4 * (r & 7) + 2 * dkt + (j >> 2);
  *i = (j & 3) + 4 * (r >> 3);
}

// The sparsity selector of k-tile kt: its metadata sits in lanes with t >> 1 == kt % 2.
BITPRESS_INLINE int sparse24_mma_selector(int64_t kt) { return int(kt & 1); }

// Word offset of (tile row nt, pair kp, lane) in meta_mma; KP = ceil(K / 64).
BITPRESS_INLINE int64_t sparse24_mma_meta_index(int64_t nt, int64_t kp, int lane, int64_t KP) {
  return (nt * KP + kp) * kSparse24MmaPairWords + lane;
}

// Decompression of one group: values v and v + 1 (v even) of lane `lane` in tile (nt, kt) are the
// two kept values of one group (sparse24_mma_a_coords): row *r of the tile, dense columns
// 32 kt + 4 *j .. +3, written to out4 with zeros at the pruned positions. T: any 16-bit (or
// wider) element type; KT = K / 32, KP = ceil(K / 64). Shared by the CUDA decompression kernel
// (the large-M path) and its host test.
template <typename T>
BITPRESS_INLINE void sparse24_mma_expand_group(const T* values, const uint32_t* meta, int64_t nt,
                                               int64_t kt, int lane, int v, int64_t KT, int64_t KP,
                                               int* r, int* j, T (&out4)[4]) {
  int c, ml, nib;
  sparse24_mma_a_coords(lane, v, r, &c);
  *j = c >> 1;
  sparse24_mma_meta_locate(*r, int(kt & 1), *j, &ml, &nib);
  const int code = int(meta[sparse24_mma_meta_index(nt, kt / 2, ml, KP)] >> (4 * nib)) & 0xF;
  const int64_t base = sparse24_mma_value_index(nt, kt, lane, v, KT);
  const T v0 = values[base], v1 = values[base + 1];
  // Selects, not a store to out4[code & 3] (a dynamic index would put out4 in local memory).
  for (int q = 0; q < 4; ++q) out4[q] = q == (code & 3) ? v0 : q == (code >> 2) ? v1 : T(0);
}

// B fragment (x^T, k32 x n8, "col"): register j (0..3) of lane holds x[m][k], x[m][k + 1] with
// m = lane / 4 (row of the n8 tile) and k = 2 (lane % 4) + 8 j; the kernel loads it with one
// ldmatrix.x4 whose matrix j is columns 8j..8j+7 of the 8 x 32 tile of x.
BITPRESS_INLINE void sparse24_mma_b_coords(int lane, int j, int* m, int* k) {
  *m = lane >> 2;
  *k = 2 * (lane & 3) + 8 * j;
}

// C fragment: accumulator i (0..3) of lane -> row r (output feature within the tile) and column m
// (row of x within the n8 tile).
BITPRESS_INLINE void sparse24_mma_c_coords(int lane, int i, int* r, int* m) {
  *r = (lane >> 2) + 8 * (i >> 1);
  *m = 2 * (lane & 3) + (i & 1);
}

}  // namespace bitpress
