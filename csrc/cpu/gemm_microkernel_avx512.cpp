// AVX512-BF16 variant of the CPU GEMM microkernel (bitpress/cpu/gemm_microkernel.h) and its host
// emulation.
//
// Register block: up to 6 rows x 64 columns = 24 zmm accumulators; per pair row k, 4 loads of B
// (64 columns of bf16 pairs), one broadcast of each row's A pair and 24 vdpbf16ps: the mix that
// keeps vdpbf16ps at its issue rate (2 per cycle on Zen 5, 1 on Sapphire Rapids) with latency
// hidden by 24 independent chains. Columns in passes of 64, then a 32- and a 16-column tail; rows
// in blocks of equal size (16 rows: 6 + 5 + 5), so that no block has few accumulators.
#include <string.h>

#include "bitpress/cpu/gemm_microkernel.h"
#include "common/isa.h"
#include "cpu/bf16_emulation.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress {
namespace cpu {
namespace {

constexpr int kRows = 6;

// Rows [r0, r1) of block b of nb (the same split for the real variant and the emulation).
inline void row_block(int64_t M, int64_t b, int64_t nb, int64_t* r0, int64_t* r1) {
  *r0 = M * b / nb;
  *r1 = M * (b + 1) / nb;
}

#if defined(__x86_64__)
template <int MB, int V>
BITPRESS_TARGET_AVX512BF16 void block(const GemmBf16Args& g, int64_t m0, int64_t n0) {
  __m512 acc[MB][V];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      acc[m][v] = g.accumulate ? _mm512_loadu_ps(g.c + (m0 + m) * g.ldc + n0 + 16 * v)
                               : _mm512_setzero_ps();
    }
  }
  const uint16_t* a = g.a + m0 * g.lda;
  const uint32_t* b = g.b + n0;
  for (int64_t k = 0; k < g.K / 2; ++k) {
    __m512i bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_si512(b + k * g.ldb + 16 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      uint32_t pair;
      memcpy(&pair, a + m * g.lda + 2 * k, 4);
      const __m512i av = _mm512_set1_epi32(int(pair));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)bv[v], (__m512bh)av);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(g.c + (m0 + m) * g.ldc + n0 + 16 * v, acc[m][v]);
  }
}

using BlockFn = void (*)(const GemmBf16Args&, int64_t, int64_t);

template <int V>
BlockFn block_fn(int64_t mb) {
  switch (mb) {
    case 1:
      return block<1, V>;
    case 2:
      return block<2, V>;
    case 3:
      return block<3, V>;
    case 4:
      return block<4, V>;
    case 5:
      return block<5, V>;
    default:
      return block<6, V>;
  }
}
#endif

// One vdpbf16ps lane: VDPBF16PS adds the odd products first, then the even ones (Intel SDM:
// srcdest += src1.bf16[2j+1] * src2.bf16[1]; srcdest += src1.bf16[2j] * src2.bf16[0]), each
// addition rounded to nearest even, FTZ, with DAZ inputs.
inline float dpbf16_lane(float acc, uint32_t bp, uint32_t ap) {
  acc = ftz(acc + bf16_daz(uint16_t(bp >> 16)) * bf16_daz(uint16_t(ap >> 16)));
  return ftz(acc + bf16_daz(uint16_t(bp)) * bf16_daz(uint16_t(ap)));
}

// The emulation's register block: the same index maps as block<MB, V>, lanes as scalars.
void block_emulated(const GemmBf16Args& g, int64_t m0, int mb, int64_t n0, int V) {
  float acc[kRows][4][16];
  for (int m = 0; m < mb; ++m)
    for (int v = 0; v < V; ++v)
      for (int l = 0; l < 16; ++l)
        acc[m][v][l] = g.accumulate ? g.c[(m0 + m) * g.ldc + n0 + 16 * v + l] : 0.f;
  const uint16_t* a = g.a + m0 * g.lda;
  const uint32_t* b = g.b + n0;
  for (int64_t k = 0; k < g.K / 2; ++k) {
    for (int m = 0; m < mb; ++m) {
      uint32_t pair;
      memcpy(&pair, a + m * g.lda + 2 * k, 4);
      for (int v = 0; v < V; ++v)
        for (int l = 0; l < 16; ++l)
          acc[m][v][l] = dpbf16_lane(acc[m][v][l], b[k * g.ldb + 16 * v + l], pair);
    }
  }
  for (int m = 0; m < mb; ++m)
    for (int v = 0; v < V; ++v)
      for (int l = 0; l < 16; ++l) g.c[(m0 + m) * g.ldc + n0 + 16 * v + l] = acc[m][v][l];
}

template <class F>
inline void walk(const GemmBf16Args& g, F&& f) {
  const int64_t nb = (g.M + kRows - 1) / kRows;
  for (int64_t n0 = 0; n0 < g.N;) {
    const int V = g.N - n0 >= 64 ? 4 : g.N - n0 >= 32 ? 2 : 1;
    for (int64_t bi = 0; bi < nb; ++bi) {
      int64_t r0, r1;
      row_block(g.M, bi, nb, &r0, &r1);
      f(r0, int(r1 - r0), n0, V);
    }
    n0 += 16 * V;
  }
}

}  // namespace

void gemm_bf16_avx512(const GemmBf16Args& args) {
#if defined(__x86_64__)
  walk(args, [&](int64_t m0, int mb, int64_t n0, int V) {
    const BlockFn fn = V == 4 ? block_fn<4>(mb) : V == 2 ? block_fn<2>(mb) : block_fn<1>(mb);
    fn(args, m0, n0);
  });
#else
  (void)args;
#endif
}

void gemm_bf16_avx512_emulated(const GemmBf16Args& args) {
  walk(args, [&](int64_t m0, int mb, int64_t n0, int V) { block_emulated(args, m0, mb, n0, V); });
}

}  // namespace cpu
}  // namespace bitpress
