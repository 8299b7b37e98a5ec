// CPU kernel of fp8_weight_gemm (W8A16, bitpress/fp8/fp8_gemm.h).
//
// Two paths, both with exact products and float32 sums:
//
// 1. The engine (fp8_gemm_engine.h): yᵀ = W · xᵀ on the bf16 microkernel (AMX / AVX512-BF16 /
//    AVX2), W decoded exactly to bf16 panel by panel. x must reach the microkernel as bf16
//    without rounding: bf16 x is used as is; fp16 x is split into hi + lo (hi = x with its
//    mantissa truncated to bf16's 7 bits, lo = x - hi: at most 3 more significant bits, exact in
//    bf16); float32 x into hi + mid + lo (8 + 8 + 8 significant bits: exact). Each part is a
//    column of xᵀ, the engine sums the parts' float32 results. The products are then exact, the
//    error is that of float32 summation over K plus the sum of the parts (exact for fp16 x, whose
//    two partial products fit 24 bits together; up to two roundings for float32 x): |err| <=
//    ~(K + 2) 2^-24 sum_k |x_k w_k| s. Exceptions: a part below bf16's normal range (|x| <
//    ~2^-110 for float32 x) counts as zero on AMX / AVX512-BF16 (denormals are zero there); a
//    non-finite x keeps only its hi part (inf or NaN, as the reference). The cost is 2x / 3x the
//    columns: cheap where AMX does the products, and the weight is decoded once for all parts.
//
// 2. The float32 dot-product path for a few rows (M <= options.dot_max_rows, on CPUs without
//    AMX, where the microkernel's 16-column step would be mostly padding): per weight row, 32
//    codes at a time are turned into float16 bits of value * 2^-8 (two bit operations), widened
//    by vcvtph2ps (exact, F16C ignores DAZ) and multiplied into float32 accumulators by FMA with x
//    in float32 (exact for every x dtype); the 2^8 is folded into the scale. M = 1 is then a pure
//    read stream of 1 byte per weight. NaN codes (0x7F / 0xFF) decode to finite values there:
//    a byte compare flags them and the output column becomes NaN, as the reference's. At M = 1
//    (AVX2 / AVX-512) each task's rows are read as options.dot_streams (4) runs at once, one row
//    of each run per pass, so that each thread keeps 4 weight streams in flight (rows_dot_*).
#include <math.h>
#include <string.h>

#include <algorithm>

