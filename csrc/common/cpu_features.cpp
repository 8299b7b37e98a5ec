// CPU feature detection and the process-wide ISA choice of the CPU kernels.
#include <atomic>

#include "bitpress/common/cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define BITPRESS_X86 1
#endif

namespace bitpress {
namespace {

#if defined(BITPRESS_X86)
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(BITPRESS_X86)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = xgetbv0();
  // The OS must save the vector state: XMM|YMM for AVX, plus opmask|ZMM_Hi256|Hi16_ZMM for
  // AVX-512, plus XTILECFG|XTILEDATA for AMX.
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  if (!os_avx) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = b & (1u << 5);
  f.fma = fma;
  f.f16c = f16c;
  if (os_avx512) {
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512_vnni = c & (1u << 11);
    f.avx512_fp16 = d & (1u << 23);
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    f.avx512_bf16 = a1 & (1u << 5);
  }
  if (os_amx) {
    f.amx_bf16 = d & (1u << 22);
    f.amx_tile = d & (1u << 24);
    f.amx_int8 = d & (1u << 25);
  }
#endif
  return f;
}

bool supports(const CpuFeatures& f, CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar:
      return true;
    case CpuIsa::kAvx2:
      return f.avx2 && f.fma && f.f16c;
    case CpuIsa::kAvx512:
      return f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  }
  return false;
}

std::atomic<int> g_forced{-1};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar:
      return "scalar";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

CpuIsa best_cpu_isa() {
  static const CpuIsa best = [] {
    const CpuFeatures& f = cpu_features();
    if (supports(f, CpuIsa::kAvx512)) return CpuIsa::kAvx512;
    if (supports(f, CpuIsa::kAvx2)) return CpuIsa::kAvx2;
    return CpuIsa::kScalar;
  }();
  return best;
}

CpuIsa active_cpu_isa() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced < 0 ? best_cpu_isa() : CpuIsa(forced);
}

Status set_cpu_isa(CpuIsa isa) {
  if (int(isa) < 0 || int(isa) > int(CpuIsa::kAvx512) || !supports(cpu_features(), isa)) {
    return Status::kInvalidArgument;
  }
  g_forced.store(int(isa), std::memory_order_relaxed);
  return Status::kSuccess;
}

void reset_cpu_isa() { g_forced.store(-1, std::memory_order_relaxed); }

}  // namespace bitpress
