// sparse24_gemm on the CPU (ROW layout): y = x Wᵀ + bias with W the dense weight of
// (values [N, K/2], meta [N, K/8]). The paths and the dispatch are described in
// bitpress/sparse24/sparse24_cpu.h.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <utility>

#include "bitpress/common/dtype.h"
#include "bitpress/cpu/gemm_microkernel.h"
#include "bitpress/sparse24/sparse24.h"
#include "bitpress/sparse24/sparse24_cpu.h"
#include "common/isa.h"
#include "common/thread_buffer.h"
#include "cpu/avx512_transpose.h"
#include "sparse24/sparse24_cpu_common.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress {
namespace {

using sparse24_detail::meta_rows_ok;
using sparse24_detail::store_row_value;

thread_local ThreadBuffer t_x;      // the calling thread: x widened to float32, or x^T pairs
thread_local ThreadBuffer t_panel;  // a pool thread: the expanded weight panel and its C block

constexpr int kPanelRows = 32;     // weight rows per panel: the microkernel's 2 x 16-row tiles
constexpr int kFmaRowBlock = 8;    // rows of x per register block of the float32 paths
constexpr int kBf16RowBlock = 16;  // rows of x per register block of the vdpbf16ps path

// ---------------------------------------------------------------------------------------------
// Direct path, portable: float32 sums in C++ (xf: x widened to float32 [M, K]).
// ---------------------------------------------------------------------------------------------

void direct_scalar_row(const Sparse24GemmParams& p, const float* xf, int64_t n, float* acc) {
  const int64_t K = p.K, H = K / 2;
  const uint8_t* meta = p.meta + n * (K / 8);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* xr = xf + m * K;
    float s = 0.f;
    for (int64_t j = 0; j < H; ++j) {
      s += xr[sparse24_value_col(meta, j)] * load_as_float(p.values, p.x_dtype, n * H + j);
    }
    acc[m] = s;
  }
}

#if defined(__x86_64__)

// ---------------------------------------------------------------------------------------------
// Direct path, AVX2 + FMA on float32: 8 values (16 dense columns, 16 metadata bits) per step.
// ---------------------------------------------------------------------------------------------

template <int MB>
BITPRESS_TARGET_AVX2 void direct_avx2_block(const Sparse24GemmParams& p, const float* xf, int64_t n,
                                            int64_t m0, float* acc) {
  const int64_t K = p.K, H = K / 2;
  const uint8_t* meta = p.meta + n * (K / 8);
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 a[MB];
  for (int i = 0; i < MB; ++i) a[i] = _mm256_setzero_ps();
  const int64_t steps = K / 16;
  for (int64_t s = 0; s < steps; ++s) {
    uint16_t mw;
    memcpy(&mw, meta + 2 * s, 2);
    __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(mw), shifts);
    idx = _mm256_add_epi32(_mm256_and_si256(idx, three), base);
    // The blend takes b (columns 8..15) where bit 3 of the index is set.
    const __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    __m256 v;
    const int64_t j = n * H + 8 * s;
    if (p.x_dtype == DType::kFloat32) {
      v = _mm256_loadu_ps(static_cast<const float*>(p.values) + j);
    } else {
      const __m128i h = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.values) + j));
      v = p.x_dtype == DType::kFloat16
              ? _mm256_cvtph_ps(h)
              : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    for (int i = 0; i < MB; ++i) {
      const float* xr = xf + (m0 + i) * K + 16 * s;
      const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr), idx);
      const __m256 up = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8), idx);
      a[i] = _mm256_fmadd_ps(_mm256_blendv_ps(lo, up, hi), v, a[i]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a[i]), _mm256_extractf128_ps(a[i], 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    float s = _mm_cvtss_f32(r);
    // A tail of 8 dense columns (K % 16 == 8): 4 values.
    for (int64_t j = steps * 8; j < H; ++j) {
      s += xf[(m0 + i) * K + sparse24_value_col(meta, j)] *
           load_as_float(p.values, p.x_dtype, n * H + j);
    }
    acc[m0 + i] = s;
  }
}

using DirectFn = void (*)(const Sparse24GemmParams&, const float*, int64_t, int64_t, float*);

