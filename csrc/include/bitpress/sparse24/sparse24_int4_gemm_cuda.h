// CUDA sparse24_int4_gemm: y = x W^T (+ bias) with W [N, K] 2:4 sparse along K and its kept values
// INT4 codes with groups of dense K (symmetric w = (q - 8) s, asymmetric w = (q - z) s), in the
// mma layout (bitpress/sparse24/sparse24_int4_mma.h); kernel and design notes in
// csrc/sparse24/sparse24_int4_gemm_sm80.cu. Torch-free.
//
//   x            [M, K]                   float16 / bfloat16, unit stride along K, read by 16-byte
//                                         cp.async: x 16-byte aligned, x_row_stride % 8 == 0
//   qvalues_mma  int32 [N, K/16]          the words [N/16, K/32, 32]; 16-byte aligned
//   meta_mma     int32 [N/16, ceil(K/64), 32]   16-byte aligned
//   scales       [G, N] contiguous        float32 / float16 / bfloat16; 16-byte aligned
//   zeros        [G, N] contiguous        optional (symmetric without), float32 / float16 /
//   bfloat16 bias         [N]                      optional, float32 / float16 / bfloat16 out [M,
//   N]                   x's dtype, unit stride along N
// G = ceil(K / group_size); group_size % 32 == 0 (a k-tile of mma.sp never straddles two groups)
// or -1 (one group over K). N % 16 == 0, K % 32 == 0.
//
// Steps, all on `stream`, no host synchronization, no allocation: the GEMM kernel (codes decoded
// in registers, mma.sp m16n8k32, fp32 accumulation), split along K over S blocks when the output
// tiles underfill the GPU; S == 1: bias added and rounded once in the kernel; S > 1: fp32 partials
// [S, M, N] in the workspace, summed in split order by a reduction kernel (deterministic).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "bitpress/common/status.h"
#include "bitpress/sparse24/sparse24_int4_mma.h"

namespace bitpress {

constexpr int kSparse24Int4GemmThreads = 256;  // 8 warps: 4 tile rows x 2 k-warps

struct Sparse24Int4GemmCudaParams {
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;  // kFloat16 or kBFloat16; out has the same type
  int64_t x_row_stride = 0;          // elements
  int64_t M = 0, K = 0, N = 0;       // N % 16 == 0, K % 32 == 0
  const int32_t* qvalues = nullptr;  // qvalues_mma
  const int32_t* meta = nullptr;     // meta_mma
  const void* scales = nullptr;      // [G, N]
  DType scales_dtype = DType::kFloat16;
  const void* zeros = nullptr;  // [G, N] or nullptr (symmetric: z = 8)
  DType zeros_dtype = DType::kFloat16;
  int64_t group_size = 128;  // % 32 == 0, or -1
  const void* bias = nullptr;
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;
  int64_t out_row_stride = 0;  // elements
  int num_sms = 0;             // cudaDevAttrMultiProcessorCount: sets S, hence the workspace
  void* workspace = nullptr;   // sparse24_int4_gemm_cuda_workspace_size(*this) bytes, 256-aligned
  size_t workspace_bytes = 0;
};

// m8 tiles of x per block (the n of mma.sp is 8 rows of x): 1 (M <= 8), 2 (M <= 16), 4 (above,
// where m-blocks share each weight strip through L2).
inline int sparse24_int4_gemm_cuda_m_tiles(int64_t M) { return M <= 8 ? 1 : M <= 16 ? 2 : 4; }

// Split-K factor S: ~2 blocks per SM stream the weights at decode sizes (N = 4096: 64 strips on
// 132 SMs), each with at least 2 stages of 256 K, at most 32.
inline int sparse24_int4_gemm_cuda_splits(int64_t M, int64_t K, int64_t N, int num_sms) {
  const int64_t stages = (K + kSparse24Int4StageK - 1) / kSparse24Int4StageK;
  const int64_t bm = 8 * int64_t(sparse24_int4_gemm_cuda_m_tiles(M));
  const int64_t blocks =
      ((N / kSparse24MmaTileN + kSparse24Int4BlockNTiles - 1) / kSparse24Int4BlockNTiles) *
      ((M + bm - 1) / bm);
  if (num_sms <= 0 || stages < 4 || blocks <= 0 || blocks >= 2 * int64_t(num_sms)) return 1;
  int64_t s = (2 * int64_t(num_sms) + blocks - 1) / blocks;
  if (s > stages / 2) s = stages / 2;
  if (s > 32) s = 32;
  return s < 1 ? 1 : int(s);
}

// Workspace bytes: the split-K partials [S, M, N] float32 when S > 1, else 0.
inline size_t sparse24_int4_gemm_cuda_workspace_size(const Sparse24Int4GemmCudaParams& p) {
  if (p.M <= 0 || p.N <= 0) return 0;
  const int S = sparse24_int4_gemm_cuda_splits(p.M, p.K, p.N, p.num_sms);
  return S > 1 ? size_t(S) * size_t(p.M) * size_t(p.N) * 4 : 0;
}

// kInvalidArgument for bad sizes, strides, dtypes, group size, alignment or a small workspace;
// kCudaError when a launch fails; kUnsupported in a build without CUDA.
Status sparse24_int4_gemm_cuda(const Sparse24Int4GemmCudaParams& p, void* stream);

}  // namespace bitpress
