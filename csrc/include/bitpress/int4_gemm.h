// int4_gemm: y = x · Wᵀ (+ bias) with W an INT4 weight in the bitpress CPU tile layout.
//
//   W[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n]
//   y[m, n] = sum_k x[m, k] W[n, k] + bias[n]
//
// Layout (python/bitpress/formats/int4_layout.py has the full description and the repack):
//   qweight      int32   [Nt, Kp/8, 64]  Nt = ceil(N/64); word [t, o, c] holds rows 8o..8o+7 of
//                                       column 64t+c, row 8o+j in nibble position NIBBLE_OF_ROW[j]
//                                       (nibble i holds row (0,2,4,6,1,3,5,7)[i])
//   scales       float32 [Nt, G, 64]
//   zeros        uint8   [Nt, G, 64]    or null: every zero point is 8
//   group_starts int32   [G+1]          first octet of each group; groups are contiguous
//   perm         int32   [Kp]           source column of x for each packed row, -1 = zero row;
//                                       null: the identity (Kp == K)
//   x            [M, K]  float32 / float16 / bfloat16, unit stride along K
//   bias         [N]     optional, any of the three dtypes
//   out          [M, N]  float32 / float16 / bfloat16, unit stride along N
//
// Kernels (chosen by active_cpu_isa() and the x dtype):
//   * AVX-512 + AVX512_BF16, x in bf16/fp16: vdpbf16ps on (128 + q) bf16 pairs; fp16 x is split
//     into two bf16 terms hi + lo (exact for fp16). The 128 offset and the zero points are removed
//     per group with the group sum of x.
//   * otherwise (fp32 x, AVX2, the portable path): unpacked q as float32, FMA with x in float32.
// Results are accumulated in float32 and rounded once to the output dtype.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "bitpress/cpu.h"
#include "bitpress/dtype.h"
#include "bitpress/status.h"

namespace bitpress {

constexpr int kInt4TileN = 64;

struct Int4GemmParams {
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;
  int64_t x_row_stride = 0;
  int64_t M = 0, K = 0;
  const int32_t* qweight = nullptr;
  const float* scales = nullptr;
  const uint8_t* zeros = nullptr;         // optional
  const int32_t* group_starts = nullptr;  // [G+1]
  const int32_t* perm = nullptr;          // optional
  int64_t Kp = 0, G = 0, N = 0;
  const void* bias = nullptr;  // optional
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;
  DType out_dtype = DType::kBFloat16;
  int64_t out_row_stride = 0;
  void* workspace = nullptr;  // int4_gemm_cpu_workspace_size() bytes, 64-byte aligned
  size_t workspace_bytes = 0;
};

// Bytes of workspace int4_gemm_cpu needs for these sizes.
size_t int4_gemm_cpu_workspace_size(int64_t M, int64_t Kp, int64_t G);

// Checks sizes, pointers and group_starts (monotonic, ending at Kp/8) and perm values.
Status int4_gemm_check(const Int4GemmParams& p);

Status int4_gemm_cpu(const Int4GemmParams& p, const CpuThreadPool* pool = nullptr);

// ---------------------------------------------------------------------------------------------
// Repack: GPTQ tensors -> the tile layout above (what python/bitpress/formats/int4_layout.py
// does at load time), for runtimes that load checkpoints without Python.
// ---------------------------------------------------------------------------------------------

struct Int4PackParams {
  const int32_t* qweight = nullptr;  // [K/8, N], packed along K (GPTQ)
  int64_t qweight_row_stride = 0;
  const int32_t* qzeros = nullptr;  // [G, ceil(N/8)] real zero points ("gptq_v2"), or null: 8
  int64_t qzeros_row_stride = 0;
  const void* scales = nullptr;  // [G, N]
  DType scales_dtype = DType::kFloat16;
  int64_t scales_row_stride = 0;
  const int32_t* g_idx = nullptr;  // [K] group of each row, or null: k / group_size
  int64_t K = 0, N = 0, G = 0, group_size = 0;
};

// Kp of the packed layout: K with each group's rows padded to whole octets.
Status int4_gemm_pack_size(const Int4PackParams& p, int64_t* Kp);

// Writes qweight_tiles [Nt, Kp/8, 64], scales_tiles [Nt, G, 64], zeros_tiles [Nt, G, 64] (skipped
// when null; with qzeros null it is filled with 8), group_starts [G+1] and perm [Kp]. Rows of a
// group keep their order; padding rows and columns past N are zero (perm -1).
Status int4_gemm_pack(const Int4PackParams& p, int32_t* qweight_tiles, float* scales_tiles,
                      uint8_t* zeros_tiles, int32_t* group_starts, int32_t* perm);

}  // namespace bitpress