template <int... I>
DirectFn avx2_block_fn(int mb, std::integer_sequence<int, I...>) {
  static constexpr DirectFn fns[] = {direct_avx2_block<I + 1>...};
  return fns[mb - 1];
}

void direct_avx2_row(const Sparse24GemmParams& p, const float* xf, int64_t n, float* acc) {
  for (int64_t m0 = 0; m0 < p.M; m0 += kFmaRowBlock) {
    const int mb = int(std::min<int64_t>(kFmaRowBlock, p.M - m0));
    avx2_block_fn(mb, std::make_integer_sequence<int, kFmaRowBlock>{})(p, xf, n, m0, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Direct path, bf16 x on AVX512-BF16: 32 values (64 dense columns, 64 metadata bits) per step.
// Word lane j of the index is 4 (j / 2) + ((meta >> 2j) & 3): vpermt2w gathers the x pair of
// each group from two registers of x, and vdpbf16ps multiplies it by the group's value pair.
// ---------------------------------------------------------------------------------------------

// Software prefetch distance of the weight streams: the hardware prefetchers stop at each 4 KiB
// page, and a weight row's values are one page at K = 4096 (bf16), so without it every row
// starts with a demand miss. 4 KiB ahead is one row of values, or eight rows of metadata.
constexpr int64_t kPrefetchBytes = 4096;

struct Bf16Consts {
  __m512i word, shift, base, three;
};

// One step: 32 values (64 dense columns) of the weight row times MB rows of x. xm0 / xm1 / vm
// mask the lanes past the row's end (they load as zero: their products are 0).
template <int MB, bool kMasked>
BITPRESS_TARGET_AVX512BF16 __attribute__((always_inline)) inline void bf16_step(
    const uint16_t* x, int64_t ldx, const uint8_t* meta, const uint16_t* vals, int64_t s,
    int64_t dense, const Bf16Consts& k, __m512* a) {
  uint64_t mw = 0;
  memcpy(&mw, meta + 8 * s, kMasked ? size_t(dense / 8) : 8);
  __m512i idx = _mm512_permutexvar_epi16(k.word, _mm512_set1_epi64(int64_t(mw)));
  idx = _mm512_add_epi16(_mm512_and_si512(_mm512_srlv_epi16(idx, k.shift), k.three), k.base);
  __m512i v;
  __mmask32 xm0 = ~__mmask32(0), xm1 = ~__mmask32(0);
  if (kMasked) {
    v = _mm512_maskz_loadu_epi16(__mmask32((1u << (dense / 2)) - 1), vals + 32 * s);
    xm0 = dense >= 32 ? ~__mmask32(0) : __mmask32((1u << dense) - 1);
    xm1 = dense <= 32 ? 0 : __mmask32((1u << (dense - 32)) - 1);
  } else {
    v = _mm512_loadu_si512(vals + 32 * s);
  }
  for (int i = 0; i < MB; ++i) {
    const uint16_t* xr = x + i * ldx + 64 * s;
    __m512i xa, xb;
    if (kMasked) {
      xa = _mm512_maskz_loadu_epi16(xm0, xr);
      xb = _mm512_maskz_loadu_epi16(xm1, xr + 32);
    } else {
      xa = _mm512_loadu_si512(xr);
      xb = _mm512_loadu_si512(xr + 32);
    }
    const __m512i xs = _mm512_permutex2var_epi16(xa, idx, xb);
    a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)xs, (__m512bh)v);
  }
}

template <int MB>
BITPRESS_TARGET_AVX512BF16 void direct_bf16_block(const Sparse24GemmParams& p, int64_t n,
                                                  int64_t m0, float* acc) {
  const int64_t K = p.K, H = K / 2;
  const uint8_t* meta = p.meta + n * (K / 8);
  const uint16_t* vals = static_cast<const uint16_t*>(p.values) + n * H;
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + m0 * p.x_row_stride;
  alignas(64) static constexpr uint16_t kWord[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1,
                                                     1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2,
                                                     2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
  alignas(64) static constexpr uint16_t kShift[32] = {0,  2,  4,  6,  8,  10, 12, 14, 0,  2, 4,
                                                      6,  8,  10, 12, 14, 0,  2,  4,  6,  8, 10,
                                                      12, 14, 0,  2,  4,  6,  8,  10, 12, 14};
  alignas(64) static constexpr uint16_t kBase[32] = {0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20,
                                                     20, 24, 24, 28, 28, 32, 32, 36, 36, 40, 40,
                                                     44, 44, 48, 48, 52, 52, 56, 56, 60, 60};
  const Bf16Consts k{_mm512_load_si512(kWord), _mm512_load_si512(kShift), _mm512_load_si512(kBase),
                     _mm512_set1_epi16(3)};
  // Two accumulator sets for few rows: one vdpbf16ps chain per row would stall on its latency.
  constexpr int S = MB <= 4 ? 2 : 1;
  __m512 a[S][MB];
  for (int t = 0; t < S; ++t)
    for (int i = 0; i < MB; ++i) a[t][i] = _mm512_setzero_ps();
  const int64_t full = K / 64;
  const bool pf = m0 == 0;  // the first block of rows of x prefetches for all of them
  const char* vpf = reinterpret_cast<const char*>(vals) + kPrefetchBytes;
  const char* mpf = reinterpret_cast<const char*>(meta) + kPrefetchBytes;
  int64_t s = 0;
  for (; s + S <= full; s += S) {
    for (int t = 0; t < S; ++t) {
      if (pf) {
        __builtin_prefetch(vpf + 64 * (s + t), 0, 2);
        if (((s + t) & 7) == 0) __builtin_prefetch(mpf + 8 * (s + t), 0, 2);
      }
      bf16_step<MB, false>(x, p.x_row_stride, meta, vals, s + t, 64, k, a[t]);
    }
  }
  for (; s < full; ++s) bf16_step<MB, false>(x, p.x_row_stride, meta, vals, s, 64, k, a[0]);
  if (64 * full < K)
    bf16_step<MB, true>(x, p.x_row_stride, meta, vals, full, K - 64 * full, k, a[0]);
  for (int t = 1; t < S; ++t)
    for (int i = 0; i < MB; ++i) a[0][i] = _mm512_add_ps(a[0][i], a[t][i]);
  for (int i = 0; i < MB; ++i) acc[m0 + i] = _mm512_reduce_add_ps(a[0][i]);
}

using Bf16Fn = void (*)(const Sparse24GemmParams&, int64_t, int64_t, float*);

template <int... I>
Bf16Fn bf16_block_fn(int mb, std::integer_sequence<int, I...>) {
  static constexpr Bf16Fn fns[] = {direct_bf16_block<I + 1>...};
  return fns[mb - 1];
}

void direct_bf16_row(const Sparse24GemmParams& p, int64_t n, float* acc) {
  for (int64_t m0 = 0; m0 < p.M; m0 += kBf16RowBlock) {
    const int mb = int(std::min<int64_t>(kBf16RowBlock, p.M - m0));
    bf16_block_fn(mb, std::make_integer_sequence<int, kBf16RowBlock>{})(p, n, m0, acc);
  }
}

// Expands R rows (values, metadata and output rows at strides vs, ms, rs) into dense bf16 rows
// with vpexpandw, 32 values (64 dense columns, 8 metadata bytes) per step: the kept-position mask
// of each metadata byte comes from a 256-entry table. The rows' steps are interleaved: R read
// streams per thread keep more misses in flight than one row after another (the M = 16 panel
// path is bound by this stream, not by the tiles). Step s of a row prefetches (L2) its values
// pf_v elements and its metadata pf_m bytes ahead: the caller points them at what it expands
// next (4 KiB ahead in a whole-row sweep; the next row's slice in a K-chunked one, whose own
// continuation is a row's length away).
template <int R>
BITPRESS_TARGET_AVX512 __attribute__((target("avx512vbmi2"))) void expand_rows_vbmi2(
    const uint16_t* vals, int64_t vs, const uint8_t* meta, int64_t ms, int64_t K, uint16_t* row,
    int64_t rs, int64_t pf_v, int64_t pf_m) {
  static const auto kMask = [] {
    struct T {
      uint8_t m[256];
    } t{};
    for (int b = 0; b < 256; ++b) {
      const uint32_t lo = b & 0xF, hi = b >> 4;
      t.m[b] = uint8_t((1u << sparse24_idx0(lo)) | (1u << sparse24_idx1(lo)) |
                       ((1u << sparse24_idx0(hi)) << 4) | ((1u << sparse24_idx1(hi)) << 4));
    }
    return t;
  }();
  int64_t s = 0;
  for (; 64 * (s + 1) <= K; ++s) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint16_t* v = vals + r * vs;
      const uint8_t* m = meta + r * ms + 8 * s;
      __builtin_prefetch(reinterpret_cast<const char*>(v + pf_v) + 64 * s, 0, 2);
      if ((s & 7) == 0) __builtin_prefetch(m + pf_m, 0, 2);
      const uint32_t lo = uint32_t(kMask.m[m[0]]) | uint32_t(kMask.m[m[1]]) << 8 |
                          uint32_t(kMask.m[m[2]]) << 16 | uint32_t(kMask.m[m[3]]) << 24;
      const uint32_t hi = uint32_t(kMask.m[m[4]]) | uint32_t(kMask.m[m[5]]) << 8 |
                          uint32_t(kMask.m[m[6]]) << 16 | uint32_t(kMask.m[m[7]]) << 24;
      const __m512i v0 =
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * s)));
      const __m512i v1 = _mm512_castsi256_si512(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * s + 16)));
      uint16_t* o = row + r * rs;
      _mm512_storeu_si512(o + 64 * s, _mm512_maskz_expand_epi16(lo, v0));
      _mm512_storeu_si512(o + 64 * s + 32, _mm512_maskz_expand_epi16(hi, v1));
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint16_t* v = vals + r * vs;
    const uint8_t* m = meta + r * ms;
    uint16_t* o = row + r * rs;
    for (int64_t k = 64 * s; k < K; ++k) o[k] = 0;
    for (int64_t j = 32 * s; j < K / 2; ++j) o[sparse24_value_col(m, j)] = v[j];
  }
}

