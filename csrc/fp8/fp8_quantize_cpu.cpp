// CPU kernel of fp8_quantize (bitpress/fp8/fp8_quantize.h).
//
// One pass over x per row (kRow) or per row block (kBlock): the amax of the row / block, its
// scale, then the codes, while the row is still in L1 (rows of up to 12K float32 elements; the
// row is read twice, the second time from cache). kTensor (dynamic) needs the amax of all of x
// before any code: an amax pass (per-chunk maxima, reduced in chunk order), then the quantize
// pass. The codes are float_to_e4m3(x / scale) (fp8.h): the float32 division of the reference,
// not a multiplication by 1 / scale, which would round differently.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "bitpress/common/cpu.h"
#include "bitpress/fp8/fp8.h"
#include "bitpress/fp8/fp8_quantize.h"
#include "common/isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress {
namespace {

// NaN-propagating max of |v| (an amax with a NaN is NaN, as torch's amax).
inline float amax_step(float m, float v) {
  const float a = fabsf(v);
  return (a > m || a != a) ? a : m;
}

inline float scale_of(float amax) {
  float s = amax / kE4M3Max;
  return s < kFp8MinScale ? kFp8MinScale : s;  // NaN compares false: stays NaN
}

// x[i] as float for the three dtypes.
inline float load(const void* x, DType t, int64_t i) { return load_as_float(x, t, i); }

float amax_range(const void* row, DType t, int64_t k0, int64_t k1) {
  float m = 0.f;
  switch (t) {
    case DType::kFloat32: {
      const float* x = static_cast<const float*>(row);
      // Two lanes of NaN-aware maxima let the compiler vectorize the loop.
      for (int64_t k = k0; k < k1; ++k) m = amax_step(m, x[k]);
      break;
    }
    default:
      for (int64_t k = k0; k < k1; ++k) m = amax_step(m, load(row, t, k));
      break;
  }
  return m;
}

void quantize_range(const void* row, DType t, int64_t k0, int64_t k1, float scale, uint8_t* q) {
  switch (t) {
    case DType::kFloat32: {
      const float* x = static_cast<const float*>(row);
      for (int64_t k = k0; k < k1; ++k) q[k] = float_to_e4m3(x[k] / scale);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* x = static_cast<const uint16_t*>(row);
      for (int64_t k = k0; k < k1; ++k) q[k] = float_to_e4m3(bf16_bits_to_float(x[k]) / scale);
      break;
    }
    default: {
      const uint16_t* x = static_cast<const uint16_t*>(row);
      for (int64_t k = k0; k < k1; ++k) q[k] = float_to_e4m3(half_bits_to_float(x[k]) / scale);
      break;
    }
  }
}

#if defined(__x86_64__)
// AVX-512 versions of amax_range / quantize_range, 16 elements per step (masked tails), bit for bit
// the scalar ones: x / scale is the same IEEE division, float_to_e4m3's integer steps are done
// per lane (its subnormal float add too, under the same MXCSR), and the amax is the maximum of
// the non-NaN |x| or NaN if any was (the scalar max is NaN from its first NaN on).
BITPRESS_TARGET_AVX512 inline __m512 load16(const void* row, DType t, int64_t k, __mmask16 m) {
  switch (t) {
    case DType::kFloat32:
      return _mm512_maskz_loadu_ps(m, static_cast<const float*>(row) + k);
    case DType::kBFloat16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(row) + k)),
          16));
    default:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(row) + k));
  }
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : __mmask16((1u << n) - 1); }

BITPRESS_TARGET_AVX512 float amax_range_avx512(const void* row, DType t, int64_t k0, int64_t k1) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512 m = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 lm = tail_mask(k1 - k);
    const __m512 a =
        _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(load16(row, t, k, lm)), abs_mask));
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, a);  // masked-off lanes are +0
  }
  return nan ? NAN : _mm512_reduce_max_ps(m);
}

BITPRESS_TARGET_AVX512 void quantize_range_avx512(const void* row, DType t, int64_t k0, int64_t k1,
                                                  float scale, uint8_t* q) {
  const __m512 sv = _mm512_set1_ps(scale);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i sat = _mm512_set1_epi32(0x43E00000), min_normal = _mm512_set1_epi32(121 << 23);
  const __m512i magic = _mm512_set1_epi32(141 << 23), one = _mm512_set1_epi32(1);
  const __m512i rebias = _mm512_set1_epi32(int32_t(uint32_t(7 - 127) << 23) + 0x7FFFF);
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 lm = tail_mask(k1 - k);
    const __m512i bits = _mm512_castps_si512(_mm512_div_ps(load16(row, t, k, lm), sv));
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80));
    const __m512i a = _mm512_and_si512(bits, abs_mask);
    // Normal: rebias and round the 20 dropped mantissa bits to nearest even.
    __m512i out =
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(a, rebias),
                                           _mm512_and_si512(_mm512_srli_epi32(a, 20), one)),
                          20);
    // Subnormal (|v| < 2^-6): the float add of 2^14 rounds to the 2^-9 step.
    const __mmask16 sub = _mm512_cmplt_epu32_mask(a, min_normal);
    const __m512i r = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(magic))),
        magic);
    out = _mm512_mask_mov_epi32(out, sub, r);
    out = _mm512_mask_mov_epi32(out, _mm512_cmpge_epu32_mask(a, sat),
                                _mm512_set1_epi32(kE4M3MaxCode));
    out = _mm512_mask_mov_epi32(out, _mm512_cmpgt_epu32_mask(a, inf),
                                _mm512_set1_epi32(kE4M3NaNCode));
    out = _mm512_and_si512(_mm512_or_si512(out, sign), _mm512_set1_epi32(0xFF));
    _mm_mask_storeu_epi8(q + k, lm, _mm512_cvtepi32_epi8(out));
  }
}
#endif