#include "bitpress/fp8/fp8.h"
#include "bitpress/fp8/fp8_gemm.h"
#include "common/isa.h"
#include "common/thread_buffer.h"
#include "cpu/avx512_transpose.h"
#include "fp8_gemm_engine.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress {
namespace {

thread_local ThreadBuffer t_xp;  // the caller's xᵀ parts (engine) or x as float32 (dot path)

// x = sum of `terms` bf16 parts, exactly (see the file comment). Truncation, not rounding: it
// never overflows to inf and leaves at most 16 / 8 significant bits for the next part.
inline void split(float x, int terms, uint16_t* parts) {
  const uint32_t b = float_bits(x);
  if ((b & 0x7F800000u) == 0x7F800000u) {  // inf / NaN: keep it in hi
    parts[0] = (b & 0x7FFFFFu) ? uint16_t((b >> 16) | 0x40u) : uint16_t(b >> 16);
    for (int t = 1; t < terms; ++t) parts[t] = 0;
    return;
  }
  float r = x;
  for (int t = 0; t < terms; ++t) {
    const uint32_t h = float_bits(r) & 0xFFFF0000u;
    parts[t] = uint16_t(h >> 16);
    r -= bits_float(h);
  }
}

// xᵀ parts [Kp/2, ldx]: column m * terms + t, pair row q = (part t of x[m, 2q], of x[m, 2q+1]).
Status build_xp(const Fp8WeightGemmParams& p, int terms, int64_t Kp, int64_t ldx, uint32_t* xp) {
  const int64_t M = p.M, K = p.K, Q = Kp / 2;
#if defined(__x86_64__)
  // bf16 x on AVX-512: 16 x 16 blocks of pairs transposed in registers (the scalar loop below
  // was ~9% of the call at M = 512, more than the decode).
  if (p.x_dtype == DType::kBFloat16 && terms == 1 && active_cpu_isa() >= CpuIsa::kAvx512) {
    const uint16_t* x = static_cast<const uint16_t*>(p.x);
    for (int64_t q0 = 0; q0 < Q; q0 += 16) {
      for (int64_t m0 = 0; m0 < ldx; m0 += 16) {
        // (Rows past M are not read: any valid pointer will do.)
        transpose_pairs16(m0 < M ? x + m0 * p.ldx + 2 * q0 : x, p.ldx, M - m0, K / 2 - q0,
                          xp + q0 * ldx + m0, ldx);
      }
    }
    // Odd K: the last pair's high half is past x (zero), its low half x[m, K - 1].
    if (K % 2) {
      for (int64_t m = 0; m < M; ++m) xp[(K / 2) * ldx + m] = x[m * p.ldx + K - 1];
    }
    return Status::kSuccess;
  }
#endif
  memset(xp, 0, size_t(Q * ldx) * 4);
  // Blocks of 16 rows: the reads stream from 16 rows, the writes are contiguous runs.
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t m1 = std::min(M, m0 + 16);
    for (int64_t q = 0; q < Q; ++q) {
      uint32_t* dst = xp + q * ldx;
      for (int64_t m = m0; m < m1; ++m) {
        const char* row = static_cast<const char*>(p.x) + m * p.ldx * dtype_size(p.x_dtype);
        uint16_t lo[3] = {0, 0, 0}, hi[3] = {0, 0, 0};
        for (int h = 0; h < 2; ++h) {
          const int64_t k = 2 * q + h;
          if (k >= K) break;
          uint16_t* parts = h ? hi : lo;
          if (p.x_dtype == DType::kBFloat16) {
            parts[0] = reinterpret_cast<const uint16_t*>(row)[k];
          } else {
            split(load_as_float(row, p.x_dtype, k), terms, parts);
          }
        }
        for (int t = 0; t < terms; ++t) {
          dst[m * terms + t] = uint32_t(lo[t]) | (uint32_t(hi[t]) << 16);
        }
      }
    }
  }
  return Status::kSuccess;
}

// ------------------------------------------------------------------------------------------
// The float32 dot-product path
// ------------------------------------------------------------------------------------------

constexpr int kDotMaxRows = 4;

struct DotArgs {
  const float* x;  // [M, K] float32
  int64_t M, K, N;
  const Fp8WeightGemmParams* p;
};

struct F32Lut {
  float v[256];
  F32Lut() {
    for (int i = 0; i < 256; ++i) v[i] = e4m3_to_float(uint8_t(i)) * (1.f / 256.f);
  }
};
const F32Lut kF32Lut;  // value * 2^-8, as the vector paths decode

inline float w_scale_of(const Fp8Scale& s, int64_t n, int64_t kb) {
  switch (s.layout) {
    case Fp8ScaleLayout::kTensor:
      return s.data[0];
    case Fp8ScaleLayout::kRow:
      return s.data[n * s.row_stride];
    default:
      return s.data[(n / kFp8ScaleBlock) * s.row_stride + kb];
  }
}

inline void store(void* out, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kFloat32:
      static_cast<float*>(out)[i] = v;
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(out)[i] = float_to_bf16_bits(v);
      break;
    default:
      static_cast<uint16_t*>(out)[i] = float_to_half_bits(v);
      break;
  }
}

// y[m, n] for rows n in [n0, n1): sums[m] of the K blocks, each scaled, then bias and store.
// `block_dot(d, n, k0, k1, acc)` adds sum_{k0 <= k < k1} x[m, k] w[n, k] 2^-8 to acc[m] and
// says whether a NaN code was among the weights.
using BlockDot = bool (*)(const DotArgs& d, int64_t n, int64_t k0, int64_t k1, float* acc);

