// Index maps of the sm_90a fp8_gemm kernel (csrc/fp8/fp8_gemm_sm90a.cu): who owns which element of
// the wgmma accumulator, where the loaders put each 16-byte chunk of an operand tile in shared
// memory, and the shared-memory matrix descriptors wgmma reads those tiles through. Torch-free,
// __host__ __device__: the kernel and its host emulation (tests/cpp/test_fp8_wgmma.cpp) call these
// very functions.
//
// Operand tiles (A [BM, 128] and B [128, 128], both K-major, one byte per E4M3 element): a row is
// 128 K values = 128 bytes = exactly the width of the 128-byte swizzle atom, so a tile is a stack
// of 8-row x 128-byte atoms (1024 bytes each). Inside an atom, 16-byte chunk c of row r sits at
// chunk c ^ (r % 8) (CUTLASS's Swizzle<3,4,3> on byte addresses, which is what the wgmma
// "128B swizzle" mode undoes when it reads): the 8 rows of one K chunk fall in 8 different bank
// groups, so neither the loaders nor the tensor core conflict. Hopper's FP8 wgmma takes both
// operands from shared memory K-major only (PTX ISA, wgmma .kind: "for .e4m3/.e5m2 the matrices
// must be K-major"), which is why B is the Linear weight [N, K] as it is.
#pragma once

#include <stdint.h>

#include "bitpress/common/macros.h"

namespace bitpress {

// K of one wgmma.m64nNk32 on E4M3, in elements (= bytes).
constexpr int kFp8WgmmaK = 32;
// K of one pipeline stage, and of one promotion interval: the tensor-core partial sum is added
// into the fp32 register accumulator once per 128 K (DeepSeek-V3 §3.3.2), which is also the K
// extent of one block scale.
constexpr int kFp8TileK = 128;
// N of one block tile (and of the wgmma instruction): one 128-row block of B's block scales.
constexpr int kFp8TileN = 128;
// Rows of one warpgroup's wgmma (m64).
constexpr int kFp8WgmmaM = 64;
// 128-byte swizzle atom: 8 rows x 128 bytes.
constexpr int kFp8SwizzleRows = 8;
constexpr int kFp8SwizzleBytes = 128;
constexpr int kFp8AtomBytes = kFp8SwizzleRows * kFp8SwizzleBytes;  // 1024: the SBO

// ---------------------------------------------------------------------------------------------
// Shared-memory tile layout (128-byte swizzle, K-major)
// ---------------------------------------------------------------------------------------------

// The 128-byte swizzle as a function of the byte offset inside a 1024-byte aligned region: bits
// [4, 7) (the 16-byte chunk) XOR bits [7, 10) (the row inside the 8-row atom).
BITPRESS_INLINE constexpr uint32_t fp8_swizzle128(uint32_t offset) {
  return offset ^ (((offset >> 7) & 7u) << 4);
}

// Byte offset of element (row, k) of a K-major tile of 128-byte rows (k < 128), swizzled.
BITPRESS_INLINE constexpr uint32_t fp8_tile_offset(int row, int k) {
  return fp8_swizzle128(uint32_t(row) * kFp8SwizzleBytes + uint32_t(k));
}

// Loader map: a tile of `rows` rows is copied as rows * 8 chunks of 16 bytes; chunk i of the
// tile (row-major over (row, chunk)) is copied by thread i % threads in round i / threads.
// Consecutive threads read consecutive 16-byte chunks of one 128-byte row of global memory
// (coalesced), and write them to the swizzled chunk.
struct Fp8LoadChunk {
  int row;        // row of the tile (of the operand: + tile origin)
  int chunk;      // 16-byte chunk along K in global memory (k = 16 chunk)
  uint32_t smem;  // byte offset of its destination in the tile
};
BITPRESS_INLINE constexpr Fp8LoadChunk fp8_load_chunk(int thread, int round, int threads) {
  const int i = round * threads + thread;
  const int row = i >> 3, chunk = i & 7;
  return {row, chunk, fp8_tile_offset(row, chunk * 16)};
}

// ---------------------------------------------------------------------------------------------
// wgmma shared-memory matrix descriptor (PTX ISA 9.7.15.5.1, "Matrix Descriptor Format")
// ---------------------------------------------------------------------------------------------
//   bits  0-13  start address >> 4 (shared-window byte address)
//   bits 16-29  leading-dimension byte offset >> 4 (unused by K-major swizzled layouts whose K
//               extent per instruction (32 bytes) fits in one swizzle row: set to 1, as CUTLASS)
//   bits 32-45  stride-dimension byte offset >> 4: from one 8-row group to the next (1024 here)
//   bits 49-51  matrix base offset (0: every tile starts 1024-byte aligned)
//   bits 62-63  swizzle mode: 0 none, 1 128-byte, 2 64-byte, 3 32-byte
// A k32 step inside the 128-byte row is taken by advancing the start address by 32 bytes: the
// hardware applies the swizzle to the full computed address (bits 7-9 of it, i.e. the row in the
// atom, unchanged by the advance), as CUTLASS's and DeepGEMM's descriptor iterators do.
enum class Fp8SmemSwizzle : uint32_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

BITPRESS_INLINE constexpr uint64_t fp8_wgmma_desc(uint32_t smem_addr, uint32_t lbo_bytes,
                                                  uint32_t sbo_bytes, Fp8SmemSwizzle swizzle) {
  return uint64_t((smem_addr >> 4) & 0x3FFFu) | (uint64_t((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFFu) << 32) | (uint64_t(swizzle) << 62);
}

// The descriptor of the k32 step `ks` (0..3) of a 128-byte-swizzled K-major tile whose rows
// [row0, row0 + 64 or 128) the instruction reads; tile_addr 1024-byte aligned, row0 % 8 == 0.
BITPRESS_INLINE constexpr uint64_t fp8_tile_desc(uint32_t tile_addr, int row0, int ks) {
  return fp8_wgmma_desc(tile_addr + uint32_t(row0) * kFp8SwizzleBytes + uint32_t(ks) * kFp8WgmmaK,
                        16, kFp8AtomBytes, Fp8SmemSwizzle::k128B);
}

// ---------------------------------------------------------------------------------------------
// Accumulator fragment of wgmma.m64nNk32 (f32 D), PTX ISA "Register Fragments and Shared Memory
// Matrix Layouts", figure "WGMMA .m64nNk32 register fragment layout for accumulator matrix D"
// ---------------------------------------------------------------------------------------------
// Thread t of the warpgroup (warp w = t / 32, lane l = t % 32) holds N/2 floats d[0 .. N/2):
//   d[4 i + 2 h + c]  at  row 16 w + l / 4 + 8 h,  column 8 i + 2 (l % 4) + c
// (i in [0, N/8), h, c in {0, 1}): the mma.m16n8 C layout, repeated over the N/8 column blocks
// and stacked over the 4 warps.
struct Fp8AccCoord {
  int row, col;
};
BITPRESS_INLINE constexpr Fp8AccCoord fp8_wgmma_acc_coord(int thread, int reg) {
  const int w = thread >> 5, l = thread & 31;
  const int i = reg >> 2, h = (reg >> 1) & 1, c = reg & 1;
  return {16 * w + (l >> 2) + 8 * h, 8 * i + 2 * (l & 3) + c};
}

// The two rows a thread's accumulator covers (h = 0, 1): the rows whose A block scales it loads
// at each promotion.
BITPRESS_INLINE constexpr int fp8_wgmma_acc_row(int thread, int h) {
  return 16 * (thread >> 5) + ((thread & 31) >> 2) + 8 * h;
}

}  // namespace bitpress