#endif  // __x86_64__

void expand_row_scalar(const uint16_t* vals, const uint8_t* meta, int64_t K, uint16_t* row) {
  memset(row, 0, size_t(K) * 2);
  for (int64_t j = 0; j < K / 2; ++j) row[sparse24_value_col(meta, j)] = vals[j];
}

bool have_vbmi2() {
#if defined(__x86_64__)
  static const bool on = __builtin_cpu_supports("avx512vbmi2") && cpu_features().avx512bw;
  return on && active_cpu_isa() >= CpuIsa::kAvx512;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

bool bf16_direct_isa() {
#if defined(__x86_64__)
  return active_cpu_isa() >= CpuIsa::kAvx512 && cpu_features().avx512_bf16;
#else
  return false;
#endif
}

// The microkernel variant of the panel path, or -1 when there is none to use.
int panel_kernel(const Sparse24GemmParams& p) {
  if (p.gemm_kernel >= 0) return p.gemm_kernel;
  if (active_cpu_isa() < CpuIsa::kAvx2) return -1;
  return int(cpu::gemm_bf16_kernel_for_active_isa());
}

// Rows of bf16 x up to which the direct path runs. BITPRESS_SPARSE24_DIRECT_ROWS overrides it
// (read per call: benchmarks compare both paths in one process).
int64_t direct_max_rows(int kernel) {
  if (const char* s = getenv("BITPRESS_SPARSE24_DIRECT_ROWS")) return atoll(s);
  return kernel == int(cpu::GemmKernel::kAmx) ? kSparse24DirectMaxRowsAmx : kSparse24DirectMaxRows;
}

Status check(const Sparse24GemmParams& p) {
  if (p.M < 0 || p.K < 0 || p.N < 0 || p.K % 8 || !dtype_valid(p.x_dtype)) {
    return Status::kInvalidArgument;
  }
  if (p.M > 0 && p.N > 0 &&
      (!p.out || p.out_row_stride < p.N ||
       (p.K > 0 && (!p.x || p.x_row_stride < p.K || !p.values || !p.meta)))) {
    return Status::kInvalidArgument;
  }
  if (p.bias && !dtype_valid(p.bias_dtype)) return Status::kInvalidArgument;
  if (p.path == Sparse24GemmPath::kPanels && p.x_dtype != DType::kBFloat16) {
    return Status::kInvalidArgument;
  }
  if (p.gemm_kernel > int(cpu::GemmKernel::kAvx512Bf16Emulated)) return Status::kInvalidArgument;
  return Status::kSuccess;
}

Status run_direct(const Sparse24GemmParams& p, const CpuThreadPool* pool) {
  const bool bf16 = p.x_dtype == DType::kBFloat16 && bf16_direct_isa();
  const float* xf = nullptr;
  if (!bf16) {
    float* buf = static_cast<float*>(t_x.get(size_t(p.M) * p.K * sizeof(float)));
    if (!buf) return Status::kOutOfMemory;
    for (int64_t m = 0; m < p.M; ++m) {
      for (int64_t k = 0; k < p.K; ++k) {
        buf[m * p.K + k] = load_as_float(p.x, p.x_dtype, m * p.x_row_stride + k);
      }
    }
    xf = buf;
  }
  const CpuIsa isa = active_cpu_isa();
  std::atomic<bool> bad{false};
  // Each task takes consecutive weight rows: one long read stream per thread.
  parallel_for(pool, 0, p.N, 16, [&](int64_t n0, int64_t n1) {
    float acc[256];
    float* a = p.M <= 256 ? acc : static_cast<float*>(t_panel.get(size_t(p.M) * sizeof(float)));
    if (!a) {
      bad = true;
      return;
    }
    for (int64_t n = n0; n < n1; ++n) {
      if (!meta_rows_ok(p.meta + n * (p.K / 8), p.K / 8)) {
        bad = true;
        return;
      }
#if defined(__x86_64__)
      if (bf16) {
        direct_bf16_row(p, n, a);
      } else if (isa >= CpuIsa::kAvx2) {
        direct_avx2_row(p, xf, n, a);
      } else {
        direct_scalar_row(p, xf, n, a);
      }
#else
      (void)isa;
      direct_scalar_row(p, xf, n, a);
#endif
      for (int64_t m = 0; m < p.M; ++m)
        store_row_value(p.out, p.x_dtype, p.out_row_stride, m, n, a[m], p.bias, p.bias_dtype);
    }
  });
  return bad ? Status::kInvalidArgument : Status::kSuccess;
}

#if defined(__x86_64__)
// y[m, n0 + r] = C[r, m] (+ bias) for r in [r0, r0 + 16) and m in [m0, m0 + 16) ∩ [0, M): C^T
// block of one panel (row stride ldc) transposed in registers, 16 outputs of row m stored at once.
BITPRESS_TARGET_AVX512 void store_ct_block16(const Sparse24GemmParams& p, const float* c,
                                             int64_t ldc, int64_t n0, int64_t r0, int64_t m0) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(c + (r0 + i) * ldc + m0);
  transpose16(r);
  alignas(64) float b[16] = {};
  if (p.bias) {
    for (int i = 0; i < 16; ++i) b[i] = load_as_float(p.bias, p.bias_dtype, n0 + r0 + i);
  }
  const __m512 vb = _mm512_load_ps(b);
  for (int j = 0; j < 16 && m0 + j < p.M; ++j) {
    store16(p.out, p.x_dtype, (m0 + j) * p.out_row_stride + n0 + r0, _mm512_add_ps(r[j], vb));
  }
}
#endif

