// 2:4 sparsity metadata helpers shared by the CPU and CUDA kernels (torch-free, host and device).
//
// Interchange format (bitpress/sparse24/layout.py): a weight W [N, K] (K % 8 == 0) with at most
// 2 nonzeros in every group of 4 consecutive weights along K is stored as
//   values [N, K/2]: the two kept weights of each group, in K order;
//   meta   uint8 [N, K/8]: one nibble per group (the lower group in the low nibble),
//          nibble = idx0 | idx1 << 2, idx0 < idx1 the positions (0..3) of the kept weights.
// Read as a little-endian bit string, bits 2j..2j+1 of a row's metadata are the position of
// value j within its group: a 32-bit word of metadata describes 16 values (64 dense weights), and
// value j of the word sits at dense column 4 * (j / 2) + ((word >> 2j) & 3) of the word's span.
#pragma once

#include <stdint.h>

#include "bitpress/common/macros.h"

namespace bitpress {

// The kernel layouts (bitpress.sparse24.layout.Sparse24Layout; the `layout` argument of the ops).
enum class Sparse24Layout : int64_t {
  kRow = 0,  // the interchange tensors (CPU kernels)
  kMma = 1,  // mma.sp ordered metadata (CUDA kernel; bitpress/sparse24/layout_mma.py)
};

// Dense weights per group, kept values per group, dense weights per metadata byte.
constexpr int kSparse24Group = 4;
constexpr int kSparse24Kept = 2;
constexpr int kSparse24WeightsPerMetaByte = 8;

// Bit v set: nibble v is ordered (idx0 < idx1): 0x4, 0x8, 0x9, 0xC, 0xD, 0xE.
constexpr uint32_t kSparse24ValidNibbles = 0x7310u;

BITPRESS_INLINE uint32_t sparse24_nibble(int idx0, int idx1) {
  return uint32_t(idx0) | (uint32_t(idx1) << 2);
}
BITPRESS_INLINE int sparse24_idx0(uint32_t nibble) { return int(nibble & 3u); }
BITPRESS_INLINE int sparse24_idx1(uint32_t nibble) { return int((nibble >> 2) & 3u); }
BITPRESS_INLINE bool sparse24_nibble_valid(uint32_t nibble) {
  return (kSparse24ValidNibbles >> (nibble & 0xFu)) & 1u;
}
// Both nibbles of a metadata byte ordered.
BITPRESS_INLINE bool sparse24_meta_byte_valid(uint8_t b) {
  return sparse24_nibble_valid(b & 0xFu) && sparse24_nibble_valid(uint32_t(b) >> 4);
}

// Nibble of group g (0-based along K) of a metadata row.
BITPRESS_INLINE uint32_t sparse24_group_nibble(const uint8_t* meta_row, int64_t g) {
  return (uint32_t(meta_row[g >> 1]) >> ((g & 1) * 4)) & 0xFu;
}

// Position within its group (0..3) of value j (0-based along K/2) of a metadata row.
BITPRESS_INLINE int sparse24_value_pos(const uint8_t* meta_row, int64_t j) {
  return int((uint32_t(meta_row[j >> 2]) >> ((j & 3) * 2)) & 3u);
}

// Dense column (0..K-1) of value j of a metadata row.
BITPRESS_INLINE int64_t sparse24_value_col(const uint8_t* meta_row, int64_t j) {
  return (j >> 1) * kSparse24Group + sparse24_value_pos(meta_row, j);
}

// Dense column, within the 64 weights of a 32-bit metadata word, of its value j (0..15).
BITPRESS_INLINE int sparse24_word_col(uint32_t word, int j) {
  return (j >> 1) * kSparse24Group + int((word >> (2 * j)) & 3u);
}

// The metadata nibble of a group of 4 dense weights from their "nonzero" flags (bit i: weight i
// is nonzero, at most 2 bits set): the nonzero positions, completed with the lowest zero
// positions, in increasing order. Returns 0xFF when more than 2 flags are set.
BITPRESS_INLINE uint32_t sparse24_nibble_of_mask(uint32_t nz) {
  int kept[2] = {0, 0};
  int n = 0;
  for (int i = 0; i < 4; ++i) {
    if ((nz >> i) & 1u) {
      if (n == 2) return 0xFFu;
      kept[n++] = i;
    }
  }
  for (int i = 0; i < 4 && n < 2; ++i) {
    if (!((nz >> i) & 1u)) kept[n++] = i;
  }
  if (kept[0] > kept[1]) {
    const int t = kept[0];
    kept[0] = kept[1];
    kept[1] = t;
  }
  return sparse24_nibble(kept[0], kept[1]);
}

// The quantization group of the value at dense column k (sparse24_int4_gemm).
BITPRESS_INLINE int64_t sparse24_int4_group(int64_t k, int64_t group_size) {
  return k / group_size;
}

// 4-bit code of value j of a qvalues row (int32 [K/16]: value j in nibble j % 8 of word j / 8).
BITPRESS_INLINE uint32_t sparse24_int4_code(const int32_t* qvalues_row, int64_t j) {
  return (uint32_t(qvalues_row[j >> 3]) >> ((j & 7) * 4)) & 0xFu;
}

}  // namespace bitpress
