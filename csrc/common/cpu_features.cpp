// CPU feature detection and the process-wide ISA choice of the CPU kernels.
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <mutex>

#include "bitpress/common/cpu.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
    case CpuIsa::kAmx:
      return supports(f, CpuIsa::kAvx512) && f.avx512_bf16 && amx_usable();
  }
  return false;
}

// Linux keeps the 8 KiB AMX tile data state out of a process's signal frames and context switches
// until the process asks for it (Documentation/arch/x86/xstate.rst); a tile instruction without the
// permission faults (SIGILL).
bool request_amx_permission() {
#if defined(BITPRESS_X86) && defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long mask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &mask) != 0) return false;
  return mask & (1ul << kXfeatureXtiledata);
#else
  return false;
#endif
}

CpuIsa detected_best() {
  const CpuFeatures& f = cpu_features();
  if (supports(f, CpuIsa::kAmx)) return CpuIsa::kAmx;
  if (supports(f, CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (supports(f, CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
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
    case CpuIsa::kAmx:
      return "amx";
  }
  return "unknown";
}

bool cpu_isa_from_name(const char* name, CpuIsa* isa) {
  if (!name) return false;
  for (int i = 0; i <= int(CpuIsa::kAmx); ++i) {
    if (strcmp(name, cpu_isa_name(CpuIsa(i))) == 0) {
      *isa = CpuIsa(i);
      return true;
    }
  }
  return false;
}

bool amx_usable() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] {
    const CpuFeatures& f = cpu_features();
    ok = f.amx_tile && f.amx_bf16 && request_amx_permission();
  });
  return ok;
}

CpuIsa best_cpu_isa() {
  static const CpuIsa best = [] {
    CpuIsa b = detected_best();
    CpuIsa cap;
    if (cpu_isa_from_name(getenv("BITPRESS_CPU_ISA"), &cap) && int(cap) < int(b)) b = cap;
    return b;
  }();
  return best;
}

CpuIsa active_cpu_isa() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced < 0 ? best_cpu_isa() : CpuIsa(forced);
}

Status set_cpu_isa(CpuIsa isa) {
  if (int(isa) < 0 || int(isa) > int(best_cpu_isa()) || !supports(cpu_features(), isa)) {
    return Status::kInvalidArgument;
  }
  g_forced.store(int(isa), std::memory_order_relaxed);
  return Status::kSuccess;
}

void reset_cpu_isa() { g_forced.store(-1, std::memory_order_relaxed); }

}  // namespace bitpress
