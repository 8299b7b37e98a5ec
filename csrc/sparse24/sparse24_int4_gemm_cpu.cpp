// sparse24_int4_gemm on the CPU (ROW layout): y = x Wᵀ + bias with W = (q - z) * s at the kept
// positions of (qvalues [N, K/16], meta [N, K/8]) (bitpress/sparse24/sparse24_cpu.h).
//
// One path, a read stream (0.375 bytes per dense weight: 4-bit codes plus 2-bit positions): each
// thread takes whole weight rows. bf16 x on AVX512-BF16 with group_size % 64 == 0: vdpbf16ps on
// (128 + q) pairs, (q - 8) when symmetric (block_bf16 below). Otherwise per step the codes and
// positions of 16 values (AVX-512: 32 dense columns, one vpermt2ps gathers their x from two
// registers) or 8 values (AVX2: vpermps from two registers and a blend) are decoded once,
// dequantized in float32 ((q - z) * s, the group's scale and zero broadcast; per lane when a step
// straddles groups) and multiplied into every row of x. x is widened to float32 once per call.
// Large M is the caller's: the torch glue dequantizes the weight once
// (sparse24_int4_dequantize_cpu) and calls the dense GEMM.
#include <string.h>

#include <algorithm>
#include <atomic>
#include <utility>

#include "bitpress/common/dtype.h"
#include "bitpress/sparse24/sparse24.h"
#include "bitpress/sparse24/sparse24_cpu.h"
#include "common/isa.h"
#include "common/thread_buffer.h"
#include "sparse24/sparse24_cpu_common.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress {
namespace {

using sparse24_detail::meta_rows_ok;
using sparse24_detail::store_row_value;

thread_local ThreadBuffer t_x;    // the calling thread: x widened to float32 [M, K]
thread_local ThreadBuffer t_row;  // a pool thread: one row's scales, zeros and accumulators

constexpr int kRowBlock = 8;  // rows of x per register block
// Software prefetch distance of the weight streams (one 4 KiB page ahead).
constexpr int64_t kPrefetchBytes = 4096;

// Scale and zero of every group of weight row n, as float32 (scales / zeros are [G, N]).
// Inlined into the kernels that call it: compiled for their ISA (a call from AVX-512 code to
// SSE code with the upper register halves in use costs a transition on every instruction).
inline __attribute__((always_inline)) void row_groups(const Sparse24Int4GemmParams& p, int64_t n,
                                                      float* s, float* z) {
  if (p.scales_dtype == DType::kBFloat16) {  // the common case, without a switch per element
    const uint16_t* sp = static_cast<const uint16_t*>(p.scales) + n;
    for (int64_t g = 0; g < p.G; ++g) s[g] = bf16_bits_to_float(sp[g * p.N]);
  } else {
    for (int64_t g = 0; g < p.G; ++g) s[g] = load_as_float(p.scales, p.scales_dtype, g * p.N + n);
  }
  for (int64_t g = 0; g < p.G; ++g) {
    z[g] = p.zeros ? load_as_float(p.zeros, p.zeros_dtype, g * p.N + n) : 8.f;
  }
}

inline __attribute__((always_inline)) void prefetch_groups(const Sparse24Int4GemmParams& p,
                                                           int64_t n) {
  const int64_t es = dtype_size(p.scales_dtype);
  const char* sb = static_cast<const char*>(p.scales) + n * es;
  for (int64_t g = 0; g < p.G; ++g) __builtin_prefetch(sb + g * p.N * es, 0, 2);
  if (p.zeros) {
    const int64_t ez = dtype_size(p.zeros_dtype);
    const char* zb = static_cast<const char*>(p.zeros) + n * ez;
    for (int64_t g = 0; g < p.G; ++g) __builtin_prefetch(zb + g * p.N * ez, 0, 2);
  }
}

inline float weight(const Sparse24Int4GemmParams& p, const int32_t* q, const uint8_t* meta,
                    const float* s, const float* z, int64_t j, int64_t* col) {
  *col = sparse24_value_col(meta, j);
  const int64_t g = *col / p.group_size;
  return (float(sparse24_int4_code(q, j)) - z[g]) * s[g];
}

// Values [j0, K/2) of row n into acc[m] for every row of x, in C++.
void tail_scalar(const Sparse24Int4GemmParams& p, const float* xf, int64_t n, const float* s,
                 const float* z, int64_t j0, int64_t m0, int64_t m1, float* acc) {
  const int32_t* q = p.qvalues + n * (p.K / 16);
  const uint8_t* meta = p.meta + n * (p.K / 8);
  for (int64_t j = j0; j < p.K / 2; ++j) {
    int64_t col;
    const float w = weight(p, q, meta, s, z, j, &col);
    for (int64_t m = m0; m < m1; ++m) acc[m] += xf[m * p.K + col] * w;
  }
}

#if defined(__x86_64__)

template <int MB>
BITPRESS_TARGET_AVX512 void block_avx512(const Sparse24Int4GemmParams& p, const float* xf,
                                         int64_t n, const float* s, const float* z, int64_t m0,
                                         float* acc) {
  const int64_t K = p.K;
  const int32_t* q = p.qvalues + n * (K / 16);
  const uint8_t* meta = p.meta + n * (K / 8);
  const __m512i mshift =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i qsel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i qshift =
      _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i blk = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const bool whole = p.group_size % 32 == 0;
  __m512 a[MB];
  for (int i = 0; i < MB; ++i) a[i] = _mm512_setzero_ps();
  const int64_t steps = K / 32;
  for (int64_t st = 0; st < steps; ++st) {
    uint32_t mw;
    memcpy(&mw, meta + 4 * st, 4);
    __m512i idx = _mm512_srlv_epi32(_mm512_set1_epi32(int(mw)), mshift);
    idx = _mm512_add_epi32(_mm512_and_si512(idx, _mm512_set1_epi32(3)), base);
    const __m128i qw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 2 * st));
    __m512i qi = _mm512_permutexvar_epi32(qsel, _mm512_castsi128_si512(qw));
    qi = _mm512_and_si512(_mm512_srlv_epi32(qi, qshift), _mm512_set1_epi32(15));
    __m512 sv, zv;
    if (whole) {
      const int64_t g = 32 * st / p.group_size;
      sv = _mm512_set1_ps(s[g]);
      zv = _mm512_set1_ps(z[g]);
    } else {
      // Lane j lies in the 8-column block j / 4 of the step; each block is in one group.
      int64_t g[4];
      for (int b = 0; b < 4; ++b) g[b] = (32 * st + 8 * b) / p.group_size;
      sv = _mm512_permutexvar_ps(
          blk, _mm512_castps128_ps512(_mm_setr_ps(s[g[0]], s[g[1]], s[g[2]], s[g[3]])));
      zv = _mm512_permutexvar_ps(
          blk, _mm512_castps128_ps512(_mm_setr_ps(z[g[0]], z[g[1]], z[g[2]], z[g[3]])));
    }
    const __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(qi), zv), sv);
    for (int i = 0; i < MB; ++i) {
      const float* xr = xf + (m0 + i) * K + 32 * st;
      const __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(xr), idx, _mm512_loadu_ps(xr + 16));
      a[i] = _mm512_fmadd_ps(xs, w, a[i]);
    }
  }
  for (int i = 0; i < MB; ++i) acc[m0 + i] = _mm512_reduce_add_ps(a[i]);
  tail_scalar(p, xf, n, s, z, steps * 16, m0, m0 + MB, acc);
}

