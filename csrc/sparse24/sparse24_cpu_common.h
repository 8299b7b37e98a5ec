// Helpers shared by the 2:4 CPU kernels (private to csrc/sparse24): the metadata check of a row
// and the store of one output element.
#pragma once

#include <stdint.h>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/sparse24/sparse24.h"
#include "common/isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress::sparse24_detail {

#if defined(__x86_64__)
// 32 metadata bytes per step: both nibbles looked up in a 16-entry table (vpshufb), so that the
// check costs a few instructions per 256 weights and the kernels can run it on every row.
BITPRESS_TARGET_AVX2 inline bool meta_rows_ok_avx2(const uint8_t* m, int64_t len) {
  const __m256i table = _mm256_setr_epi8(0, 0, 0, 0, -1, 0, 0, 0, -1, -1, 0, 0, -1, -1, -1, 0, 0, 0,
                                         0, 0, -1, 0, 0, 0, -1, -1, 0, 0, -1, -1, -1, 0);
  const __m256i low = _mm256_set1_epi8(0x0F);
  int64_t i = 0;
  __m256i all = _mm256_set1_epi8(-1);
  for (; i + 32 <= len; i += 32) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + i));
    const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(b, low));
    const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(b, 4), low));
    all = _mm256_and_si256(all, _mm256_and_si256(lo, hi));
  }
  if (_mm256_movemask_epi8(all) != -1) return false;
  for (; i < len; ++i) {
    if (!sparse24_meta_byte_valid(m[i])) return false;
  }
  return true;
}

// The same, 64 bytes per step, for the AVX-512 kernels (inlined into them: no call to SSE code).
BITPRESS_TARGET_AVX512 inline bool meta_rows_ok_avx512(const uint8_t* m, int64_t len) {
  const __m512i table =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 0, 0, -1, 0, 0, 0, -1, -1, 0, 0, -1, -1, -1, 0));
  const __m512i low = _mm512_set1_epi8(0x0F);
  int64_t i = 0;
  __m512i all = _mm512_set1_epi8(-1);
  for (; i + 64 <= len; i += 64) {
    const __m512i b = _mm512_loadu_si512(m + i);
    const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(b, low));
    const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(b, 4), low));
    all = _mm512_ternarylogic_epi32(all, lo, hi, 0x80);  // all & lo & hi
  }
  if (_mm512_movepi8_mask(all) != ~__mmask64(0)) return false;
  for (; i < len; ++i) {
    if (!sparse24_meta_byte_valid(m[i])) return false;
  }
  return true;
}
#endif

// Whether every nibble of the `len` metadata bytes at m is ordered (idx0 < idx1).
inline bool meta_rows_ok(const uint8_t* m, int64_t len) {
#if defined(__x86_64__)
  if (active_cpu_isa() >= CpuIsa::kAvx2) return meta_rows_ok_avx2(m, len);
#endif
  for (int64_t i = 0; i < len; ++i) {
    if (!sparse24_meta_byte_valid(m[i])) return false;
  }
  return true;
}

// out[m, n] = v + bias[n], rounded once to `dtype` (out rows `ld` elements apart).
inline void store_row_value(void* out, DType dtype, int64_t ld, int64_t m, int64_t n, float v,
                            const void* bias, DType bias_dtype) {
  if (bias) v += load_as_float(bias, bias_dtype, n);
  const int64_t i = m * ld + n;
  switch (dtype) {
    case DType::kFloat16:
      static_cast<uint16_t*>(out)[i] = float_to_half_bits(v);
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(out)[i] = float_to_bf16_bits(v);
      break;
    default:
      static_cast<float*>(out)[i] = v;
  }
}

}  // namespace bitpress::sparse24_detail