// Blocking of the panel path. The microkernel sweeps the whole K of its call for every 32 x 32
// block of C, reading its A rows (the weight panel) and B columns (x^T) from wherever they are. In
// one call over all of K the x^T operand is Kp * Mp * 2 bytes: 3.5 MiB at K = 14336, M = 128, more
// than the 2 MiB L2 of the Intel cores, so every panel re-read all of x from L3 and the call ran
// at 0.77x F.linear where the K = 4096 shapes (1 MiB of x^T, L2-resident) ran at 1.45x. So K is cut
// into chunks whose x^T slice fits in kXChunkBytes, and a thread runs each chunk over a group of
// panels whose C block (float32, accumulated across the chunks) fits in kCGroupBytes, before the
// next chunk: x^T is read from L3 once per group instead of once per panel.
constexpr int64_t kXChunkBytes = int64_t(512) << 10;  // x^T slice of a K chunk (L2: 2 MiB)
constexpr int64_t kCGroupBytes = int64_t(512) << 10;  // C of a group of panels
constexpr int64_t kMinChunkK = 256;
// Rows a thread expands at once (read streams; 4 measured 5-10% faster than 1 at M = 16, 8 no
// better than 4).
constexpr int kExpandStreams = 4;
constexpr int64_t kSpreadMaxCols = 32;  // rows of x (padded) up to which the streams are spread