template <int MB>
BITPRESS_TARGET_AVX2 void block_avx2(const Sparse24Int4GemmParams& p, const float* xf, int64_t n,
                                     const float* s, const float* z, int64_t m0, float* acc) {
  const int64_t K = p.K;
  const int32_t* q = p.qvalues + n * (K / 16);
  const uint8_t* meta = p.meta + n * (K / 8);
  const __m256i mshift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i qshift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  __m256 a[MB];
  for (int i = 0; i < MB; ++i) a[i] = _mm256_setzero_ps();
  const int64_t steps = K / 16;
  for (int64_t st = 0; st < steps; ++st) {
    uint16_t mw;
    memcpy(&mw, meta + 2 * st, 2);
    __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(mw), mshift);
    idx = _mm256_add_epi32(_mm256_and_si256(idx, _mm256_set1_epi32(3)), base);
    const __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    __m256i qi = _mm256_srlv_epi32(_mm256_set1_epi32(q[st]), qshift);
    qi = _mm256_and_si256(qi, _mm256_set1_epi32(15));
    // Lanes 0..3 lie in columns 16 st .. 16 st + 7, lanes 4..7 in the next 8: one group each.
    const int64_t g0 = 16 * st / p.group_size, g1 = (16 * st + 8) / p.group_size;
    const __m256 sv = _mm256_setr_m128(_mm_set1_ps(s[g0]), _mm_set1_ps(s[g1]));
    const __m256 zv = _mm256_setr_m128(_mm_set1_ps(z[g0]), _mm_set1_ps(z[g1]));
    const __m256 w = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(qi), zv), sv);
    for (int i = 0; i < MB; ++i) {
      const float* xr = xf + (m0 + i) * K + 16 * st;
      const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr), idx);
      const __m256 up = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8), idx);
      a[i] = _mm256_fmadd_ps(_mm256_blendv_ps(lo, up, hi), w, a[i]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a[i]), _mm256_extractf128_ps(a[i], 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    acc[m0 + i] = _mm_cvtss_f32(r);
  }
}

