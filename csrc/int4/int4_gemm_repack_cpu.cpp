// GPTQ qweight -> the GPU mma layout (bitpress/int4/int4_mma_layout.h), on the CPU. The same two
// steps as the CUDA kernel: per k16 x n64 tile, gather each column's 16 nibbles (rows
// perm[16kt..+15]) into two 32-bit halves, then assemble each of the 128 output words from the
// nibbles its lane's mma fragments need. The nibble -> (row, column) map is the header's.
#include <string.h>

#include "bitpress/int4/int4_gemm.h"
#include "bitpress/int4/int4_mma_layout.h"

namespace bitpress {
namespace {

Status check(const Int4RepackParams& p) {
  const Status s = int4_gemm_repack_check_sizes(p);
  if (s != Status::kSuccess) return s;
  for (int64_t i = 0; p.perm && i < p.Kp; ++i) {
    if (p.perm[i] < -1 || p.perm[i] >= p.K) return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

// One k16 x n64 tile, in the two steps of the CUDA kernel (int4_gemm_repack_sm80.cu).
void repack_tile(const Int4RepackParams& p, const int64_t* rows, int64_t nt, int32_t* out) {
  // cols[h * 64 + c]: rows 8h..8h+7 of the tile's column c, row 8h + r in nibble r.
  uint32_t cols[2 * kInt4MmaTileN];
  const int64_t n0 = nt * kInt4MmaTileN;
  const int64_t width = p.N - n0 < kInt4MmaTileN ? p.N - n0 : kInt4MmaTileN;
  memset(cols, 0, sizeof(cols));
  for (int kk = 0; kk < kInt4MmaTileK; ++kk) {
    if (rows[kk] < 0) continue;
    const uint32_t* q =
        reinterpret_cast<const uint32_t*>(p.qweight) + (rows[kk] >> 3) * p.qweight_row_stride + n0;
    const int shift = 4 * int(rows[kk] & 7), dst = 4 * (kk & 7);
    uint32_t* c = cols + (kk >> 3) * kInt4MmaTileN;
    for (int64_t n = 0; n < width; ++n) c[n] |= ((q[n] >> shift) & 0xFu) << dst;
  }
  // Unrolled over (w, v), the header's coordinates fold to constants plus lane terms.
  for (int lane = 0; lane < 32; ++lane) {
#pragma GCC unroll 4
    for (int w = 0; w < 4; ++w) {
      uint32_t word = 0;
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) {
        int kk, nn;
        int4_mma_value_coords(lane, w, v, &kk, &nn);
        word |= ((cols[(kk >> 3) * kInt4MmaTileN + nn] >> (4 * (kk & 7))) & 0xFu)
                << (4 * int4_mma_nibble_of_value(v));
      }
      out[4 * lane + w] = int32_t(word);
    }
  }
}

// k-tiles outside: each k-tile streams its 16 source rows left to right (the order the hardware
// prefetcher follows); n-tiles outside, with 64-column slabs spread over K, measured 1.4x slower.
void repack_ktiles(const Int4RepackParams& p, int64_t Nt, int64_t kt_begin, int64_t kt_end) {
  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    int64_t rows[kInt4MmaTileK];
    for (int kk = 0; kk < kInt4MmaTileK; ++kk) {
      const int64_t r = kt * kInt4MmaTileK + kk;
      rows[kk] = p.perm ? p.perm[r] : r;
    }
    for (int64_t nt = 0; nt < Nt; ++nt) {
      repack_tile(p, rows, nt, p.out + kt * p.out_row_stride + nt * kInt4MmaTileWords);
    }
  }
}

}  // namespace

Status int4_gemm_repack_cpu(const Int4RepackParams& p, const CpuThreadPool* pool) {
  const Status s = check(p);
  const int64_t Nt = (p.N + kInt4MmaTileN - 1) / kInt4MmaTileN, KT = p.Kp / kInt4MmaTileK;
  if (s != Status::kSuccess || KT == 0 || Nt == 0) return s;
  // A chunk of at least ~64 K output words, so that small layers are not split into slivers.
  const int64_t grain = (int64_t(1) << 16) / (Nt * kInt4MmaTileWords) + 1;
  parallel_for(pool, 0, KT, grain, [&](int64_t b, int64_t e) { repack_ktiles(p, Nt, b, e); });
  return Status::kSuccess;
}

}  // namespace bitpress
