// fp8_gemm (W8A8) and fp8_weight_gemm (W8A16): torch-free CPU API.
//
//   fp8_gemm         y[m, n] = sum_k (a[m, k] sa(m, k)) (b[n, k] sb(n, k)) + bias[n]
//   fp8_weight_gemm  y[m, n] = sum_k x[m, k] (w[n, k] sw(n, k)) + bias[n]
//
// a [M, K], b / w [N, K] E4M3 codes (row-major: b is a Linear's weight, K-major), x [M, K] in
// fp32 / fp16 / bf16; unit stride along K, row strides in elements. Scales float32 in one of the
// layouts below; every product is exact (E4M3 decodes exactly into bf16 and float32), the sums are
// float32; the scales multiply the float32 sums (per tensor / row: once after the K loop; per
// 128 x 128 block: after each 128-long K block).
#pragma once

#include <stdint.h>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/common/status.h"
#include "bitpress/cpu/gemm_microkernel.h"

namespace bitpress {

// The block of blockwise scales (DeepSeek-V3: 1 x 128 activations, 128 x 128 weights).
constexpr int64_t kFp8ScaleBlock = 128;

// Scale layouts of an operand with `rows` rows (M for a / x, N for b / w):
//   kTensor : scale[0];
//   kRow    : scale[r * row_stride] ([rows, 1]: per token / per channel);
//   kBlock  : a: scale[m * row_stride + k / 128] ([M, ceil(K/128)]);
//             b / w: scale[(n / 128) * row_stride + k / 128] ([ceil(N/128), ceil(K/128)]).
// fp8_gemm takes kTensor or kRow for each operand independently, or kBlock for both.
enum class Fp8ScaleLayout : int { kTensor = 0, kRow = 1, kBlock = 2 };

struct Fp8Scale {
  const float* data = nullptr;
  Fp8ScaleLayout layout = Fp8ScaleLayout::kTensor;
  int64_t row_stride = 0;
};

struct Fp8GemmParams {
  const uint8_t* a = nullptr;  // [M, K]
  int64_t lda = 0;
  const uint8_t* b = nullptr;  // [N, K]
  int64_t ldb = 0;
  Fp8Scale scale_a, scale_b;
  const void* bias = nullptr;  // [N] or null
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;  // [M, N]
  DType out_dtype = DType::kBFloat16;
  int64_t ldo = 0;
  int64_t M = 0, N = 0, K = 0;
};

struct Fp8WeightGemmParams {
  const void* x = nullptr;  // [M, K]
  DType x_dtype = DType::kBFloat16;
  int64_t ldx = 0;
  const uint8_t* w = nullptr;  // [N, K]
  int64_t ldw = 0;
  Fp8Scale w_scale;
  const void* bias = nullptr;  // [N] or null
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;  // [M, N], dtype x_dtype
  int64_t ldo = 0;
  int64_t M = 0, N = 0, K = 0;
};

Status fp8_gemm_check(const Fp8GemmParams& p);
Status fp8_weight_gemm_check(const Fp8WeightGemmParams& p);

// CPU kernels (run-time ISA: AMX / AVX512-BF16 / AVX2 microkernels, scalar fallback), split over
// `pool`; workspaces are per-thread buffers reused across calls.
Status fp8_gemm_cpu(const Fp8GemmParams& p, const CpuThreadPool* pool);
Status fp8_weight_gemm_cpu(const Fp8WeightGemmParams& p, const CpuThreadPool* pool);

// The paths of the CPU kernels, for tests and benchmarks (the functions above choose them from
// the active CPU ISA). kUnsupported when this CPU cannot run a requested variant.
struct Fp8CpuOptions {
  cpu::GemmKernel kernel = cpu::GemmKernel::kAvx512Bf16Emulated;  // the bf16 microkernel variant
  // E4M3 -> bf16 decode of the weight panels: kTable (256-entry table, any CPU), kAvx512
  // (AVX-512BW bit operations and a vpermw table of the subnormals, 32 codes per step),
  // kAvx512Vbmi (two vpermi2b byte tables, 64 codes per step).
  enum class Decode : int { kTable = 0, kAvx512 = 1, kAvx512Vbmi = 2 };
  Decode decode = Decode::kTable;
  // Rows (M) up to which fp8_weight_gemm runs its float32 dot-product path (E4M3 decoded to
  // float32 through F16C; AVX-512 or AVX2) instead of the microkernel; 0: never.
  int64_t dot_max_rows = 0;
  CpuIsa dot_isa = CpuIsa::kScalar;  // the dot-product path's ISA (kScalar, kAvx2, kAvx512)
  // At M = 1 on the AVX2 / AVX-512 dot-product path: weight rows read at once per thread
  // (1..4), each from its own run of rows, so that each thread keeps that many memory streams in
  // flight. 1: one row after the other.
  int dot_streams = 4;
  // With kAmx, kAvx512Vbmi decode, and at most 64 columns of xᵀ (M * terms), tensor / row scales:
  // the strip kernel (32 weight rows walk K once per 32 columns, C in the tile registers) instead
  // of the panel engine.
  bool strip = true;
  // K per decoded panel of the panel engine (rounded down to a multiple of 128, at least 128):
  // a longer K is walked in pieces, the float32 C blocks accumulating across them.
  int64_t panel_k = 4096;
};
// The options fp8_gemm_cpu / fp8_weight_gemm_cpu use on this CPU now (active_cpu_isa()).
Fp8CpuOptions fp8_cpu_default_options();
Status fp8_gemm_cpu_with(const Fp8GemmParams& p, const CpuThreadPool* pool,
                         const Fp8CpuOptions& options);
Status fp8_weight_gemm_cpu_with(const Fp8WeightGemmParams& p, const CpuThreadPool* pool,
                                const Fp8CpuOptions& options);

}  // namespace bitpress