// bf16 x on AVX512-BF16, group_size % 64 == 0: 32 values (64 dense columns) per step. The x pair
// of each group is gathered by vpermt2w (as in sparse24_gemm); the codes become the bf16 pairs
// (128 + q) (exact: bf16 0x4300 | q), and two vdpbf16ps per row sum x (128 + q) and x over the
// group, exact products in float32; at the end of each group
//   y += s (sum x (128 + q) - (128 + z) sum x).
// kSym (zeros None, z = 8): the codes become the bf16 pairs (q - 8) (exact; a 16-entry vpermw
// table) and one vdpbf16ps per row sums x (q - 8) over the group: y += s sum x (q - 8).
//
// A full step decodes its 32 values in a permuted order: word p of the registers holds value
// perm(p) = 8 (p % 4) + p / 4 of the step, alike in the positions, the codes and the gathered x
// (the pairs summed by vdpbf16ps change, not the products). In that order a broadcast of the
// step's 8 metadata bytes and one 64-bit shift bring every value's 2-bit position to the low
// bits of its word (word p of each 64-bit lane holds metadata bits 16 (p % 4) .. + 15, values
// 8 (p % 4) .. + 7; the shift, 2 (p / 4), is the same for the 4 words of a lane: vpsrlvq, not
// the slower vpsrlvw), so the positions take no cross-lane shuffle; the codes, broadcast to the
// four 128-bit lanes by the load, take one in-lane vpshufb (the word of the 16 code bytes holding
// the value's nibble; a vpermw measured 2x its cost) and a vpsrlvq (by 4 (perm(p) % 4), again
// p / 4's). Per step and row of x: 4 loads and 7 vector instructions (3 on the shuffle port) in
// the symmetric case, 13 in the natural order before. Each row alternates two accumulator
// chains (a vdpbf16ps takes longer than a step). A partial last step (K % 64 = 16, 32 or 48) keeps
// the natural order with masked loads.
struct PermTables {
  uint64_t meta_shift[8];  // per 64-bit lane l = p / 4: 2 l
  uint64_t code_shift[8];  // the nibble's shift in its code word: 4 (perm(p) % 4) = 4 (l % 4)
  uint16_t base[32];       // first dense column of the value's group of 4 in the step
  // vpshufb control: the two bytes of the word of the step's 16 code bytes (broadcast to every
  // 128-bit lane) that holds the value's nibble
  uint8_t code_bytes[64];
};

constexpr PermTables make_perm_tables() {
  PermTables t{};
  for (int p = 0; p < 32; ++p) {
    const int v = 8 * (p % 4) + p / 4;
    t.meta_shift[p / 4] = uint64_t(2 * (p / 4));
    t.code_shift[p / 4] = uint64_t(4 * (v % 4));
    t.base[p] = uint16_t(4 * (v / 2));
    t.code_bytes[2 * p] = uint8_t(2 * (v / 4));
    t.code_bytes[2 * p + 1] = uint8_t(2 * (v / 4) + 1);
  }
  return t;
}

alignas(64) constexpr PermTables kPerm = make_perm_tables();

// bf16 of q - 8 for q = 0..15, twice: vpermw reads 5 index bits, and bit 4 of a shifted code word
// is the next code's.
alignas(64) constexpr uint16_t kSymTable[32] = {
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000,
    0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040,
    0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};

constexpr int kTernaryAndOr = 0xEA;  // vpternlog: (a & b) | c

// One full step st (64 dense columns) of rows m0 .. m0 + MB - 1 of x into aq (and ax).
template <int MB, bool kSym>
BITPRESS_TARGET_AVX512BF16 inline __attribute__((always_inline)) void bf16_full_step(
    const int32_t* q, const uint8_t* meta, const uint16_t* x, int64_t ldx, int64_t st, __m512* aq,
    __m512* ax) {
  int64_t mw;
  memcpy(&mw, meta + 8 * st, 8);
  const __m512i idx = _mm512_ternarylogic_epi32(
      _mm512_srlv_epi64(_mm512_set1_epi64(mw), _mm512_load_si512(kPerm.meta_shift)),
      _mm512_set1_epi16(3), _mm512_load_si512(kPerm.base), kTernaryAndOr);
  const __m512i cw =
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 4 * st)));
  const __m512i c = _mm512_srlv_epi64(_mm512_shuffle_epi8(cw, _mm512_load_si512(kPerm.code_bytes)),
                                      _mm512_load_si512(kPerm.code_shift));
  const __m512i qp = kSym ? _mm512_permutexvar_epi16(c, _mm512_load_si512(kSymTable))
                          : _mm512_ternarylogic_epi32(c, _mm512_set1_epi16(0xF),
                                                      _mm512_set1_epi16(0x4300), kTernaryAndOr);
  for (int i = 0; i < MB; ++i) {
    const uint16_t* xr = x + i * ldx + 64 * st;
    const __m512i xs =
        _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), idx, _mm512_loadu_si512(xr + 32));
    aq[i] = _mm512_dpbf16_ps(aq[i], (__m512bh)xs, (__m512bh)qp);
    if (!kSym)
      ax[i] = _mm512_dpbf16_ps(ax[i], (__m512bh)xs, (__m512bh)_mm512_set1_epi32(0x3F803F80));
  }
}