void dot_rows(const DotArgs& d, int64_t n0, int64_t n1, BlockDot block_dot) {
  const Fp8WeightGemmParams& p = *d.p;
  const bool block = p.w_scale.layout == Fp8ScaleLayout::kBlock;
  const int64_t step = block ? kFp8ScaleBlock : std::max<int64_t>(d.K, 1);
  for (int64_t n = n0; n < n1; ++n) {
    float tot[kDotMaxRows] = {0.f, 0.f, 0.f, 0.f};
    bool nan = false;
    for (int64_t k0 = 0, kb = 0; k0 < d.K; k0 += step, ++kb) {
      float acc[kDotMaxRows] = {0.f, 0.f, 0.f, 0.f};
      nan |= block_dot(d, n, k0, std::min(d.K, k0 + step), acc);
      const float s = w_scale_of(p.w_scale, n, kb) * 256.f;
      for (int64_t m = 0; m < d.M; ++m) tot[m] += acc[m] * s;
    }
    const float b = p.bias ? load_as_float(p.bias, p.bias_dtype, n) : 0.f;
    for (int64_t m = 0; m < d.M; ++m) {
      store(p.out, p.x_dtype, m * p.ldo + n, nan ? NAN : tot[m] + b);
    }
  }
}

bool block_dot_scalar(const DotArgs& d, int64_t n, int64_t k0, int64_t k1, float* acc) {
  {
    const uint8_t* w = d.p->w + n * d.p->ldw;
    bool nan = false;
    for (int64_t k = k0; k < k1; ++k) {
      const float v = kF32Lut.v[w[k]];
      nan |= e4m3_is_nan(w[k]);
      for (int64_t m = 0; m < d.M; ++m) acc[m] = fmaf(d.x[m * d.K + k], v, acc[m]);
    }
    return nan;
  }
}

#if defined(__x86_64__)
BITPRESS_TARGET_AVX2 bool block_dot_avx2(const DotArgs& d, int64_t n, int64_t k0, int64_t k1,
                                         float* acc) {
  const int64_t M = d.M, K = d.K;
  {
    const uint8_t* w = d.p->w + n * d.p->ldw;
    const __m128i keep = _mm_set1_epi16(int16_t(0xBFFF)), m7f = _mm_set1_epi8(0x7F);
    __m256 a[kDotMaxRows];
    for (int m = 0; m < kDotMaxRows; ++m) a[m] = _mm256_setzero_ps();
    __m128i nanv = _mm_setzero_si128();
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k));
      nanv = _mm_or_si128(nanv, _mm_cmpeq_epi8(_mm_and_si128(b, m7f), m7f));
      // sign-extended byte << 7: magnitude in bits 7..13, sign in 14 and 15; clear bit 14.
      const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), keep);
      const __m256 v = _mm256_cvtph_ps(h);
      for (int64_t m = 0; m < M; ++m) {
        a[m] = _mm256_fmadd_ps(_mm256_loadu_ps(d.x + m * K + k), v, a[m]);
      }
    }
    bool nan = (_mm_movemask_epi8(_mm_unpacklo_epi64(nanv, _mm_setzero_si128())) & 0xFF) != 0;
    for (int64_t m = 0; m < M; ++m) {
      alignas(32) float t[8];
      _mm256_store_ps(t, a[m]);
      acc[m] += ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }
    for (; k < k1; ++k) {
      const float v = kF32Lut.v[w[k]];
      nan |= e4m3_is_nan(w[k]);
      for (int64_t m = 0; m < M; ++m) acc[m] = fmaf(d.x[m * K + k], v, acc[m]);
    }
    return nan;
  }
}

BITPRESS_TARGET_AVX512 bool block_dot_avx512(const DotArgs& d, int64_t n, int64_t k0, int64_t k1,
                                             float* acc) {
  const int64_t M = d.M, K = d.K;
  {
    const uint8_t* w = d.p->w + n * d.p->ldw;
    const __m512i keep = _mm512_set1_epi16(int16_t(0xBFFF));
    const __m256i m7f = _mm256_set1_epi8(0x7F);
    __m512 a[kDotMaxRows];
    for (int m = 0; m < kDotMaxRows; ++m) a[m] = _mm512_setzero_ps();
    __mmask32 nanm = 0;
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      if (k % 64 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(w + k) + 2048, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + k) + 8192, _MM_HINT_T1);
      }
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      nanm |= _mm256_cmpeq_epi8_mask(_mm256_and_si256(b, m7f), m7f);
      const __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(b), 7), keep);
      const __m512 v0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
      const __m512 v1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
      for (int64_t m = 0; m < M; ++m) {
        a[m] = _mm512_fmadd_ps(_mm512_loadu_ps(d.x + m * K + k), v0, a[m]);
        a[m] = _mm512_fmadd_ps(_mm512_loadu_ps(d.x + m * K + k + 16), v1, a[m]);
      }
    }
    bool nan = nanm != 0;
    for (int64_t m = 0; m < M; ++m) acc[m] += _mm512_reduce_add_ps(a[m]);
    for (; k < k1; ++k) {
      const float v = kF32Lut.v[w[k]];
      nan |= e4m3_is_nan(w[k]);
      for (int64_t m = 0; m < M; ++m) acc[m] = fmaf(d.x[m * K + k], v, acc[m]);
    }
    return nan;
  }
}

