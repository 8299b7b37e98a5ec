// CUDA sparse24_gemm: y = x W^T (+ bias) with W [N, K] 2:4 sparse along K, in the mma layout
// (bitpress/sparse24/sparse24_mma_layout.h, Sparse24Layout.MMA); kernel and design notes in
// csrc/sparse24/sparse24_gemm_sm80.cu. Torch-free.
//
//   x           [M, K]              float16 / bfloat16, unit stride along K, read by 16-byte
//                                   cp.async: x 16-byte aligned, x_row_stride % 8 == 0
//   values_mma  [N, K/2]            x's dtype, the tiles [N/16, K/32, 256]; 16-byte aligned
//   meta_mma    int32 [N/16, ceil(K/64), 32]   16-byte aligned
//   bias        [N]                 optional, float32 / float16 / bfloat16
//   out         [M, N]              x's dtype, unit stride along N
//
// Steps, all on `stream`, no host synchronization, no allocation:
//   1. the GEMM kernel (mma.sp m16n8k32, fp32 accumulation), split along K over S blocks when the
//      N x M tiles underfill the GPU (S = sparse24_gemm_cuda_splits); S == 1: bias added and
//      rounded once to x's type in the kernel; S > 1: fp32 partials [S, M, N] in the workspace,
//   2. then a reduction kernel sums them in split order (deterministic), adds bias, rounds once.
// Any M (the torch glue sends large M to cuBLAS on the decompressed weight instead), N % 16 == 0,
// K % 32 == 0 (whole tiles: the layout's condition).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "bitpress/common/status.h"
#include "bitpress/sparse24/sparse24_mma_layout.h"

namespace bitpress {

constexpr int kSparse24GemmThreads = 256;    // 8 warps: 4 tile rows x 2 k-pairs
constexpr int kSparse24GemmBlockNTiles = 4;  // n16 tiles per block: 64 output features
constexpr int kSparse24GemmStageK = 128;     // dense K per pipeline stage: 2 metadata pairs
constexpr int kSparse24GemmStagePairs = kSparse24GemmStageK / kSparse24MmaPairK;

struct Sparse24GemmCudaParams {
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;  // kFloat16 or kBFloat16; values and out have the same type
  int64_t x_row_stride = 0;          // elements
  int64_t M = 0, K = 0, N = 0;       // N % 16 == 0, K % 32 == 0
  const void* values = nullptr;      // values_mma
  const int32_t* meta = nullptr;     // meta_mma
  const void* bias = nullptr;        // optional
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;
  int64_t out_row_stride = 0;  // elements
  // Multiprocessors of the device (cudaDevAttrMultiProcessorCount): sets S, hence the workspace.
  int num_sms = 0;
  void* workspace = nullptr;  // sparse24_gemm_cuda_workspace_size(*this) bytes, 256-byte aligned
  size_t workspace_bytes = 0;
};

// m8 tiles of x per block (the n of mma.sp is 8 rows of x): 1, 2, 4 or 8 (BM = 8 .. 64 rows).
inline int sparse24_gemm_cuda_m_tiles(int64_t M) {
  return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8;
}

// Split-K factor S. At decode sizes the N/64 x M/BM output tiles underfill the GPU (N = 4096:
// 64 blocks on 132 SMs) and each block would stream a whole K-strip alone; S blocks per strip
// make ~2 blocks per SM, each with at least 2 stages of 128 K (the cp.async pipeline needs
// stages in flight to pay off), at most 32 (workspace and the reduction's reads).
inline int sparse24_gemm_cuda_splits(int64_t M, int64_t K, int64_t N, int num_sms) {
  const int64_t stages = (K + kSparse24GemmStageK - 1) / kSparse24GemmStageK;
  const int64_t bm = 8 * int64_t(sparse24_gemm_cuda_m_tiles(M));
  const int64_t blocks =
      ((N / kSparse24MmaTileN + kSparse24GemmBlockNTiles - 1) / kSparse24GemmBlockNTiles) *
      ((M + bm - 1) / bm);
  if (num_sms <= 0 || stages < 4 || blocks <= 0 || blocks >= 2 * int64_t(num_sms)) return 1;
  int64_t s = (2 * int64_t(num_sms) + blocks - 1) / blocks;
  if (s > stages / 2) s = stages / 2;
  if (s > 32) s = 32;
  return s < 1 ? 1 : int(s);
}

// Workspace bytes: the split-K partials [S, M, N] float32 when S > 1, else 0.
inline size_t sparse24_gemm_cuda_workspace_size(const Sparse24GemmCudaParams& p) {
  if (p.M <= 0 || p.N <= 0) return 0;
  const int S = sparse24_gemm_cuda_splits(p.M, p.K, p.N, p.num_sms);
  return S > 1 ? size_t(S) * size_t(p.M) * size_t(p.N) * 4 : 0;
}

// kInvalidArgument for bad sizes, strides, dtypes, alignment or a small workspace; kCudaError
// when a launch fails; kUnsupported in a build without CUDA.
Status sparse24_gemm_cuda(const Sparse24GemmCudaParams& p, void* stream);

// The dense weight W [N, K] in x's dtype from the mma layout (the large-M path of the torch glue,
// which then calls cuBLAS): every element of W written (pruned positions 0).
struct Sparse24DecompressCudaParams {
  const void* values = nullptr;    // values_mma
  const int32_t* meta = nullptr;   // meta_mma
  DType dtype = DType::kBFloat16;  // kFloat16 or kBFloat16 (a 16-bit copy: any 16-bit type works)
  int64_t N = 0, K = 0;
  void* out = nullptr;         // [N, out_row_stride]
  int64_t out_row_stride = 0;  // elements, >= K
};

Status sparse24_decompress_cuda(const Sparse24DecompressCudaParams& p, void* stream);

}  // namespace bitpress