// The partial last step st (dense = 16, 32 or 48 columns), natural order, masked loads.
template <int MB, bool kSym>
BITPRESS_TARGET_AVX512BF16 void bf16_tail_step(const int32_t* q, const uint8_t* meta,
                                               const uint16_t* x, int64_t ldx, int64_t st,
                                               int64_t dense, __m512* aq, __m512* ax) {
  alignas(64) static constexpr uint16_t kWord[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1,
                                                     1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2,
                                                     2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
  alignas(64) static constexpr uint16_t kShift[32] = {0,  2,  4,  6,  8,  10, 12, 14, 0,  2, 4,
                                                      6,  8,  10, 12, 14, 0,  2,  4,  6,  8, 10,
                                                      12, 14, 0,  2,  4,  6,  8,  10, 12, 14};
  alignas(64) static constexpr uint16_t kBase[32] = {0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20,
                                                     20, 24, 24, 28, 28, 32, 32, 36, 36, 40, 40,
                                                     44, 44, 48, 48, 52, 52, 56, 56, 60, 60};
  uint64_t mw = 0;
  memcpy(&mw, meta + 8 * st, size_t(dense / 8));
  __m512i idx = _mm512_permutexvar_epi16(_mm512_load_si512(kWord), _mm512_set1_epi64(int64_t(mw)));
  idx = _mm512_add_epi16(
      _mm512_and_si512(_mm512_srlv_epi16(idx, _mm512_load_si512(kShift)), _mm512_set1_epi16(3)),
      _mm512_load_si512(kBase));
  // Codes: byte i holds values 2i (low nibble) and 2i + 1: dword lane i becomes the pair.
  const __mmask16 qm = __mmask16((1u << (dense / 4)) - 1);
  const __m512i d = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(qm, q + 4 * st));
  __m512i qp =
      _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0xF)),
                      _mm512_and_si512(_mm512_slli_epi32(d, 12), _mm512_set1_epi32(0xF0000)));
  // Lanes past the row's end: x loads as zero, so their pairs add nothing.
  if (kSym) {
    qp = _mm512_permutexvar_epi16(qp, _mm512_load_si512(kSymTable));
  } else {
    qp = _mm512_or_si512(qp, _mm512_set1_epi32(0x43004300));
  }
  const __mmask32 xm0 = dense >= 32 ? ~__mmask32(0) : __mmask32((1u << dense) - 1);
  const __mmask32 xm1 = dense <= 32 ? 0 : __mmask32((1u << (dense - 32)) - 1);
  for (int i = 0; i < MB; ++i) {
    const uint16_t* xr = x + i * ldx + 64 * st;
    const __m512i xs = _mm512_permutex2var_epi16(_mm512_maskz_loadu_epi16(xm0, xr), idx,
                                                 _mm512_maskz_loadu_epi16(xm1, xr + 32));
    aq[i] = _mm512_dpbf16_ps(aq[i], (__m512bh)xs, (__m512bh)qp);
    if (!kSym)
      ax[i] = _mm512_dpbf16_ps(ax[i], (__m512bh)xs, (__m512bh)_mm512_set1_epi32(0x3F803F80));
  }
}

// Folds a group's sums into y: y += s sum x q' (symmetric), else y += s (sum x q' - (128 + z)
// sum x); the chains restart at zero.
template <int MB, bool kSym, int kChains>
BITPRESS_TARGET_AVX512BF16 inline __attribute__((always_inline)) void bf16_flush(__m512 (*aq)[MB],
                                                                                 __m512 (*ax)[MB],
                                                                                 __m512* y, float s,
                                                                                 float z) {
  const __m512 sv = _mm512_set1_ps(s), szv = _mm512_set1_ps(-s * (128.f + z));
  for (int i = 0; i < MB; ++i) {
    __m512 a = aq[0][i], b = ax[0][i];
    if (kChains == 2) {
      a = _mm512_add_ps(a, aq[1][i]);
      b = _mm512_add_ps(b, ax[1][i]);
    }
    y[i] =
        kSym ? _mm512_fmadd_ps(a, sv, y[i]) : _mm512_fmadd_ps(a, sv, _mm512_fmadd_ps(b, szv, y[i]));
    for (int c = 0; c < kChains; ++c) aq[c][i] = ax[c][i] = _mm512_setzero_ps();
  }
}

