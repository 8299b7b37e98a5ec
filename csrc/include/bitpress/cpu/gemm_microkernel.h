// The shared CPU GEMM microkernel: C[m, n] (+)= sum_k A[m, k] B[k, n] on bf16 operands with
// float32 accumulation, for the CPU kernels that decode a weight panel (INT4 today; FP8 and 2:4
// next) and multiply a block of activation rows by it.
//
//   A  bf16 [M, K]         row m at a + m * lda (lda in bf16 elements, even: pairs are 4-byte
//                          aligned); the bits as uint16_t.
//   B  bf16 "VNNI pairs"   [K/2, N, 2]: pair p of column n, (B[2p, n], B[2p+1, n]), is the uint32
//                          b[p * ldb + n] with B[2p, n] in the low half. This is the layout both
//                          tdpbf16ps (AMX, a B tile row = one pair row) and vdpbf16ps (AVX512-BF16)
//                          consume, so a decoder writes it once for every variant.
//   C  float32 [M, N]      row m at c + m * ldc; accumulate: C += A B, else C = A B.
//
// Every product is an exact bf16 x bf16 product (8-bit significands: 16 bits, exact in float32);
// only the float32 sums round, and the variants differ in summation order only (see the bound in
// tests/cpp/test_gemm_microkernel.cpp). Inputs that are bf16 denormals count as zero and float32
// denormal results flush to zero on the AMX and AVX512-BF16 instructions (Intel SDM, TDPBF16PS and
// VDPBF16PS: DAZ, FTZ, round to nearest even regardless of MXCSR); the AVX2 variant follows MXCSR.
//
// Variants, chosen by the caller (gemm_bf16_kernel_for() picks from the active CPU ISA):
//   kAmx        tdpbf16ps. Tiles: A 16 rows x 32 bf16 (64 B), B 16 pair rows x 16 columns, C 16 x
//   16
//               float32; 2 x 2 C tiles (32 rows x 32 columns) per step over K in steps of 32, then
//               1 x 2 and narrower tails. Needs K % 32 == 0 and N % 16 == 0. The tile configuration
//               is per thread (ldtilecfg when this thread's current shape differs, see
//               gemm_amx_thread_begin() for code that shares the thread's tiles), and the Linux
//               permission for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM) is requested
//               once per process by cpu_features.cpp (amx_usable()).
//   kAvx512Bf16 vdpbf16ps: register blocks of up to 6 rows x 64 columns (24 zmm accumulators),
//               then 6 x 32 / 6 x 16 column tails. Needs K % 2 == 0, N % 16 == 0.
//   kAvx2       bf16 -> float32 by 16-bit shifts, FMA: blocks of up to 4 rows x 32 columns.
//               Needs K % 2 == 0, N % 16 == 0.
//   k*Emulated  the AMX / AVX512-BF16 variant's loop nest, tile shapes, configuration, index maps
//               and data layout, with scalar arithmetic in the instructions' order (tests on CPUs
//               without the feature; any x86-64 or other CPU).
//
// No allocation, no torch; one thread per call (callers split rows/columns over their pool).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "bitpress/common/status.h"

namespace bitpress {
namespace cpu {

enum class GemmKernel : int {
  kAmx = 0,
  kAvx512Bf16 = 1,
  kAvx2 = 2,
  kAmxEmulated = 3,
  kAvx512Bf16Emulated = 4,
};

const char* gemm_kernel_name(GemmKernel k);

struct GemmBf16Args {
  const uint16_t* a = nullptr;  // [M, K] bf16, row stride lda elements (even)
  int64_t lda = 0;
  const uint32_t* b = nullptr;  // [K/2, ldb] bf16 pairs, columns [0, N) used
  int64_t ldb = 0;
  float* c = nullptr;  // [M, ldc] float32
  int64_t ldc = 0;
  int64_t M = 0, N = 0, K = 0;
  bool accumulate = true;  // C += A B; false: C = A B (C is not read)
};

// True when this CPU (and OS) can run the variant here and now; the emulations always can.
bool gemm_kernel_available(GemmKernel k);

// The fastest real variant for the active CPU ISA (active_cpu_isa(): kAmx -> kAmx, kAvx512 with
// AVX512_BF16 -> kAvx512Bf16, kAvx2 -> kAvx2); kUnsupported status from gemm_bf16 below kAvx2.
GemmKernel gemm_bf16_kernel_for_active_isa();

// The shape rules of the variant (K, N multiples, lda even, pointers, strides).
Status gemm_bf16_check(GemmKernel k, const GemmBf16Args& args);

// C (+)= A B with variant k. kInvalidArgument when a shape rule fails; kUnsupported when this CPU
// cannot run k.
Status gemm_bf16(GemmKernel k, const GemmBf16Args& args);

// The variants themselves (no checks; gemm_bf16 dispatches to them). gemm_bf16_amx trusts the
// thread's cached tile configuration: call gemm_amx_thread_begin() first on each thread, after any
// other code may have run there.
void gemm_bf16_amx(const GemmBf16Args& args);
void gemm_bf16_amx_emulated(const GemmBf16Args& args);
void gemm_bf16_avx512(const GemmBf16Args& args);
void gemm_bf16_avx512_emulated(const GemmBf16Args& args);
void gemm_bf16_avx2(const GemmBf16Args& args);

// Forgets this thread's cached tile configuration, so that the next kAmx call loads its own. Other
// code on the thread (oneDNN's AMX kernels behind F.linear, another library) configures and
// releases the tiles too: after a foreign tilerelease a tile load raises #UD (SIGILL), after a
// foreign ldtilecfg the shapes are wrong. gemm_bf16() calls it on every kAmx call; loops that call
// gemm_bf16_amx() directly call it once per thread before their first call (per task or pool body).
void gemm_amx_thread_begin();

// Releases this thread's AMX tile state (tilerelease) so that the kernel's next call configures
// again; threads that used kAmx may call it before going idle for long (the tile data state
// otherwise stays in use for context switches). Harmless without AMX.
void gemm_amx_release_thread();

}  // namespace cpu
}  // namespace bitpress
