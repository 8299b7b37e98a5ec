// Dispatch and shape checks of the CPU GEMM microkernel (bitpress/cpu/gemm_microkernel.h); the
// variants are in gemm_microkernel_{amx,avx512,avx2}.cpp.
#include "bitpress/cpu/gemm_microkernel.h"

#include "bitpress/common/cpu.h"

namespace bitpress {
namespace cpu {

const char* gemm_kernel_name(GemmKernel k) {
  switch (k) {
    case GemmKernel::kAmx:
      return "amx";
    case GemmKernel::kAvx512Bf16:
      return "avx512_bf16";
    case GemmKernel::kAvx2:
      return "avx2";
    case GemmKernel::kAmxEmulated:
      return "amx_emulated";
    case GemmKernel::kAvx512Bf16Emulated:
      return "avx512_bf16_emulated";
  }
  return "unknown";
}

bool gemm_kernel_available(GemmKernel k) {
  const CpuFeatures& f = cpu_features();
  switch (k) {
    case GemmKernel::kAmx:
      return amx_usable();
    case GemmKernel::kAvx512Bf16:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_bf16 && f.avx2 &&
             f.fma && f.f16c;
    case GemmKernel::kAvx2:
      return f.avx2 && f.fma && f.f16c;
    case GemmKernel::kAmxEmulated:
    case GemmKernel::kAvx512Bf16Emulated:
      return true;
  }
  return false;
}

GemmKernel gemm_bf16_kernel_for_active_isa() {
  const CpuIsa isa = active_cpu_isa();
  if (isa == CpuIsa::kAmx) return GemmKernel::kAmx;
  if (isa == CpuIsa::kAvx512 && cpu_features().avx512_bf16) return GemmKernel::kAvx512Bf16;
  return GemmKernel::kAvx2;
}

Status gemm_bf16_check(GemmKernel k, const GemmBf16Args& g) {
  if (g.M < 0 || g.N < 0 || g.K < 0 || g.K % 2 || g.N % 16) return Status::kInvalidArgument;
  const bool amx = k == GemmKernel::kAmx || k == GemmKernel::kAmxEmulated;
  if (amx && g.K % 32) return Status::kInvalidArgument;
  if (g.M == 0 || g.N == 0) return Status::kSuccess;
  if (!g.c || g.ldc < g.N) return Status::kInvalidArgument;
  if (g.K > 0 && (!g.a || !g.b || g.lda < g.K || g.lda % 2 || g.ldb < g.N)) {
    return Status::kInvalidArgument;
  }
  // A tile row stride is at most 2^31 bytes (tileloadd's 32-bit scaled index): far beyond use.
  return Status::kSuccess;
}

Status gemm_bf16(GemmKernel k, const GemmBf16Args& g) {
  const Status st = gemm_bf16_check(k, g);
  if (st != Status::kSuccess) return st;
  if (!gemm_kernel_available(k)) return Status::kUnsupported;
  if (g.M == 0 || g.N == 0) return Status::kSuccess;
  if (g.K == 0) {
    if (!g.accumulate) {
      for (int64_t m = 0; m < g.M; ++m)
        for (int64_t n = 0; n < g.N; ++n) g.c[m * g.ldc + n] = 0.f;
    }
    return Status::kSuccess;
  }
  switch (k) {
    case GemmKernel::kAmx:
      gemm_amx_thread_begin();
      gemm_bf16_amx(g);
      break;
    case GemmKernel::kAvx512Bf16:
      gemm_bf16_avx512(g);
      break;
    case GemmKernel::kAvx2:
      gemm_bf16_avx2(g);
      break;
    case GemmKernel::kAmxEmulated:
      gemm_amx_thread_begin();
      gemm_bf16_amx_emulated(g);
      break;
    case GemmKernel::kAvx512Bf16Emulated:
      gemm_bf16_avx512_emulated(g);
      break;
  }
  return Status::kSuccess;
}

}  // namespace cpu
}  // namespace bitpress