// Weight row n times rows m0 .. m0 + MB - 1 of x into acc[m0 ..]. kPg: steps per group
// (group_size / 64) when fixed at compile time (2: group 128, the common case, whose groups are
// then straight-line code), 0 when read from p.
template <int MB, bool kSym, int kPg>
BITPRESS_TARGET_AVX512BF16 inline __attribute__((always_inline)) void block_bf16(
    const Sparse24Int4GemmParams& p, int64_t n, const float* s, const float* z, int64_t m0,
    float* acc) {
  const int64_t K = p.K;
  const int32_t* q = p.qvalues + n * (K / 16);
  const uint8_t* meta = p.meta + n * (K / 8);
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + m0 * p.x_row_stride;
  const int64_t ldx = p.x_row_stride;
  // Two accumulator chains per row while they fit in the 32 registers.
  constexpr int kChains = MB <= 4 ? 2 : 1;
  __m512 y[MB], aq[kChains][MB], ax[kChains][MB];
  for (int i = 0; i < MB; ++i) {
    y[i] = _mm512_setzero_ps();
    for (int c = 0; c < kChains; ++c) aq[c][i] = ax[c][i] = _mm512_setzero_ps();
  }
  const int64_t pg = kPg > 0 ? kPg : p.group_size / 64;
  // full steps, and the groups made of full steps only (all but a last partial group)
  const int64_t full = K / 64, gfull = full / pg;
  // The first block of rows of x prefetches the row's streams 4 KiB ahead (the hardware
  // prefetchers stop at each 4 KiB page): codes and metadata every 2 steps (a line holds 4 and 8
  // steps; the extra prefetches cost a load slot each).
  const bool pf = m0 == 0;
  const char* qpf = reinterpret_cast<const char*>(q) + kPrefetchBytes;
  const char* mpf = reinterpret_cast<const char*>(meta) + kPrefetchBytes;
  int64_t st = 0;
  for (int64_t g = 0; g < gfull; ++g) {
    for (int64_t j = 0; j + 1 < pg; j += 2, st += 2) {
      if (pf) {
        __builtin_prefetch(qpf + 16 * st, 0, 2);
        __builtin_prefetch(mpf + 8 * st, 0, 2);
      }
      bf16_full_step<MB, kSym>(q, meta, x, ldx, st, aq[0], ax[0]);
      bf16_full_step<MB, kSym>(q, meta, x, ldx, st + 1, aq[kChains - 1], ax[kChains - 1]);
    }
    if (pg & 1) {
      if (pf) __builtin_prefetch(qpf + 16 * st, 0, 2);
      bf16_full_step<MB, kSym>(q, meta, x, ldx, st++, aq[0], ax[0]);
    }
    bf16_flush<MB, kSym, kChains>(aq, ax, y, s[g], z[g]);
  }
  if (gfull < p.G) {  // the last group, partial: its full steps, then the partial step
    for (; st < full; ++st) bf16_full_step<MB, kSym>(q, meta, x, ldx, st, aq[0], ax[0]);
    if (K % 64) bf16_tail_step<MB, kSym>(q, meta, x, ldx, full, K % 64, aq[0], ax[0]);
    bf16_flush<MB, kSym, kChains>(aq, ax, y, s[gfull], z[gfull]);
  }
  for (int i = 0; i < MB; ++i) acc[m0 + i] = _mm512_reduce_add_ps(y[i]);
}

// Rows m0 .. m0 + MB - 1 of x and one weight row, for M > kRowBlock.
template <int MB, bool kSym>
BITPRESS_TARGET_AVX512BF16 void block_bf16_call(const Sparse24Int4GemmParams& p, int64_t n,
                                                const float* s, const float* z, int64_t m0,
                                                float* acc) {
  block_bf16<MB, kSym, 0>(p, n, s, z, m0, acc);
}

// Weight rows [n0, n1) when all of x is one block (M = MB <= kRowBlock, the decode case): one
// call per task rather than per row, the block's setup and the per-row dispatch hoisted. s / z:
// G floats each. False on an unordered metadata nibble.
template <int MB, bool kSym, int kPg>
BITPRESS_TARGET_AVX512BF16 bool rows_bf16(const Sparse24Int4GemmParams& p, int64_t n0, int64_t n1,
                                          float* s, float* z) {
  float acc[MB];
  for (int64_t n = n0; n < n1; ++n) {
    if (!sparse24_detail::meta_rows_ok_avx512(p.meta + n * (p.K / 8), p.K / 8)) return false;
    if ((n & 15) == 0 && n + 64 < p.N) prefetch_groups(p, n + 64);
    if (kSym && p.scales_dtype == DType::kBFloat16) {  // the zeros are not read: scales only
      const uint16_t* sp = static_cast<const uint16_t*>(p.scales) + n;
      for (int64_t g = 0; g < p.G; ++g) s[g] = bf16_bits_to_float(sp[g * p.N]);
    } else {
      row_groups(p, n, s, z);
    }
    block_bf16<MB, kSym, kPg>(p, n, s, z, 0, acc);
    for (int m = 0; m < MB; ++m) {
      store_row_value(p.out, p.x_dtype, p.out_row_stride, m, n, acc[m], p.bias, p.bias_dtype);
    }
  }
  return true;
}

using Bf16Fn = void (*)(const Sparse24Int4GemmParams&, int64_t, const float*, const float*, int64_t,
                        float*);
using Bf16RowsFn = bool (*)(const Sparse24Int4GemmParams&, int64_t, int64_t, float*, float*);

template <int... I>
Bf16Fn bf16_fn(int mb, bool zeros, std::integer_sequence<int, I...>) {
  static constexpr Bf16Fn fns[] = {block_bf16_call<I + 1, false>...};
  static constexpr Bf16Fn sym[] = {block_bf16_call<I + 1, true>...};
  return zeros ? fns[mb - 1] : sym[mb - 1];
}