Status run_panels(const Sparse24GemmParams& p, int kernel, const CpuThreadPool* pool) {
  const int64_t Mp = (p.M + 15) / 16 * 16, Kp = (p.K + 31) / 32 * 32;
  const cpu::GemmKernel gk = cpu::GemmKernel(kernel);
  // x^T as VNNI pairs [Kp/2, Mp]: pair (x[m, 2q], x[m, 2q+1]) of column m at xb[q * Mp + m].
  uint32_t* xb = static_cast<uint32_t*>(t_x.get(size_t(Kp / 2) * Mp * 4));
  if (!xb) return Status::kOutOfMemory;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
#if defined(__x86_64__)
  const bool avx512 = active_cpu_isa() >= CpuIsa::kAvx512;
#else
  const bool avx512 = false;
#endif
  parallel_for(pool, 0, Kp / 32, 4, [&](int64_t s0, int64_t s1) {
    for (int64_t q0 = 16 * s0; q0 < 16 * s1; q0 += 16) {
#if defined(__x86_64__)
      if (avx512) {
        for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
          // (Rows past M are not read: any valid pointer will do.)
          transpose_pairs16(m0 < p.M ? x + m0 * p.x_row_stride + 2 * q0 : x, p.x_row_stride,
                            p.M - m0, p.K / 2 - q0, xb + q0 * Mp + m0, Mp);
        }
        continue;
      }
#endif
      for (int64_t q = q0; q < q0 + 16; ++q) {
        for (int64_t m = 0; m < Mp; ++m) {
          uint32_t pair = 0;
          if (m < p.M && 2 * q < p.K) memcpy(&pair, x + m * p.x_row_stride + 2 * q, 4);
          xb[q * Mp + m] = pair;
        }
      }
    }
  });
  const bool vbmi2 = have_vbmi2();
  const int64_t panels = (p.N + kPanelRows - 1) / kPanelRows;
  // K chunk: a multiple of 64 (whole metadata bytes and expansion steps; 32 for the tiles).
  // The budgets are for the 2 MiB L2 of the Intel (AMX) cores; halved for the other variants (Zen 5
  // has 1 MiB of L2 per core; not measured there).
  const int l2_shift = gk == cpu::GemmKernel::kAmx ? 0 : 1;
  int64_t kc = std::min(Kp, std::max(kMinChunkK, (kXChunkBytes >> l2_shift) / (Mp * 2) / 64 * 64));
  int64_t group = std::max<int64_t>(1, (kCGroupBytes >> l2_shift) / (kPanelRows * Mp * 4));
  // BITPRESS_SPARSE24_PANEL_BLOCK="chunk,group" overrides both (tests: many chunks and groups on
  // small shapes); read per call.
  if (const char* s = getenv("BITPRESS_SPARSE24_PANEL_BLOCK")) {
    long long c = 0, gr = 0;
    if (sscanf(s, "%lld,%lld", &c, &gr) == 2 && c > 0 && c % 64 == 0 && gr > 0) {
      kc = std::min<int64_t>(Kp, c);
      group = gr;
    }
  }
  // Panel rows 64 bytes longer than the chunk: a power-of-two row stride (8 KiB at 4096) would put
  // the 16 rows of an A tile in one L1 set.
  const int64_t lda = kc + 32;
  std::atomic<int> status{int(Status::kSuccess)};
  parallel_for(pool, 0, panels, 1, [&](int64_t i0, int64_t i1) {
    const int64_t gn = std::min(group, i1 - i0);
    const size_t a_bytes = size_t(kPanelRows) * lda * 2;
    const size_t c_bytes = size_t(gn) * kPanelRows * Mp * 4;
    char* ws = static_cast<char*>(t_panel.get(align64(a_bytes) + c_bytes));
    if (!ws) {
      status = int(Status::kOutOfMemory);
      return;
    }
    uint16_t* a = reinterpret_cast<uint16_t*>(ws);
    float* cbuf = reinterpret_cast<float*>(ws + align64(a_bytes));
    for (int64_t g0 = i0; g0 < i1; g0 += group) {
      const int64_t g1 = std::min(i1, g0 + group);
      for (int64_t i = g0; i < g1; ++i) {
        const int64_t n0 = i * kPanelRows, nb = std::min<int64_t>(kPanelRows, p.N - n0);
        for (int64_t r = 0; r < nb; ++r) {
          if (!meta_rows_ok(p.meta + (n0 + r) * (p.K / 8), p.K / 8)) {
            status = int(Status::kInvalidArgument);
            return;
          }
        }
      }
      for (int64_t k0 = 0; k0 < Kp; k0 += kc) {
        const int64_t kp = std::min(kc, Kp - k0);                         // the chunk's tile steps
        const int64_t kk = std::max<int64_t>(0, std::min(kp, p.K - k0));  // its real columns
        for (int64_t i = g0; i < g1; ++i) {
          const int64_t n0 = i * kPanelRows, nb = std::min<int64_t>(kPanelRows, p.N - n0);
          // Decode-sized M (the expansion's read stream dominates): a full panel's streams are
          // kPanelRows / kExpandStreams rows apart (rows r, r + 8, r + 16, r + 24), each
          // prefetching its next row, 4-8% faster than adjacent rows at M = 16-32; at M = 128
          // adjacent rows were 5% faster (measured at 4096 x 14336 and 14336 x 4096,
          // bench/NOTES.md). Ragged panels: runs of adjacent rows.
          const bool spread = nb == kPanelRows && Mp <= kSpreadMaxCols;
          const int64_t step = spread ? kPanelRows / kExpandStreams : 1;
          for (int64_t r = 0, done = 0; done < nb;) {
            const uint8_t* meta = p.meta + (n0 + r) * (p.K / 8) + k0 / 8;
            const uint16_t* vals =
                static_cast<const uint16_t*>(p.values) + (n0 + r) * (p.K / 2) + k0 / 2;
            uint16_t* row = a + r * lda;
#if defined(__x86_64__)
            if (vbmi2) {
              const int R =
                  spread ? kExpandStreams : int(std::min<int64_t>(kExpandStreams, nb - r));
              // Prefetch: spread, each stream's next row (after the last, the next panel's, whose
              // slice of this chunk comes next); adjacent, the rows expanded next, at least ~4 KiB
              // of values ahead.
              const int64_t ahead =
                  spread ? (r + 1 < step ? 1 : kPanelRows - step + 1)
                         : std::min(p.N - 1 - (n0 + r),
                                    std::max<int64_t>(R, 4096 / std::max<int64_t>(kk, 1)));
              const int64_t vs = p.K / 2 * step, ms = p.K / 8 * step;
              const int64_t pf_v = ahead * (p.K / 2), pf_m = ahead * (p.K / 8);
              switch (R) {
                case 4:
                  expand_rows_vbmi2<4>(vals, vs, meta, ms, kk, row, lda * step, pf_v, pf_m);
                  break;
                case 3:
                  expand_rows_vbmi2<3>(vals, vs, meta, ms, kk, row, lda * step, pf_v, pf_m);
                  break;
                case 2:
                  expand_rows_vbmi2<2>(vals, vs, meta, ms, kk, row, lda * step, pf_v, pf_m);
                  break;
                default:
                  expand_rows_vbmi2<1>(vals, vs, meta, ms, kk, row, lda * step, pf_v, pf_m);
              }
              for (int j = 0; j < R; ++j)
                for (int64_t k = kk; k < kp; ++k) row[j * step * lda + k] = 0;
              done += R;
              r += spread ? 1 : R;
              continue;
            }
            expand_row_scalar(vals, meta, kk, row);
#else
            (void)vbmi2;
            expand_row_scalar(vals, meta, kk, row);
#endif
            for (int64_t k = kk; k < kp; ++k) row[k] = 0;
            ++done;
            ++r;
          }
          cpu::GemmBf16Args g;
          g.a = a;
          g.lda = lda;
          g.b = xb + (k0 / 2) * Mp;
          g.ldb = Mp;
          g.c = cbuf + (i - g0) * kPanelRows * Mp;
          g.ldc = Mp;
          g.M = nb;
          g.N = Mp;
          g.K = kp;
          g.accumulate = k0 > 0;
          const Status st = cpu::gemm_bf16(gk, g);
          if (st != Status::kSuccess) {
            status = int(st);
            return;
          }
        }
      }
      // C^T blocks: C[r, m] of panel i is y[m, i * 32 + r]; whole 16 x 16 blocks transposed in
      // registers (AVX-512), the rows of a ragged last panel one by one.
      for (int64_t i = g0; i < g1; ++i) {
        const int64_t n0 = i * kPanelRows, nb = std::min<int64_t>(kPanelRows, p.N - n0);
        const float* c = cbuf + (i - g0) * kPanelRows * Mp;
        int64_t r16 = 0;
#if defined(__x86_64__)
        if (avx512) {
          r16 = nb / 16 * 16;
          for (int64_t r0 = 0; r0 < r16; r0 += 16) {
            for (int64_t m0 = 0; m0 < p.M; m0 += 16) store_ct_block16(p, c, Mp, n0, r0, m0);
          }
        }
#endif
        for (int64_t m = 0; m < p.M; ++m) {
          for (int64_t r = r16; r < nb; ++r) {
            store_row_value(p.out, p.x_dtype, p.out_row_stride, m, n0 + r, c[r * Mp + m], p.bias,
                            p.bias_dtype);
          }
        }
      }
    }
  });
  return Status(status.load());
}

}  // namespace