// M = 1, R rows at once (rows_dot_*<R>): each task's rows are cut into R runs of consecutive
// rows and row i of every run is read in the same loop, their 32-code steps interleaved, so that
// each thread keeps R weight streams in flight (R pages prefetched ahead, R hardware-prefetcher
// streams) instead of one. One stream per thread read at ~80% of the read floor (bench/NOTES.md:
// latency-bound on too few misses in flight, as int4_gemm's M = 1 was). Each run is contiguous
// in memory (ldw = K), so the prefetch ahead of a row's end fetches the run's next row. x is
// loaded once per step for all R rows. Returns the rows whose codes held a NaN (bit u for n[u]).
constexpr int kDotMaxStreams = 4;
using RowsDot = uint32_t (*)(const DotArgs& d, const int64_t* n, int64_t k0, int64_t k1,
                             float* acc);

template <int R>
BITPRESS_TARGET_AVX512 uint32_t rows_dot_avx512(const DotArgs& d, const int64_t* n, int64_t k0,
                                                int64_t k1, float* acc) {
  const __m512i keep = _mm512_set1_epi16(int16_t(0xBFFF));
  const __m256i m7f = _mm256_set1_epi8(0x7F);
  const uint8_t* w[R];
  __m512 a[R];
  __mmask32 nanm[R];
  for (int u = 0; u < R; ++u) {
    w[u] = d.p->w + n[u] * d.p->ldw;
    a[u] = _mm512_setzero_ps();
    nanm[u] = 0;
  }
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) {
    const __m512 x0 = _mm512_loadu_ps(d.x + k), x1 = _mm512_loadu_ps(d.x + k + 16);
    const bool pf = k % 64 == 0;
#pragma GCC unroll 4
    for (int u = 0; u < R; ++u) {
      if (pf) {
        _mm_prefetch(reinterpret_cast<const char*>(w[u] + k) + 2048, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w[u] + k) + 8192, _MM_HINT_T1);
      }
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[u] + k));
      nanm[u] |= _mm256_cmpeq_epi8_mask(_mm256_and_si256(b, m7f), m7f);
      // sign-extended byte << 7: magnitude in bits 7..13, sign in 14 and 15; clear bit 14.
      const __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(b), 7), keep);
      a[u] = _mm512_fmadd_ps(x0, _mm512_cvtph_ps(_mm512_castsi512_si256(h)), a[u]);
      a[u] = _mm512_fmadd_ps(x1, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), a[u]);
    }
  }
  uint32_t nan = 0;
  for (int u = 0; u < R; ++u) {
    float t = _mm512_reduce_add_ps(a[u]);
    bool nu = nanm[u] != 0;
    for (int64_t j = k; j < k1; ++j) {
      t = fmaf(d.x[j], kF32Lut.v[w[u][j]], t);
      nu |= e4m3_is_nan(w[u][j]);
    }
    acc[u] += t;
    nan |= uint32_t(nu) << u;
  }
  return nan;
}