template <int... I>
Bf16RowsFn bf16_rows_fn(int mb, bool zeros, bool pg2, std::integer_sequence<int, I...>) {
  static constexpr Bf16RowsFn fns[2][2][sizeof...(I)] = {
      {{rows_bf16<I + 1, true, 0>...}, {rows_bf16<I + 1, true, 2>...}},
      {{rows_bf16<I + 1, false, 0>...}, {rows_bf16<I + 1, false, 2>...}}};
  return fns[zeros][pg2][mb - 1];
}

using BlockFn = void (*)(const Sparse24Int4GemmParams&, const float*, int64_t, const float*,
                         const float*, int64_t, float*);
template <int... I>
BlockFn avx512_fn(int mb, std::integer_sequence<int, I...>) {
  static constexpr BlockFn fns[] = {block_avx512<I + 1>...};
  return fns[mb - 1];
}

template <int... I>
BlockFn avx2_fn(int mb, std::integer_sequence<int, I...>) {
  static constexpr BlockFn fns[] = {block_avx2<I + 1>...};
  return fns[mb - 1];
}

#endif  // __x86_64__

void row_scalar(const Sparse24Int4GemmParams& p, const float* xf, int64_t n, const float* s,
                const float* z, float* acc) {
  for (int64_t m = 0; m < p.M; ++m) acc[m] = 0.f;
  tail_scalar(p, xf, n, s, z, 0, 0, p.M, acc);
}

Status check(const Sparse24Int4GemmParams& p) {
  if (p.M < 0 || p.K < 0 || p.N < 0 || p.K % 16 || !dtype_valid(p.x_dtype)) {
    return Status::kInvalidArgument;
  }
  if (p.group_size <= 0 || p.group_size % 8 || p.G != (p.K + p.group_size - 1) / p.group_size) {
    return Status::kInvalidArgument;
  }
  if (p.N > 0 && p.K > 0 &&
      (!p.qvalues || !p.meta || !p.scales || !dtype_valid(p.scales_dtype) ||
       (p.zeros && !dtype_valid(p.zeros_dtype)))) {
    return Status::kInvalidArgument;
  }
  if (p.M > 0 && p.N > 0 &&
      (!p.out || p.out_row_stride < p.N || (p.K > 0 && (!p.x || p.x_row_stride < p.K)))) {
    return Status::kInvalidArgument;
  }
  if (p.bias && !dtype_valid(p.bias_dtype)) return Status::kInvalidArgument;
  return Status::kSuccess;
}

}  // namespace

Status sparse24_int4_gemm_cpu(const Sparse24Int4GemmParams& p, const CpuThreadPool* pool) {
  const Status st = check(p);
  if (st != Status::kSuccess || p.M == 0 || p.N == 0) return st;
  if (p.K == 0) {
    for (int64_t m = 0; m < p.M; ++m) {
      for (int64_t n = 0; n < p.N; ++n) {
        store_row_value(p.out, p.x_dtype, p.out_row_stride, m, n, 0.f, p.bias, p.bias_dtype);
      }
    }
    return Status::kSuccess;
  }
  const CpuIsa isa = active_cpu_isa();
#if defined(__x86_64__)
  const bool bf16 = p.x_dtype == DType::kBFloat16 && isa >= CpuIsa::kAvx512 &&
                    cpu_features().avx512_bf16 && p.group_size % 64 == 0;
#else
  const bool bf16 = false;
#endif
  float* xf = nullptr;
  if (!bf16) {
    xf = static_cast<float*>(t_x.get(size_t(p.M) * p.K * sizeof(float)));
    if (!xf) return Status::kOutOfMemory;
    for (int64_t m = 0; m < p.M; ++m) {
      for (int64_t k = 0; k < p.K; ++k) {
        xf[m * p.K + k] = load_as_float(p.x, p.x_dtype, m * p.x_row_stride + k);
      }
    }
  }
  std::atomic<int> status{int(Status::kSuccess)};
  parallel_for(pool, 0, p.N, 16, [&](int64_t n0, int64_t n1) {
    float* buf = static_cast<float*>(t_row.get(size_t(2 * p.G + p.M) * sizeof(float)));
    if (!buf) {
      status = int(Status::kOutOfMemory);
      return;
    }
    float *s = buf, *z = buf + p.G, *acc = buf + 2 * p.G;
#if defined(__x86_64__)
    if (bf16 && p.M <= kRowBlock) {
      const auto seq = std::make_integer_sequence<int, kRowBlock>{};
      if (!bf16_rows_fn(int(p.M), p.zeros != nullptr, p.group_size == 128, seq)(p, n0, n1, s, z)) {
        status = int(Status::kInvalidArgument);
      }
      return;
    }
#endif
    for (int64_t n = n0; n < n1; ++n) {
      if (!meta_rows_ok(p.meta + n * (p.K / 8), p.K / 8)) {
        status = int(Status::kInvalidArgument);
        return;
      }
      // scales / zeros are [G, N]: each row reads one element of G lines that serve 16 or 32
      // rows, G strided streams the hardware prefetchers miss; fetch the lines 64 rows ahead.
      if ((n & 15) == 0 && n + 64 < p.N) prefetch_groups(p, n + 64);
      row_groups(p, n, s, z);
#if defined(__x86_64__)
      if (bf16) {
        for (int64_t m0 = 0; m0 < p.M; m0 += kRowBlock) {
          const int mb = int(std::min<int64_t>(kRowBlock, p.M - m0));
          bf16_fn(mb, p.zeros != nullptr, std::make_integer_sequence<int, kRowBlock>{})(p, n, s, z,
                                                                                        m0, acc);
        }
      } else if (isa >= CpuIsa::kAvx2) {
        for (int64_t m0 = 0; m0 < p.M; m0 += kRowBlock) {
          const int mb = int(std::min<int64_t>(kRowBlock, p.M - m0));
          const auto seq = std::make_integer_sequence<int, kRowBlock>{};
          const BlockFn fn = isa >= CpuIsa::kAvx512 ? avx512_fn(mb, seq) : avx2_fn(mb, seq);
          fn(p, xf, n, s, z, m0, acc);
        }
      } else {
        row_scalar(p, xf, n, s, z, acc);
      }
#else
      (void)isa;
      row_scalar(p, xf, n, s, z, acc);
#endif
      for (int64_t m = 0; m < p.M; ++m) {
        store_row_value(p.out, p.x_dtype, p.out_row_stride, m, n, acc[m], p.bias, p.bias_dtype);
      }
    }
  });
  return Status(status.load());
}

