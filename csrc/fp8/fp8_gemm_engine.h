// The GEMM engine shared by the CPU kernels of fp8_gemm and fp8_weight_gemm (private).
//
// Both compute y[m, n] = sum_k x[m, k] W[n, k] with W [N, K] in E4M3 codes, as the transposed
// product  yᵀ [N, M] = W [N, K] · xᵀ [K, M]  on the shared bf16 microkernel:
//   * its A operand ([rows, K] bf16, row-major) is a panel of W decoded row by row: E4M3 ->
//     bf16 is elementwise and exact, the weight is already K-major, so the decode needs no
//     transpose (the microkernel's B layout, VNNI pairs along K, would need one per 16 x 16 block);
//   * its B operand (VNNI pairs [K/2, columns]) is xᵀ, built once per call from the activations
//     (M x K values, small next to the weight): column j of pair row p holds (x[m, 2p],
//     x[m, 2p+1]) as bf16 for m = j / terms. Activations that are not bf16 (fp16, float32) are
//     split into `terms` exact bf16 parts, x = hi + mid + lo, one column each: the products stay
//     exact and the engine sums the columns of a row (see fp8_weight_gemm_cpu.cpp).
// Per task (NT rows of W): decode the panel [NT, Kp] once (1 byte per weight read, streaming in
// memory order, prefetched), then per chunk of columns call the microkernel into a float32 yᵀ
// block and apply the scales: per tensor / row / channel once after the whole K; per 128 x 128
// block after each 128-long K step (the block's product summed alone, accumulate = false, then
// added with its scale in float32), as the scales change along K. With AMX and at most 64 columns
// of xᵀ (decode-sized M), tensor / row scales, a strip kernel replaces the panels: 32 rows of W
// walk K once per 32 columns, decoded 64 codes per row at a time into L1 and multiplied at once,
// the C tiles held in the tile registers over K (fp8_gemm_cpu.cpp).
#pragma once

#include <stdint.h>

#include "bitpress/cpu/gemm_microkernel.h"
#include "bitpress/fp8/fp8_gemm.h"

namespace bitpress::fp8_cpu {

struct EngineArgs {
  const uint32_t* xp = nullptr;  // [Kp/2, ldx] bf16 pairs: column m * terms + t
  int64_t ldx = 0;               // columns of xp: M * terms rounded up to 16
  int terms = 1;
  const uint8_t* w = nullptr;  // [N, K] E4M3
  int64_t ldw = 0;
  Fp8Scale w_scale;  // rows of W: kTensor, kRow (per n), kBlock ([ceil(N/128), ceil(K/128)])
  Fp8Scale x_scale;  // rows of x (W8A8's a): data null (none), kTensor, kRow, kBlock [M, Kb]
  const void* bias = nullptr;
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;  // [M, ldo]
  DType out_dtype = DType::kFloat32;
  int64_t ldo = 0;
  int64_t M = 0, N = 0, K = 0;
  int64_t Kp = 0;  // K rounded up to 32 (the AMX k-step); xp has Kp/2 pair rows (zero past K)
};

// Runs the engine with `options.kernel` and `options.decode`.
Status run_engine(const EngineArgs& e, const CpuThreadPool* pool, const Fp8CpuOptions& options);

// E4M3 codes -> bf16 bits, n of them (exact; NaN codes -> NaN). `next`: the n codes decoded next
// (prefetched meanwhile, AVX512-VBMI decode), or null: the codes ahead of src in memory.
void decode_bf16(const uint8_t* src, uint16_t* dst, int64_t n, Fp8CpuOptions::Decode decode,
                 const uint8_t* next = nullptr);

// The pair-row count and column count of xp for M rows, `terms` parts, K.
inline int64_t engine_kp(int64_t K) { return (K + 31) / 32 * 32; }
// (A row stride that is a multiple of 512 bytes gets 16 more columns: the microkernel reads 16
// pair rows of a column block at once, which would otherwise share a few L1 sets.)
inline int64_t engine_ldx(int64_t M, int terms) {
  const int64_t ldx = (M * terms + 15) / 16 * 16;
  return ldx % 128 == 0 ? ldx + 16 : ldx;
}

bool decode_available(Fp8CpuOptions::Decode decode);

}  // namespace bitpress::fp8_cpu