template <int R>
BITPRESS_TARGET_AVX2 uint32_t rows_dot_avx2(const DotArgs& d, const int64_t* n, int64_t k0,
                                            int64_t k1, float* acc) {
  const __m128i keep = _mm_set1_epi16(int16_t(0xBFFF)), m7f = _mm_set1_epi8(0x7F);
  const uint8_t* w[R];
  __m256 a[R];
  __m128i nanv[R];
  for (int u = 0; u < R; ++u) {
    w[u] = d.p->w + n[u] * d.p->ldw;
    a[u] = _mm256_setzero_ps();
    nanv[u] = _mm_setzero_si128();
  }
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(d.x + k);
    const bool pf = k % 64 == 0;
#pragma GCC unroll 4
    for (int u = 0; u < R; ++u) {
      if (pf) {
        _mm_prefetch(reinterpret_cast<const char*>(w[u] + k) + 2048, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w[u] + k) + 8192, _MM_HINT_T1);
      }
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w[u] + k));
      nanv[u] = _mm_or_si128(nanv[u], _mm_cmpeq_epi8(_mm_and_si128(b, m7f), m7f));
      const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), keep);
      a[u] = _mm256_fmadd_ps(x0, _mm256_cvtph_ps(h), a[u]);
    }
  }
  uint32_t nan = 0;
  for (int u = 0; u < R; ++u) {
    alignas(32) float t8[8];
    _mm256_store_ps(t8, a[u]);
    float t = ((t8[0] + t8[1]) + (t8[2] + t8[3])) + ((t8[4] + t8[5]) + (t8[6] + t8[7]));
    bool nu = (_mm_movemask_epi8(_mm_unpacklo_epi64(nanv[u], _mm_setzero_si128())) & 0xFF) != 0;
    for (int64_t j = k; j < k1; ++j) {
      t = fmaf(d.x[j], kF32Lut.v[w[u][j]], t);
      nu |= e4m3_is_nan(w[u][j]);
    }
    acc[u] += t;
    nan |= uint32_t(nu) << u;
  }
  return nan;
}
#endif

// y[0, n] for rows n in [n0, n1) (M = 1), `streams` runs of rows read at once: run u holds rows
// n0 + u S .. n0 + (u + 1) S - 1 (S = ceil(rows / streams), the last runs shorter or empty).
// fns[r] reads r rows at once (r = 1..streams).
void dot_rows_streams(const DotArgs& d, int64_t n0, int64_t n1, int streams, const RowsDot* fns) {
  const Fp8WeightGemmParams& p = *d.p;
  const bool block = p.w_scale.layout == Fp8ScaleLayout::kBlock;
  const int64_t step = block ? kFp8ScaleBlock : std::max<int64_t>(d.K, 1);
  const int64_t S = (n1 - n0 + streams - 1) / streams;
  for (int64_t i = 0; i < S; ++i) {
    int64_t n[kDotMaxStreams];
    int r = 0;  // the runs that still have a row i: a prefix of them
    for (int u = 0; u < streams && n0 + u * S + i < n1; ++u) n[r++] = n0 + u * S + i;
    float tot[kDotMaxStreams] = {0.f, 0.f, 0.f, 0.f};
    uint32_t nan = 0;
    for (int64_t k0 = 0, kb = 0; k0 < d.K; k0 += step, ++kb) {
      float acc[kDotMaxStreams] = {0.f, 0.f, 0.f, 0.f};
      nan |= fns[r](d, n, k0, std::min(d.K, k0 + step), acc);
      for (int u = 0; u < r; ++u) tot[u] += acc[u] * (w_scale_of(p.w_scale, n[u], kb) * 256.f);
    }
    for (int u = 0; u < r; ++u) {
      const float b = p.bias ? load_as_float(p.bias, p.bias_dtype, n[u]) : 0.f;
      store(p.out, p.x_dtype, n[u], (nan >> u) & 1 ? NAN : tot[u] + b);
    }
  }
}

