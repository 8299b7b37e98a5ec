// float32 -> fp16 / bf16 row conversions (see convert.h).
//
// fp16: F16C's vcvtps2ph with imm8 = 0 (round to nearest even) is exactly IEEE RNE.
// bf16: the integer trick of float_to_bf16_bits in 8 / 16 lanes. Not vcvtneps2bf16 (AVX512_BF16):
// it treats denormal inputs as zero, which would break bit-exactness with the other backends.
#include "convert.h"

#include <string.h>

#include "isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress::cpu {
namespace {

void copy_f32(const float* x, void* y, int64_t n) { memcpy(y, x, size_t(n) * sizeof(float)); }

void f16_scalar(const float* x, void* y, int64_t n) {
  uint16_t* o = static_cast<uint16_t*>(y);
  for (int64_t i = 0; i < n; ++i) o[i] = float_to_half_bits(x[i]);
}

void bf16_scalar(const float* x, void* y, int64_t n) {
  uint16_t* o = static_cast<uint16_t*>(y);
  for (int64_t i = 0; i < n; ++i) o[i] = float_to_bf16_bits(x[i]);
}

#if defined(__x86_64__)
BITPRESS_TARGET_AVX2 void f16_avx2(const float* x, void* y, int64_t n) {
  uint16_t* o = static_cast<uint16_t*>(y);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), h);
  }
  for (; i < n; ++i) o[i] = float_to_half_bits(x[i]);
}

BITPRESS_TARGET_AVX2 void bf16_avx2(const float* x, void* y, int64_t n) {
  uint16_t* o = static_cast<uint16_t*>(y);
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet = _mm256_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + i));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, lsb)), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
    const __m256i r =
        _mm256_blendv_epi8(rounded, _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet), nan);
    // Pack 8 x 32-bit (values < 2^16) to 8 x 16-bit: packus works per 128-bit lane.
    const __m256i packed = _mm256_packus_epi32(r, r);
    const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm256_castsi256_si128(ordered));
  }
  for (; i < n; ++i) o[i] = float_to_bf16_bits(x[i]);
}

BITPRESS_TARGET_AVX512 void f16_avx512(const float* x, void* y, int64_t n) {
  uint16_t* o = static_cast<uint16_t*>(y);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), h);
  }
  for (; i < n; ++i) o[i] = float_to_half_bits(x[i]);
}

BITPRESS_TARGET_AVX512 void bf16_avx512(const float* x, void* y, int64_t n) {
  uint16_t* o = static_cast<uint16_t*>(y);
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(x + i));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs_mask), inf);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < n; ++i) o[i] = float_to_bf16_bits(x[i]);
}

#endif

}  // namespace

ConvertFn converter(DType out, CpuIsa isa) {
  if (out == DType::kFloat32) return copy_f32;
#if defined(__x86_64__)
  if (isa >= CpuIsa::kAvx512) {  // kAmx: the AVX-512 code
    if (out == DType::kFloat16) return f16_avx512;
    return bf16_avx512;
  }
  if (isa == CpuIsa::kAvx2) return out == DType::kFloat16 ? f16_avx2 : bf16_avx2;
#endif
  (void)isa;
  return out == DType::kFloat16 ? f16_scalar : bf16_scalar;
}

}  // namespace bitpress::cpu
