// INT4 bit tricks shared by the CPU and CUDA kernels.
//
// GPTQ packing: eight 4-bit values per int32, element j of a word in bits 4j..4j+3 ("lowest
// nibble first"). qweight packs 8 consecutive k of one column n; qzeros packs 8 consecutive n of
// one group.
#pragma once

#include <stdint.h>

#include "bitpress/common/macros.h"

namespace bitpress {

// Nibble j (0..7) of a packed word, as an unsigned value 0..15.
BITPRESS_INLINE int unpack_nibble(uint32_t word, int j) { return int((word >> (4 * j)) & 0xFu); }

// The zero point of symmetric 4-bit quantization: q in 0..15 represents (q - 8) * scale.
constexpr int kInt4SymmetricZero = 8;

// Group of row k: g_idx[k] when the checkpoint has one (act-order), else k / group_size.
BITPRESS_INLINE int64_t int4_group_of(int64_t k, const int32_t* g_idx, int64_t group_size) {
  return g_idx ? int64_t(g_idx[k]) : k / group_size;
}

}  // namespace bitpress