Status dot_path(const Fp8WeightGemmParams& p, const CpuThreadPool* pool, CpuIsa isa,
                const Fp8CpuOptions& options) {
  const CpuFeatures& f = cpu_features();
  if (isa == CpuIsa::kAvx2 && !(f.avx2 && f.fma && f.f16c)) return Status::kUnsupported;
  if (isa >= CpuIsa::kAvx512 && !fp8_cpu::decode_available(Fp8CpuOptions::Decode::kAvx512))
    return Status::kUnsupported;
  const int64_t M = p.M, K = p.K;
  float* x = static_cast<float*>(t_xp.get(size_t(M * K) * 4 + 64));
  if (!x) return Status::kOutOfMemory;
  for (int64_t m = 0; m < M; ++m) {
    const char* row = static_cast<const char*>(p.x) + m * p.ldx * dtype_size(p.x_dtype);
    for (int64_t k = 0; k < K; ++k) x[m * K + k] = load_as_float(row, p.x_dtype, k);
  }
  const DotArgs d{x, M, K, p.N, &p};
  const int streams = M == 1 ? std::clamp(options.dot_streams, 1, kDotMaxStreams) : 1;
  // Rows of W in chunks of 64 (64 K bytes at K = 1K .. 16 K: a task is a long, sequential read).
  const int64_t chunk = 64, n_chunks = (p.N + chunk - 1) / chunk;
  parallel_for(pool, 0, n_chunks, 1, [&](int64_t b, int64_t e) {
    const int64_t n0 = b * chunk, n1 = std::min(p.N, e * chunk);
#if defined(__x86_64__)
    if (streams > 1 && isa >= CpuIsa::kAvx512) {
      static constexpr RowsDot fns[] = {nullptr, rows_dot_avx512<1>, rows_dot_avx512<2>,
                                        rows_dot_avx512<3>, rows_dot_avx512<4>};
      return dot_rows_streams(d, n0, n1, streams, fns);
    }
    if (streams > 1 && isa == CpuIsa::kAvx2) {
      static constexpr RowsDot fns[] = {nullptr, rows_dot_avx2<1>, rows_dot_avx2<2>,
                                        rows_dot_avx2<3>, rows_dot_avx2<4>};
      return dot_rows_streams(d, n0, n1, streams, fns);
    }
    if (isa >= CpuIsa::kAvx512) return dot_rows(d, n0, n1, block_dot_avx512);
    if (isa == CpuIsa::kAvx2) return dot_rows(d, n0, n1, block_dot_avx2);
#endif
    dot_rows(d, n0, n1, block_dot_scalar);
  });
  return Status::kSuccess;
}

}  // namespace

Status fp8_weight_gemm_check(const Fp8WeightGemmParams& p) {
  if (p.M < 0 || p.N < 0 || p.K < 0) return Status::kInvalidArgument;
  if (!dtype_valid(p.x_dtype) || (p.bias && !dtype_valid(p.bias_dtype)))
    return Status::kInvalidArgument;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  if (!p.out || p.ldo < p.N || !p.w_scale.data) return Status::kInvalidArgument;
  if (p.w_scale.layout != Fp8ScaleLayout::kTensor && p.w_scale.layout != Fp8ScaleLayout::kRow &&
      p.w_scale.layout != Fp8ScaleLayout::kBlock) {
    return Status::kInvalidArgument;
  }
  if (p.K > 0 && (!p.x || !p.w || p.ldx < p.K || p.ldw < p.K)) return Status::kInvalidArgument;
  return Status::kSuccess;
}

Status fp8_weight_gemm_cpu_with(const Fp8WeightGemmParams& p, const CpuThreadPool* pool,
                                const Fp8CpuOptions& options) {
  const Status st = fp8_weight_gemm_check(p);
  if (st != Status::kSuccess) return st;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  if (p.M <= std::min<int64_t>(options.dot_max_rows, kDotMaxRows)) {
    return dot_path(p, pool, options.dot_isa, options);
  }
  using namespace fp8_cpu;
  EngineArgs e;
  e.terms = p.x_dtype == DType::kBFloat16 ? 1 : p.x_dtype == DType::kFloat16 ? 2 : 3;
  e.M = p.M;
  e.N = p.N;
  e.K = p.K;
  e.Kp = engine_kp(p.K);
  e.ldx = engine_ldx(p.M, e.terms);
  uint32_t* xp = static_cast<uint32_t*>(t_xp.get(size_t(e.Kp / 2 * e.ldx) * 4 + 64));
  if (!xp) return Status::kOutOfMemory;
  build_xp(p, e.terms, e.Kp, e.ldx, xp);
  e.xp = xp;
  e.w = p.w;
  e.ldw = p.ldw;
  e.w_scale = p.w_scale;
  e.bias = p.bias;
  e.bias_dtype = p.bias_dtype;
  e.out = p.out;
  e.out_dtype = p.x_dtype;
  e.ldo = p.ldo;
  return run_engine(e, pool, options);
}

Status fp8_weight_gemm_cpu(const Fp8WeightGemmParams& p, const CpuThreadPool* pool) {
  return fp8_weight_gemm_cpu_with(p, pool, fp8_cpu_default_options());
}

}  // namespace bitpress