Status sparse24_int4_dequantize_cpu(const Sparse24Int4GemmParams& p, float* w,
                                    const CpuThreadPool* pool) {
  Sparse24Int4GemmParams q = p;
  q.M = 0;  // no x, no out
  const Status st = check(q);
  if (st != Status::kSuccess || p.N == 0 || p.K == 0) return st;
  if (!w) return Status::kInvalidArgument;
  std::atomic<int> status{int(Status::kSuccess)};
  parallel_for(pool, 0, p.N, 16, [&](int64_t n0, int64_t n1) {
    float* buf = static_cast<float*>(t_row.get(size_t(2 * p.G) * sizeof(float)));
    if (!buf) {
      status = int(Status::kOutOfMemory);
      return;
    }
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* meta = p.meta + n * (p.K / 8);
      if (!meta_rows_ok(meta, p.K / 8)) {
        status = int(Status::kInvalidArgument);
        return;
      }
      row_groups(p, n, buf, buf + p.G);
      float* row = w + n * p.K;
      for (int64_t k = 0; k < p.K; ++k) row[k] = 0.f;
      const int32_t* qr = p.qvalues + n * (p.K / 16);
      for (int64_t j = 0; j < p.K / 2; ++j) {
        int64_t col;
        const float v = weight(p, qr, meta, buf, buf + p.G, j, &col);
        row[col] = v;
      }
    }
  });
  return Status(status.load());
}

#if defined(__x86_64__)
// Values [j, j1) of one row, 32 at a time while whole (j even: a byte boundary): 16 bytes of codes
// widened to 32-bit lanes b, (b & 15) | (b >> 4) << 16 puts the codes in order in 16-bit lanes,
// and vpermw looks them up in the group's table (tb[16..31] repeat tb[0..15]). Returns the first
// value not written.
BITPRESS_TARGET_AVX512 int64_t values_avx512(const int32_t* qr, const uint16_t* tb, int64_t j,
                                             int64_t j1, uint16_t* out) {
  if (j & 1) return j;
  const __m512i table = _mm512_loadu_si512(tb);
  const __m512i low = _mm512_set1_epi32(15);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(qr);
  for (; j + 32 <= j1; j += 32) {
    const __m512i b =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j / 2)));
    const __m512i codes =
        _mm512_or_si512(_mm512_and_si512(b, low), _mm512_slli_epi32(_mm512_srli_epi32(b, 4), 16));
    _mm512_storeu_si512(out + j, _mm512_permutexvar_epi16(codes, table));
  }
  return j;
}

// tb[c] = tb[c + 16] = bf16((c - z) s) for c = 0..15, rounded as float_to_bf16_bits (nearest
// even, NaN kept quiet), 16 lanes at once: the scalar table cost ~10x the lookups it serves.
BITPRESS_TARGET_AVX512 void table_avx512(float s, float z, uint16_t* tb) {
  const __m512 c = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 v = _mm512_mul_ps(_mm512_sub_ps(c, _mm512_set1_ps(z)), _mm512_set1_ps(s));
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  __m512i r = _mm512_add_epi32(
      u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1))));
  r = _mm512_srli_epi32(r, 16);
  r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), hi, _mm512_set1_epi32(0x40));
  const __m256i w = _mm512_cvtepi32_epi16(r);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(tb), w);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(tb + 16), w);
}
#endif

