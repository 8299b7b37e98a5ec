// CPU feature detection, the run-time ISA choice, and the thread-pool hook of the CPU kernels.
#pragma once

#include <stdint.h>

#include "bitpress/common/status.h"

namespace bitpress {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, avx512_fp16 = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
};

// Detected once (cpuid + xgetbv: a feature counts only if the OS saves its registers).
const CpuFeatures& cpu_features();

// Instruction-set paths of the CPU kernels, in increasing order.
//   kScalar : portable C++ (compiler auto-vectorization only)
//   kAvx2   : AVX2 + FMA + F16C
//   kAvx512 : AVX-512 F/BW/VL/DQ (+ VNNI/BF16 where a kernel uses them, checked per kernel)
//   kAmx    : kAvx512 + AVX512_BF16 + AMX-TILE/AMX-BF16, with the Linux permission for the tile
//             data state granted (amx_usable()): the bf16 GEMMs run on tdpbf16ps tiles
//             (bitpress/cpu/gemm_microkernel.h); everything else runs its kAvx512 code.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

const char* cpu_isa_name(CpuIsa isa);  // "scalar", "avx2", "avx512", "amx"
// Parses a name of cpu_isa_name; false if unknown.
bool cpu_isa_from_name(const char* name, CpuIsa* isa);
// The best path this CPU supports, capped by the environment variable BITPRESS_CPU_ISA (a name
// above; read once per process, as oneDNN reads ONEDNN_MAX_CPU_ISA): BITPRESS_CPU_ISA=avx512 on an
// AMX machine runs the AVX512-BF16 kernels everywhere. An unknown name is ignored.
CpuIsa best_cpu_isa();
CpuIsa active_cpu_isa();  // the path kernels use now: best, unless forced lower
// Force a path (tests, benchmarks). kInvalidArgument if it is above best_cpu_isa().
Status set_cpu_isa(CpuIsa isa);

// AMX tiles usable by this process: the CPU has AMX-TILE and AMX-BF16, the OS enables the tile
// state (XCR0), and Linux granted the permission (arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA), requested once per process on the first call). False elsewhere.
bool amx_usable();
// Undo set_cpu_isa.
void reset_cpu_isa();

// Kernels split work with this hook, so that a host runtime can lend its own thread pool
// (the torch extension passes at::parallel_for). A null pool, or a null function, runs serially.
using ParallelBody = void (*)(void* body_ctx, int64_t begin, int64_t end);
struct CpuThreadPool {
  void (*parallel_for)(void* pool_ctx, int64_t begin, int64_t end, int64_t grain, ParallelBody body,
                       void* body_ctx) = nullptr;
  void* pool_ctx = nullptr;
};

inline void parallel_for(const CpuThreadPool* pool, int64_t begin, int64_t end, int64_t grain,
                         ParallelBody body, void* body_ctx) {
  if (begin >= end) return;
  if (pool && pool->parallel_for) {
    pool->parallel_for(pool->pool_ctx, begin, end, grain, body, body_ctx);
  } else {
    body(body_ctx, begin, end);
  }
}

// Convenience for lambdas: parallel_for(pool, 0, n, grain, [&](int64_t b, int64_t e) {...}).
template <typename F>
void parallel_for(const CpuThreadPool* pool, int64_t begin, int64_t end, int64_t grain, F&& f) {
  parallel_for(
      pool, begin, end, grain,
      [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace bitpress