// The active ISA's versions.
float amax_of(const void* row, DType t, int64_t k0, int64_t k1) {
#if defined(__x86_64__)
  if (active_cpu_isa() >= CpuIsa::kAvx512) return amax_range_avx512(row, t, k0, k1);
#endif
  return amax_range(row, t, k0, k1);
}

void quantize_of(const void* row, DType t, int64_t k0, int64_t k1, float scale, uint8_t* q) {
#if defined(__x86_64__)
  if (active_cpu_isa() >= CpuIsa::kAvx512) return quantize_range_avx512(row, t, k0, k1, scale, q);
#endif
  quantize_range(row, t, k0, k1, scale, q);
}

inline const void* row_ptr(const Fp8QuantizeParams& p, int64_t r) {
  return static_cast<const char*>(p.x) + r * p.x_row_stride * dtype_size(p.x_dtype);
}

}  // namespace

Status fp8_quantize_check(const Fp8QuantizeParams& p) {
  if (!dtype_valid(p.x_dtype)) return Status::kInvalidArgument;
  if (p.R < 0 || p.K < 0) return Status::kInvalidArgument;
  if (p.granularity != Fp8Granularity::kTensor && p.granularity != Fp8Granularity::kRow &&
      p.granularity != Fp8Granularity::kBlock) {
    return Status::kInvalidArgument;
  }
  if (p.granularity == Fp8Granularity::kBlock && (p.block_rows <= 0 || p.block_cols <= 0)) {
    return Status::kInvalidArgument;
  }
  const bool work = p.R > 0 && p.K > 0;
  if (work && (!p.x || !p.q || p.x_row_stride < p.K || p.q_row_stride < p.K)) {
    return Status::kInvalidArgument;
  }
  // A dynamic scale is written even without elements (the scale of an empty set: kFp8MinScale).
  const bool has_scales = p.granularity == Fp8Granularity::kTensor ||
                          (p.granularity == Fp8Granularity::kRow && p.R > 0) || work;
  if (has_scales && !p.scale) return Status::kInvalidArgument;
  if (p.granularity == Fp8Granularity::kBlock && work &&
      p.scale_row_stride < (p.K + p.block_cols - 1) / p.block_cols) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

Status fp8_quantize_cpu(const Fp8QuantizeParams& p, const CpuThreadPool* pool) {
  const Status st = fp8_quantize_check(p);
  if (st != Status::kSuccess) return st;
  const int64_t R = p.R, K = p.K;
  const DType t = p.x_dtype;

  if (p.granularity == Fp8Granularity::kTensor) {
    if (!p.static_scale) {
      // Fixed chunks (not one per thread): the result is the same whatever the pool.
      const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K, 1));
      const int64_t n_chunks = R > 0 && K > 0 ? (R + chunk - 1) / chunk : 0;
      std::vector<float> part(size_t(std::max<int64_t>(n_chunks, 1)), 0.f);
      parallel_for(pool, 0, n_chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          float m = 0.f;
          for (int64_t r = c * chunk; r < std::min(R, (c + 1) * chunk); ++r) {
            const float rm = amax_of(row_ptr(p, r), t, 0, K);
            m = (rm > m || rm != rm) ? rm : m;
          }
          part[size_t(c)] = m;
        }
      });
      float m = 0.f;
      for (int64_t c = 0; c < n_chunks; ++c) m = (part[c] > m || part[c] != part[c]) ? part[c] : m;
      p.scale[0] = scale_of(m);
    }
    const float s = p.scale[0];
    parallel_for(pool, 0, K > 0 ? R : 0, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)),
                 [&](int64_t b, int64_t e) {
                   for (int64_t r = b; r < e; ++r) {
                     quantize_of(row_ptr(p, r), t, 0, K, s, p.q + r * p.q_row_stride);
                   }
                 });
    return Status::kSuccess;
  }

  if (p.granularity == Fp8Granularity::kRow) {
    parallel_for(pool, 0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)),
                 [&](int64_t b, int64_t e) {
                   for (int64_t r = b; r < e; ++r) {
                     float* sp = p.scale + r * p.scale_row_stride;
                     if (!p.static_scale) *sp = scale_of(amax_of(row_ptr(p, r), t, 0, K));
                     quantize_of(row_ptr(p, r), t, 0, K, *sp, p.q + r * p.q_row_stride);
                   }
                 });
    return Status::kSuccess;
  }

  // kBlock: one task per block row (block_rows rows of x, every block along K).
  if (K == 0) return Status::kSuccess;
  const int64_t bm = p.block_rows, bk = p.block_cols;
  const int64_t n_brows = (R + bm - 1) / bm, n_bcols = (K + bk - 1) / bk;
  parallel_for(pool, 0, n_brows, 1, [&](int64_t b, int64_t e) {
    for (int64_t br = b; br < e; ++br) {
      const int64_t r0 = br * bm, r1 = std::min(R, r0 + bm);
      float* srow = p.scale + br * p.scale_row_stride;
      for (int64_t bc = 0; bc < n_bcols; ++bc) {
        const int64_t k0 = bc * bk, k1 = std::min(K, k0 + bk);
        if (!p.static_scale) {
          float m = 0.f;
          for (int64_t r = r0; r < r1; ++r) {
            const float rm = amax_of(row_ptr(p, r), t, k0, k1);
            m = (rm > m || rm != rm) ? rm : m;
          }
          srow[bc] = scale_of(m);
        }
        const float s = srow[bc];
        for (int64_t r = r0; r < r1; ++r) {
          quantize_of(row_ptr(p, r), t, k0, k1, s, p.q + r * p.q_row_stride);
        }
      }
    }
  });
  return Status::kSuccess;
}

}  // namespace bitpress