// The kept values of each row dequantized, in order: value j of row n is (q - z) s of its group,
// g = 4 (j / 2) / group_size (a group of 4 never straddles a quantization group: group_size % 8
// == 0), so no metadata is read. Per group, the 16 possible values are computed in float32 and
// rounded once to bf16 (a table); each code is then one table lookup (a float conversion per
// value cost ~10x more).
namespace {

// Rows [n0, n1) of sparse24_int4_values_cpu into values (row n at values + (n - n0) K/2).
void values_rows(const Sparse24Int4GemmParams& p, int64_t n0, int64_t n1, bool avx512,
                 uint16_t* values) {
  const int64_t half = p.K / 2, per_group = p.group_size / 2;
  alignas(64) uint16_t tb[32];
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* qr = p.qvalues + n * (p.K / 16);
    uint16_t* out = values + (n - n0) * half;
    for (int64_t g = 0; g < p.G; ++g) {
      const float sc = load_as_float(p.scales, p.scales_dtype, g * p.N + n);
      const float z = p.zeros ? load_as_float(p.zeros, p.zeros_dtype, g * p.N + n) : 8.f;
#if defined(__x86_64__)
      if (avx512) {
        table_avx512(sc, z, tb);
      } else {
        for (int c = 0; c < 16; ++c) tb[c] = tb[c + 16] = float_to_bf16_bits((float(c) - z) * sc);
      }
#else
      (void)avx512;
      for (int c = 0; c < 16; ++c) tb[c] = tb[c + 16] = float_to_bf16_bits((float(c) - z) * sc);
#endif
      int64_t j = g * per_group;
      const int64_t j1 = std::min(half, (g + 1) * per_group);
#if defined(__x86_64__)
      if (avx512) j = values_avx512(qr, tb, j, j1, out);
#endif
      for (; j < j1 && (j & 7); ++j) out[j] = tb[(qr[j >> 3] >> (4 * (j & 7))) & 15];
      for (; j + 8 <= j1; j += 8) {
        const uint32_t word = uint32_t(qr[j >> 3]);
        for (int i = 0; i < 8; ++i) out[j + i] = tb[(word >> (4 * i)) & 15];
      }
      for (; j < j1; ++j) out[j] = tb[(qr[j >> 3] >> (4 * (j & 7))) & 15];
    }
  }
}

thread_local ThreadBuffer t_values;  // a pool thread: one block of rows' bf16 values

}  // namespace

Status sparse24_int4_values_cpu(const Sparse24Int4GemmParams& p, uint16_t* values,
                                const CpuThreadPool* pool) {
  Sparse24Int4GemmParams q = p;
  q.M = 0;  // no x, no out
  const Status st = check(q);
  if (st != Status::kSuccess || p.N == 0 || p.K == 0) return st;
  if (!values) return Status::kInvalidArgument;
  const bool avx512 = active_cpu_isa() >= CpuIsa::kAvx512;
  parallel_for(pool, 0, p.N, 16, [&](int64_t n0, int64_t n1) {
    values_rows(p, n0, n1, avx512, values + n0 * (p.K / 2));
  });
  return Status::kSuccess;
}

Status sparse24_int4_gemm_via_values_cpu(const Sparse24Int4GemmParams& p,
                                         const CpuThreadPool* pool) {
  const Status st = check(p);
  if (st != Status::kSuccess || p.M == 0 || p.N == 0) return st;
  if (p.x_dtype != DType::kBFloat16 || p.K == 0) return Status::kInvalidArgument;
  const bool avx512 = active_cpu_isa() >= CpuIsa::kAvx512;
  const int64_t blocks = (p.N + kSparse24Int4ValuesBlockRows - 1) / kSparse24Int4ValuesBlockRows;
  const int out_size = dtype_size(p.x_dtype);
  std::atomic<int> status{int(Status::kSuccess)};
  parallel_for(pool, 0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kSparse24Int4ValuesBlockRows;
      const int64_t n1 = std::min(p.N, n0 + kSparse24Int4ValuesBlockRows);
      uint16_t* vals = static_cast<uint16_t*>(t_values.get(size_t(n1 - n0) * size_t(p.K / 2) * 2));
      if (!vals) {
        status = int(Status::kOutOfMemory);
        return;
      }
      values_rows(p, n0, n1, avx512, vals);
      Sparse24GemmParams g;
      g.x = p.x;
      g.x_dtype = p.x_dtype;
      g.x_row_stride = p.x_row_stride;
      g.M = p.M;
      g.K = p.K;
      g.N = n1 - n0;
      g.values = vals;
      g.meta = p.meta + n0 * (p.K / 8);
      if (p.bias) {
        g.bias = static_cast<const char*>(p.bias) + n0 * dtype_size(p.bias_dtype);
        g.bias_dtype = p.bias_dtype;
      }
      g.out = static_cast<char*>(p.out) + n0 * out_size;
      g.out_row_stride = p.out_row_stride;
      const Status s = sparse24_gemm_cpu(g, nullptr);  // this block on this thread
      if (s != Status::kSuccess) {
        status = int(s);
        return;
      }
    }
  });
  return Status(status.load());
}

}  // namespace bitpress
