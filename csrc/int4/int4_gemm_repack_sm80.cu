// CUDA kernel of int4_gemm_repack: GPTQ qweight -> the GPU mma layout
// (bitpress/int4/int4_mma_layout.h, bitpress/int4/int4_gemm.h for the contract).
//
// One block of 128 threads per k16 x n64 tile, one thread per output word. The rows of a tile are
// arbitrary (perm), so each source word contributes one nibble: the block first gathers the
// tile's 16 x 64 nibbles, thread (h, c) reading column c of rows 8h..8h+7 (a warp reads 32
// consecutive words of one source row: coalesced) into a 32-bit column half in shared memory;
// then thread 4*lane + w assembles its word from the 8 nibbles of its mma fragments and the
// block writes the tile's 128 consecutive words (coalesced). The (row, column) of each nibble is
// the header's int4_mma_value_coords, as in the CPU kernel, so both produce the same bits.
//
// perm is on the device and is not validated (that would need a host sync): a value outside
// [-1, K) reads nothing and gives the zeros of a padding row.
#include <cuda_runtime.h>

#include "bitpress/cuda/primitives.cuh"
#include "bitpress/int4/int4_gemm.h"
#include "bitpress/int4/int4_mma_layout.h"

namespace bitpress {
namespace {

constexpr int kThreads = kInt4MmaTileWords;  // 128: one per output word of a tile
static_assert(kThreads == 2 * kInt4MmaTileN, "the gather maps thread (h, c) to column c, half h");

__global__ void __launch_bounds__(kThreads) int4_gemm_repack_kernel(const Int4RepackParams p) {
  // cols[h][c]: rows 8h..8h+7 of column c of the tile, row 8h + r in nibble r.
  __shared__ uint32_t cols[2][kInt4MmaTileN];
  const int tid = threadIdx.x;
  const int c = tid % kInt4MmaTileN, h = tid / kInt4MmaTileN;
  const int lane = tid >> 2, w = tid & 3;
  const int64_t nt = blockIdx.x;
  const int64_t n = nt * kInt4MmaTileN + c;
  const bool in_n = n < p.N;
  const uint32_t* qweight = reinterpret_cast<const uint32_t*>(p.qweight);
  const int64_t KT = p.Kp / kInt4MmaTileK;
  for (int64_t kt = blockIdx.y; kt < KT; kt += gridDim.y) {
    uint32_t half = 0;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int64_t row = kt * kInt4MmaTileK + 8 * h + r;
      const int64_t k = p.perm ? int64_t(__ldg(p.perm + row)) : row;
      if (in_n && k >= 0 && k < p.K) {
        const uint32_t word = __ldg(qweight + (k >> 3) * p.qweight_row_stride + n);
        half |= ((word >> (4 * int(k & 7))) & 0xFu) << (4 * r);
      }
    }
    cols[h][c] = half;
    __syncthreads();
    uint32_t out = 0;
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      // By value rather than through kInt4MmaRowOfNibble[i]: a namespace-scope constexpr array
      // is not addressable from device code; the two maps are inverse
      // (tests/cpp/test_int4_gemm_repack.cpp).
      int kk, nn;
      int4_mma_value_coords(lane, w, v, &kk, &nn);
      out |= ((cols[kk >> 3][nn] >> (4 * (kk & 7))) & 0xFu) << (4 * int4_mma_nibble_of_value(v));
    }
    p.out[kt * p.out_row_stride + nt * kInt4MmaTileWords + tid] = int32_t(out);
    __syncthreads();  // cols is rewritten by the next k-tile
  }
}

Status check(const Int4RepackParams& p) {
  const Status s = int4_gemm_repack_check_sizes(p);
  if (s != Status::kSuccess) return s;
  if ((p.N + kInt4MmaTileN - 1) / kInt4MmaTileN > 0x7fffffff) return Status::kInvalidArgument;
  return Status::kSuccess;
}

}  // namespace

Status int4_gemm_repack_cuda(const Int4RepackParams& p, void* stream) {
  const Status s = check(p);
  const int64_t Nt = (p.N + kInt4MmaTileN - 1) / kInt4MmaTileN, KT = p.Kp / kInt4MmaTileK;
  if (s != Status::kSuccess || KT == 0 || Nt == 0) return s;
  const dim3 grid(unsigned(Nt), unsigned(KT < 65535 ? KT : 65535));
  int4_gemm_repack_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return cuda_launch_status();
}

}  // namespace bitpress
