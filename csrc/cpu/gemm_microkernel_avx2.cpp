// AVX2/FMA variant of the CPU GEMM microkernel (bitpress/cpu/gemm_microkernel.h): bf16 -> float32
// by 16-bit shifts (a bf16 is the upper half of its float32), then FMA. A pair word (lo, hi) gives
// lo << 16 and hi & 0xffff0000; the odd product is added before the even one, as vdpbf16ps does.
//
// Register block: up to 4 rows x 16 columns (8 ymm accumulators, 4 for the unpacked B pairs, 2 for
// the A pair): 16 ymm registers.
#include <string.h>

#include "bitpress/cpu/gemm_microkernel.h"
#include "common/isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress {
namespace cpu {
namespace {

#if defined(__x86_64__)
template <int MB>
BITPRESS_TARGET_AVX2 void block(const GemmBf16Args& g, int64_t m0, int64_t n0) {
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) {
    for (int v = 0; v < 2; ++v) {
      acc[m][v] =
          g.accumulate ? _mm256_loadu_ps(g.c + (m0 + m) * g.ldc + n0 + 8 * v) : _mm256_setzero_ps();
    }
  }
  const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
  const uint16_t* a = g.a + m0 * g.lda;
  const uint32_t* b = g.b + n0;
  for (int64_t k = 0; k < g.K / 2; ++k) {
    __m256 blo[2], bhi[2];
    for (int v = 0; v < 2; ++v) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k * g.ldb + 8 * v));
      blo[v] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
      bhi[v] = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      uint32_t pair;
      memcpy(&pair, a + m * g.lda + 2 * k, 4);
      uint32_t lo = pair << 16, hi = pair & 0xffff0000u;
      float flo, fhi;
      memcpy(&flo, &lo, 4);
      memcpy(&fhi, &hi, 4);
      const __m256 alo = _mm256_set1_ps(flo), ahi = _mm256_set1_ps(fhi);
      for (int v = 0; v < 2; ++v) {
        acc[m][v] = _mm256_fmadd_ps(ahi, bhi[v], acc[m][v]);
        acc[m][v] = _mm256_fmadd_ps(alo, blo[v], acc[m][v]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(g.c + (m0 + m) * g.ldc + n0 + 8 * v, acc[m][v]);
  }
}
#endif

}  // namespace

void gemm_bf16_avx2(const GemmBf16Args& args) {
#if defined(__x86_64__)
  using Fn = void (*)(const GemmBf16Args&, int64_t, int64_t);
  constexpr Fn fns[5] = {nullptr, block<1>, block<2>, block<3>, block<4>};
  for (int64_t n0 = 0; n0 < args.N; n0 += 16) {
    for (int64_t m0 = 0; m0 < args.M; m0 += 4) {
      const int64_t mb = args.M - m0 < 4 ? args.M - m0 : 4;
      fns[mb](args, m0, n0);
    }
  }
#else
  (void)args;
#endif
}

}  // namespace cpu
}  // namespace bitpress
