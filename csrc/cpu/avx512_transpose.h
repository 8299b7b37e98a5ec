// AVX-512 helpers of the CPU kernels that move float32 blocks between row and column order:
// a 16 x 16 transpose in registers, and a store of 16 float32 as float32 / float16 / bfloat16.
// fp8_gemm's epilogue (y^T tiles to y) and sparse24_gemm's panel path (x to x^T pairs, C^T to y)
// use them.
#pragma once

#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "common/isa.h"

#if defined(__x86_64__)
#include <immintrin.h>

namespace bitpress {

// 16 rows of floats -> 16 columns (r[i] holds row i; afterwards r[j] holds column j).
BITPRESS_TARGET_AVX512 inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 v2 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(v0, v1, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(v0, v1, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(v2, v3, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(v2, v3, 0xDD);
  }
}

// 16 float32 -> the output dtype at out + i, rounded to nearest even as dtype.h's helpers (NaN
// stays NaN).
BITPRESS_TARGET_AVX512 inline void store16(void* out, DType t, int64_t i, __m512 v) {
  if (t == DType::kFloat32) {
    _mm512_storeu_ps(static_cast<float*>(out) + i, v);
  } else if (t == DType::kFloat16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                        _mm512_cvtepi32_epi16(r));
  }
}

// 16 x 16 pairs of bf16 (32-bit words) from row-major to column-major: rows [0, 16) of src (row
// stride ld_src bf16 elements, any alignment; rows >= rows_valid read as zero) and pairs [0, 16)
// of each (pairs >= words_valid zero) become 16 runs of 16 words, run j (pair j of every row) at
// dst + j ld_dst. The VNNI-pair xᵀ of the CPU GEMMs built from bf16 x, one register transpose
// per block.
BITPRESS_TARGET_AVX512 inline void transpose_pairs16(const uint16_t* src, int64_t ld_src,
                                                     int64_t rows_valid, int64_t words_valid,
                                                     uint32_t* dst, int64_t ld_dst) {
  const __mmask16 mask = words_valid <= 0    ? 0
                         : words_valid >= 16 ? 0xFFFF
                                             : __mmask16((1u << words_valid) - 1);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < rows_valid ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mask, src + i * ld_src))
                          : _mm512_setzero_ps();
  }
  transpose16(r);
  for (int j = 0; j < 16; ++j) _mm512_storeu_ps(reinterpret_cast<float*>(dst + j * ld_dst), r[j]);
}

}  // namespace bitpress

#endif  // __x86_64__
