// int4_dequantize: GPTQ-packed INT4 weights -> a dense [K, N] matrix.
//
//   w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]        computed in float32, rounded once to out
//
//   q  : qweight int32 [K/8, N], packed along K: k = 8r + j sits in bits 4j..4j+3 of qweight[r, n]
//   s  : scales [G, N] (float32, float16 or bfloat16)
//   z  : qzeros int32 [G, ceil(N/8)], packed along N (n = 8c + j in bits 4j..4j+3 of qzeros[g, c]),
//        holding the real zero points ("gptq_v2" convention; bitpress.formats converts "gptq" v1);
//        null means symmetric, z = 8
//   g  : g_idx int32 [K] (act-order checkpoints), or null for g(k) = k / group_size
//   out: [K, N] (float32, float16 or bfloat16)
//
// Every matrix has unit stride along N; the row strides are given in elements.
#pragma once

#include <stdint.h>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/common/status.h"

namespace bitpress {

struct Int4DequantizeParams {
  const int32_t* qweight = nullptr;
  int64_t qweight_row_stride = 0;
  const void* scales = nullptr;
  DType scales_dtype = DType::kFloat16;
  int64_t scales_row_stride = 0;
  const int32_t* qzeros = nullptr;  // optional
  int64_t qzeros_row_stride = 0;
  const int32_t* g_idx = nullptr;  // optional
  void* out = nullptr;
  DType out_dtype = DType::kFloat16;
  int64_t out_row_stride = 0;
  int64_t K = 0;  // multiple of 8
  int64_t N = 0;
  int64_t num_groups = 0;  // G
  int64_t group_size = 0;  // used when g_idx is null; G == ceil(K / group_size)
};

// Checks sizes, strides and pointers (not the contents of g_idx).
Status int4_dequantize_check(const Int4DequantizeParams& p);

// CPU kernel. Also checks that every g_idx value lies in [0, G).
Status int4_dequantize_cpu(const Int4DequantizeParams& p, const CpuThreadPool* pool = nullptr);

// CUDA kernel, enqueued on `stream` (a cudaStream_t; null is the legacy default stream).
// Pointers are device pointers. A g_idx value outside [0, G) cannot be reported without a host
// sync, so the affected outputs are written as NaN. Returns kUnsupported in builds without CUDA.
Status int4_dequantize_cuda(const Int4DequantizeParams& p, void* stream);

}  // namespace bitpress