Sparse24GemmPath sparse24_gemm_cpu_path(const Sparse24GemmParams& p) {
  if (p.path != Sparse24GemmPath::kAuto) return p.path;
  const int k = panel_kernel(p);
  if (p.x_dtype == DType::kBFloat16 && k >= 0 && p.M > direct_max_rows(k)) {
    return Sparse24GemmPath::kPanels;
  }
  return Sparse24GemmPath::kDirect;
}

const char* sparse24_gemm_cpu_path_name(const Sparse24GemmParams& p) {
  if (sparse24_gemm_cpu_path(p) == Sparse24GemmPath::kPanels) {
    const int k = panel_kernel(p);
    return k < 0 ? "panels" : cpu::gemm_kernel_name(cpu::GemmKernel(k));
  }
  if (p.x_dtype == DType::kBFloat16 && bf16_direct_isa()) return "direct-avx512bf16";
#if defined(__x86_64__)
  if (active_cpu_isa() >= CpuIsa::kAvx2) return "direct-avx2";
#endif
  return "direct-scalar";
}

Status sparse24_expand16_cpu(const uint16_t* values, const uint8_t* meta, int64_t N, int64_t K,
                             uint16_t* w, const CpuThreadPool* pool) {
  if (N < 0 || K < 0 || K % 8 || (N * K > 0 && (!w || !values || !meta))) {
    return Status::kInvalidArgument;
  }
  if (N == 0 || K == 0) return Status::kSuccess;
  const bool vbmi2 = have_vbmi2();
  std::atomic<bool> bad{false};
  parallel_for(pool, 0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1 && !bad; ++n) {
      const uint8_t* m = meta + n * (K / 8);
      if (!meta_rows_ok(m, K / 8)) {
        bad = true;
        return;
      }
#if defined(__x86_64__)
      if (vbmi2) {
        expand_rows_vbmi2<1>(values + n * (K / 2), 0, m, 0, K, w + n * K, 0, kPrefetchBytes / 2,
                             kPrefetchBytes);
        continue;
      }
#endif
      (void)vbmi2;
      expand_row_scalar(values + n * (K / 2), m, K, w + n * K);
    }
  });
  return bad ? Status::kInvalidArgument : Status::kSuccess;
}

Status sparse24_gemm_cpu(const Sparse24GemmParams& p, const CpuThreadPool* pool) {
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
  if (sparse24_gemm_cpu_path(p) == Sparse24GemmPath::kPanels) {
    const int k = panel_kernel(p);
    if (k < 0) return Status::kUnsupported;
    if (!cpu::gemm_kernel_available(cpu::GemmKernel(k))) return Status::kUnsupported;
    return run_panels(p, k, pool);
  }
  return run_direct(p, pool);
}

}  // namespace bitpress
