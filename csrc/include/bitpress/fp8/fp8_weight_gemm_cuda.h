// CUDA fp8_weight_gemm (W8A16): y = x · (W · s)ᵀ (+ bias), W in E4M3, for GPUs without FP8 tensor
// cores (sm_80 / sm_86 / sm_89; the same code runs on sm_90a). Kernel and design notes:
// csrc/fp8/fp8_weight_gemm_sm80.cu; decode and index math: bitpress/fp8/fp8_mma_dequant.h.
//
//   x        [M, K]   float16 / bfloat16, unit stride along K, read by 16-byte cp.async: x 16-byte
//                     aligned, x_row_stride % 8 == 0
//   w        [N, K]   float8_e4m3fn bytes, row-major (a Linear's weight as checkpoints hold it,
//                     no repacked layout), 16-byte aligned, w_row_stride % 16 == 0
//   w_scale  float32  kTensor: [1]; kRow: [N] (one per weight row, "channel"); kBlock:
//                     [ceil(N/128), ceil(K/128)] row-major (128 x 128 blocks, DeepSeek-V3)
//   bias     [N]      optional, float32 / float16 / bfloat16
//   out      [M, N]   x's dtype, unit stride along N
//   y[m, n] = sum_k x[m, k] W[n, k] s(n, k) + bias[n], accumulated in fp32:
//     tensor / channel: s(n) multiplies the fp32 sum once in the epilogue;
//     block: the fp32 sum of each 128-k block is multiplied by its scale and added in fp32.
//   E4M3 is decoded exactly into x's type (every E4M3 value is an fp16 and a bf16 value), so the
//   products x W are exact and the only roundings are fp32 accumulation and the final rounding.
//   NaN codes give NaN.
// K % 16 == 0 (the torch glue pads other K with zeros), any M, N.
//
// Steps, all on `stream`, no host synchronization, no allocation:
//   1. the GEMM kernel (mma.sync.m16n8k16, fp32 accumulation), split along K over S blocks when
//      the M x N tiles underfill the GPU (S = fp8_weight_gemm_cuda_splits); S == 1: bias added and
//      rounded once in the kernel; S > 1: fp32 partials [S, M, N] in the workspace,
//   2. then a reduction kernel sums them in split order (deterministic), adds bias, rounds once.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "bitpress/common/status.h"
#include "bitpress/fp8/fp8_gemm.h"

namespace bitpress {

struct Fp8WeightGemmCudaParams {
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;  // kFloat16 or kBFloat16; out has the same type
  int64_t x_row_stride = 0;          // elements
  int64_t M = 0, K = 0, N = 0;
  const uint8_t* w = nullptr;  // E4M3 codes
  int64_t w_row_stride = 0;    // bytes, >= K
  const float* w_scale = nullptr;
  Fp8ScaleLayout scale_layout = Fp8ScaleLayout::kRow;  // kTensor, kRow or kBlock
  const void* bias = nullptr;                          // optional
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;
  int64_t out_row_stride = 0;  // elements
  // Multiprocessors of the device (cudaDevAttrMultiProcessorCount): sets S, hence the workspace.
  int num_sms = 0;
  void* workspace = nullptr;  // fp8_weight_gemm_cuda_workspace_size(*this) bytes, 256-aligned
  size_t workspace_bytes = 0;
};

// Rows of x per block: 16 * fp8_weight_gemm_cuda_m_tiles(M).
inline int fp8_weight_gemm_cuda_m_tiles(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

// Split-K factor S: when the ceil(N/128) x ceil(M/BM) output tiles underfill the GPU, enough
// splits to give every SM a block (decode, M <= 16: Llama-3-8B's N = 4096 has 32 tiles for 108
// SMs -> S = 3), with at least 2 stages of 128 k per split (the cp.async pipeline needs stages in
// flight to pay off) and at most 64 (workspace).
inline int fp8_weight_gemm_cuda_splits(int64_t M, int64_t K, int64_t N, int num_sms) {
  const int64_t stages = (K + 127) / 128;
  const int64_t bm = 16 * int64_t(fp8_weight_gemm_cuda_m_tiles(M));
  const int64_t blocks = ((N + 127) / 128) * ((M + bm - 1) / bm);
  if (num_sms <= 0 || stages < 4 || blocks <= 0 || blocks >= num_sms) return 1;
  int64_t s = num_sms / blocks;
  if (s > stages / 2) s = stages / 2;
  if (s > 64) s = 64;
  return s < 1 ? 1 : int(s);
}

// Workspace bytes: the split-K partials [S, M, N] float32 when S > 1, else 0.
inline size_t fp8_weight_gemm_cuda_workspace_size(const Fp8WeightGemmCudaParams& p) {
  if (p.M <= 0 || p.N <= 0 || p.K <= 0) return 0;
  const int S = fp8_weight_gemm_cuda_splits(p.M, p.K, p.N, p.num_sms);
  return S > 1 ? size_t(S) * size_t(p.M) * size_t(p.N) * 4 : 0;
}

// kInvalidArgument for bad sizes, strides, dtypes, alignment or a small workspace; kCudaError when
// a launch fails; kUnsupported in a build without CUDA. K == 0 writes bias (or zeros).
Status fp8_weight_gemm_cuda(const Fp8WeightGemmCudaParams& p, void* stream);

}  // namespace bitpress

namespace bitpress {

// The dense weight out[n, k] = W[n, k] · s(n, k), computed in fp32 and rounded once to out_dtype
// (float32: exact): the large-M path of the torch glue, which then calls cuBLAS (at large M the
// GEMM is compute-bound and cuBLAS's tensor-core kernels beat a weight-streaming one). One pass:
// 1 byte read and 2 (or 4) bytes written per weight.
struct Fp8WeightDequantizeCudaParams {
  const uint8_t* w = nullptr;  // [N, K] E4M3 codes, 16-byte aligned
  int64_t w_row_stride = 0;    // bytes, >= K, % 16 == 0
  int64_t N = 0, K = 0;        // K % 16 == 0
  const float* w_scale = nullptr;
  Fp8ScaleLayout scale_layout = Fp8ScaleLayout::kRow;  // kTensor, kRow or kBlock
  void* out = nullptr;                                 // [N, K]
  DType out_dtype = DType::kBFloat16;
  int64_t out_row_stride = 0;  // elements, >= K, % 8 == 0; out 16-byte aligned
};

Status fp8_weight_dequantize_cuda(const Fp8WeightDequantizeCudaParams& p, void* stream);

}  // namespace bitpress
