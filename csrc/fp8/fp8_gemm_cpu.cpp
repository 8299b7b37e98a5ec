// CPU kernel of fp8_gemm (W8A8) and the GEMM engine it shares with fp8_weight_gemm
// (fp8_gemm_engine.h: the transposed product on the bf16 microkernel, the decode, the scales).
//
// W8A8: both operands are E4M3 and decode exactly to bf16, so every product of the microkernel is
// the exact product of the two E4M3 values; a is decoded into the engine's xᵀ pairs (one term),
// b is the engine's weight. Sums are float32; the scales multiply the float32 sums (per tensor /
// row after the K loop, blockwise after each 128-long K block).
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
namespace fp8_cpu {
namespace {

thread_local ThreadBuffer t_panel;  // a task's decoded weight rows [NT, Kp] bf16
thread_local ThreadBuffer t_c;      // its float32 yᵀ block [NT, kCStride]
thread_local ThreadBuffer t_cb;     // one 128-long K block's product (block scales)
thread_local ThreadBuffer t_xp;     // the caller's xᵀ pairs (fp8_gemm)
thread_local ThreadBuffer t_xs;     // xᵀ in the strip kernel's K order

// Columns of xᵀ per microkernel call: a multiple of 16 (the microkernel's column step) and of the
// terms (those of a row stay in one chunk): 512, or 384 for 3 terms. With kKChunk, a call's B
// block is 128 pair rows x 512 columns (256 KiB, L2) and its float32 C block NT x 512 (up to
// 256 KiB, row stride kCStride). At M = 512 on one AMX core (4096 x 14336, cold, CPU time of the
// call) 512 columns measured ~1.07x faster than 192 and ~1.04x faster than 256 (fewer calls,
// more columns per A tile loaded from the panel), 384 and 1024 slower.
constexpr int64_t kCStride = 512;
inline int64_t col_chunk(int64_t terms) { return terms == 3 ? 384 : 512; }
// K per microkernel call (a multiple of 32, the AMX k-step; and of 128, the scale block); 128 and
// 512 measured slower at M = 512.
constexpr int64_t kKChunk = 256;
// Blocking of the panel engine for L2 (run_engine): the xᵀ slice of a K piece, and the C blocks
// of a group of tiles.
constexpr int64_t kXtWholeBytes = int64_t(3) << 19;  // 1.5 MiB
constexpr int64_t kXtPieceBytes = int64_t(640) << 10;
constexpr int64_t kCGroupBytes = int64_t(1) << 20;

struct Lut {
  uint16_t v[256];
  Lut() {
    for (int i = 0; i < 256; ++i) v[i] = e4m3_to_bf16_bits(uint8_t(i));
  }
};
const Lut kLut;

void decode_bf16_table(const uint8_t* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = kLut.v[src[i]];
}

#if defined(__x86_64__)
// 32 codes per step: sign-extend the bytes to 16 bits (bit 15 = sign), rebias the magnitude of
// normal codes by an add, take the 8 subnormal magnitudes from a vpermw table, NaN codes to the
// quiet NaN, then the sign back. 1 byte read per weight, the loads prefetched 1 KiB ahead (the
// rows of a task are contiguous: one stream).
BITPRESS_TARGET_AVX512 void decode_bf16_avx512(const uint8_t* src, uint16_t* dst, int64_t n) {
  const __m512i sub =
      _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                       0x3C60, 0x3C40, 0x3C20, 0x3C00, 0x3BC0, 0x3B80, 0x3B00, 0x0000);
  const __m512i m7f = _mm512_set1_epi16(0x7F), sgn = _mm512_set1_epi16(int16_t(0x8000));
  const __m512i bias = _mm512_set1_epi16(120 << 7), eight = _mm512_set1_epi16(8);
  const __m512i qnan = _mm512_set1_epi16(0x7FC0);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    if (i % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(src + i) + 1024, _MM_HINT_T0);
    const __m512i v =
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    const __m512i mag = _mm512_and_si512(v, m7f);
    __m512i r = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), bias);
    r = _mm512_mask_permutexvar_epi16(r, _mm512_cmplt_epu16_mask(mag, eight), mag, sub);
    r = _mm512_mask_mov_epi16(r, _mm512_cmpeq_epi16_mask(mag, m7f), qnan);
    r = _mm512_ternarylogic_epi32(r, v, sgn, 0xF8);  // r | (v & 0x8000)
    _mm512_storeu_si512(dst + i, r);
  }
  for (; i < n; ++i) dst[i] = kLut.v[src[i]];
}

// 64 codes per step with AVX512-VBMI: the low and high bytes of each bf16 from two 128-entry
// byte tables indexed by the 7-bit magnitude (vpermi2b ignores the sign bit of the index), the
// sign ORed into the high byte, the bytes interleaved by vpunpck{l,h}bw. The codes are permuted
// first so that the in-lane interleave comes out in order. NaN and subnormals are in the tables.
struct ByteTables {
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
  alignas(64) uint8_t perm[64];
  ByteTables() {
    for (int m = 0; m < 128; ++m) {
      const uint16_t b = e4m3_to_bf16_bits(uint8_t(m));
      lo[m] = uint8_t(b & 0xFF);
      hi[m] = uint8_t(b >> 8);
    }
    // Lane l of the permuted codes: codes 8l..8l+7, then codes 32+8l..32+8l+7.
    for (int l = 0; l < 4; ++l)
      for (int b = 0; b < 16; ++b)
        perm[16 * l + b] = uint8_t(b < 8 ? 8 * l + b : 32 + 8 * l + b - 8);
  }
};
const ByteTables kBytes;

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma,f16c"))) void
decode_bf16_vbmi(const uint8_t* src, uint16_t* dst, int64_t n, const uint8_t* next) {
  const __m512i lo0 = _mm512_load_si512(kBytes.lo), lo1 = _mm512_load_si512(kBytes.lo + 64);
  const __m512i hi0 = _mm512_load_si512(kBytes.hi), hi1 = _mm512_load_si512(kBytes.hi + 64);
  const __m512i perm = _mm512_load_si512(kBytes.perm), sgn = _mm512_set1_epi8(int8_t(0x80));
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    if (next) {
      // The engine decodes n-long pieces of rows K apart: past its piece a prefetch ahead in the
      // row fetches that row's next piece, used only after the whole panel (evicted by then), and
      // nothing of the next row's piece, which is decoded next. So the caller names that piece.
      _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T0);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(src + i) + 1024, _MM_HINT_T0);
      if (i + 8192 < n) _mm_prefetch(reinterpret_cast<const char*>(src + i) + 8192, _MM_HINT_T1);
    }
    const __m512i c = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(src + i));
    const __m512i l = _mm512_permutex2var_epi8(lo0, c, lo1);
    const __m512i h =
        _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, c, hi1), c, sgn, 0xF8);
    _mm512_storeu_si512(dst + i, _mm512_unpacklo_epi8(l, h));
    _mm512_storeu_si512(dst + i + 32, _mm512_unpackhi_epi8(l, h));
  }
  for (; i < n; ++i) dst[i] = kLut.v[src[i]];
}
#endif

inline float scale_at(const Fp8Scale& s, int64_t row) {
  return s.layout == Fp8ScaleLayout::kTensor ? s.data[0] : s.data[row * s.row_stride];
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

}  // namespace

bool decode_available(Fp8CpuOptions::Decode decode) {
  if (decode == Fp8CpuOptions::Decode::kTable) return true;
#if defined(__x86_64__)
  const CpuFeatures& f = cpu_features();
  const bool avx512 =
      f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx2 && f.fma && f.f16c;
  if (decode == Fp8CpuOptions::Decode::kAvx512) return avx512;
  // AVX512-VBMI: not in CpuFeatures; the OS state is that of AVX-512 (checked above).
  static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
  return avx512 && vbmi && decode == Fp8CpuOptions::Decode::kAvx512Vbmi;
#else
  return false;
#endif
}

void decode_bf16(const uint8_t* src, uint16_t* dst, int64_t n, Fp8CpuOptions::Decode decode,
                 const uint8_t* next) {
#if defined(__x86_64__)
  if (decode == Fp8CpuOptions::Decode::kAvx512Vbmi) return decode_bf16_vbmi(src, dst, n, next);
  if (decode == Fp8CpuOptions::Decode::kAvx512) return decode_bf16_avx512(src, dst, n);
#endif
  (void)decode;
  decode_bf16_table(src, dst, n);
}

namespace {

// y[m, n] = (sum of m's terms) * scales + bias, rounded once to the output; for outputs (m, n) of
// the yᵀ block c [nt rows (n0 + r), columns c0 .. c0 + cc), row stride kCStride.
void epilogue_scalar(const EngineArgs& e, const float* c, int64_t n0, int64_t r0, int64_t r1,
                     int64_t c0, int64_t m0, int64_t m1, bool block) {
  const int64_t T = e.terms;
  for (int64_t m = m0; m < m1; ++m) {
    const float sx = (!block && e.x_scale.data) ? scale_at(e.x_scale, m) : 1.f;
    const float* cm = c + (m * T - c0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = n0 + r;
      const float* cr = cm + r * kCStride;
      float v = cr[0];
      for (int64_t t = 1; t < T; ++t) v += cr[t];
      if (!block) v = v * sx * scale_at(e.w_scale, n);
      if (e.bias) v += load_as_float(e.bias, e.bias_dtype, n);
      store(e.out, e.out_dtype, m * e.ldo + n, v);
    }
  }
}

#if defined(__x86_64__)
// Blocks of 16 n x 16 m: 16 rows of yᵀ per part loaded and transposed in registers, the parts
// added, scaled and stored as 16 contiguous outputs of row m; the ragged edges go scalar.
BITPRESS_TARGET_AVX512 void epilogue_avx512(const EngineArgs& e, const float* c, int64_t n0,
                                            int64_t nt, int64_t c0, int64_t m0, int64_t m1,
                                            bool block) {
  const int64_t T = e.terms, r16 = nt / 16 * 16, m16 = m0 + (m1 - m0) / 16 * 16;
  for (int64_t r0 = 0; r0 < r16; r0 += 16) {
    alignas(64) float sw[16], bias[16];
    for (int i = 0; i < 16; ++i) {
      sw[i] = block ? 1.f : scale_at(e.w_scale, n0 + r0 + i);
      bias[i] = e.bias ? load_as_float(e.bias, e.bias_dtype, n0 + r0 + i) : 0.f;
    }
    const __m512 vsw = _mm512_load_ps(sw), vb = _mm512_load_ps(bias);
    for (int64_t mb = m0; mb < m16; mb += 16) {
      __m512 acc[16];
      for (int64_t t = 0; t < T; ++t) {
        // Part t of the 16 m's: columns (mb + i) * T + t, gathered 16 at a time when T > 1.
        __m512 r[16];
        for (int i = 0; i < 16; ++i) {
          const float* row = c + (r0 + i) * kCStride + (mb * T - c0);
          if (T == 1) {
            r[i] = _mm512_loadu_ps(row);
          } else {
            const __m512i idx = _mm512_add_epi32(
                _mm512_mullo_epi32(
                    _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                    _mm512_set1_epi32(int(T))),
                _mm512_set1_epi32(int(t)));
            r[i] = _mm512_i32gather_ps(idx, row, 4);
          }
        }
        transpose16(r);
        for (int j = 0; j < 16; ++j) acc[j] = t == 0 ? r[j] : _mm512_add_ps(acc[j], r[j]);
      }
      for (int j = 0; j < 16; ++j) {
        const int64_t m = mb + j;
        const float sx = (!block && e.x_scale.data) ? scale_at(e.x_scale, m) : 1.f;
        const __m512 v =
            block ? acc[j] : _mm512_mul_ps(_mm512_mul_ps(acc[j], _mm512_set1_ps(sx)), vsw);
        store16(e.out, e.out_dtype, m * e.ldo + n0 + r0, _mm512_add_ps(v, vb));
      }
    }
    epilogue_scalar(e, c, n0, r0, r0 + 16, c0, m16, m1, block);
  }
  epilogue_scalar(e, c, n0, r16, nt, c0, m0, m1, block);
}
#endif

void epilogue(const EngineArgs& e, const float* c, int64_t n0, int64_t nt, int64_t c0, int64_t cc,
              bool block, bool avx512) {
  const int64_t m0 = c0 / e.terms, m1 = std::min(e.M, (c0 + cc) / e.terms);
#if defined(__x86_64__)
  if (avx512) return epilogue_avx512(e, c, n0, nt, c0, m0, m1, block);
#endif
  (void)avx512;
  epilogue_scalar(e, c, n0, 0, nt, c0, m0, m1, block);
}

#if defined(__x86_64__)
#define BITPRESS_TARGET_AMX_VBMI                                                \
  __attribute__((                                                               \
      target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi," \
             "avx2,fma,f16c")))

// ------------------------------------------------------------------------------------------
// The strip kernel: AMX with few columns (xᵀ of at most 64 columns: M * terms <= 64)
// ------------------------------------------------------------------------------------------
// At 16 columns the panel engine is bound by its round trips through L2, not the products: per 32
// weight rows x 32 of K it writes the decoded panel (2 KiB), then tile-loads it back (2 KiB) and
// a B tile (1 KiB) for 2 tdpbf16ps (32 cycles): ~100 B per cycle, above what L2 serves, and the
// weight stream from memory stops while a panel is multiplied. The strip kernel instead walks K
// once for a strip of 32 weight rows (2 row tiles), keeping its C tiles in the tile registers over
// the whole K: per 64 of K it decodes the strip's 64-byte code lines (one cache line per row,
// prefetched kStripPrefetchLines lines ahead) into a 4 KiB buffer laid out as whole A tiles
// (stride 64 B: it stays in L1), then tile-loads A from there and B once per K step for both row
// tiles. The weight stream does not stop, and L2 carries only B (1 KiB per 32 rows x 32 of K).
// Measured (4096 x 14336, M = 16, bf16 x, cold, CPU time of one call on one AMX core): panel
// engine 9.1-9.5 ms, strips of 64 rows 6.9-7.5, of 32 rows 5.7-6.0, of 16 rows 6.4-6.8; the
// prefetch 4 lines ahead beat 2, 3, 5, 6, 8 and 16 lines, and a prefetch into L2 only (T1) or
// none at all was 1.6-1.9x slower; a double buffer gained nothing.
//
// The decode writes each 64-code line as vpunpck{l,h}bw leave it, without the VBMI decode's
// pre-permute: the low unpack holds codes {0-7, 16-23, 32-39, 48-55} of the line (K step 0 of the
// line), the high one codes {8-15, 24-31, 40-47, 56-63} (K step 1), two bf16 per pair in K order.
// So xᵀ is permuted to match: pair j of K step s of 64-block b is natural pair 32 b + 8 (j / 4) +
// 4 s + j % 4 (strip_xp below). The products are those of the engine, summed in another order.
constexpr int64_t kStripRows = 32;
constexpr int kStripPrefetchLines = 4;
// Columns of xᵀ up to which the strip kernel runs, in passes of 32 columns over each strip (the
// later passes read the strip's codes from L2). CPU time on one AMX core, 4096 x 14336, against
// the panel engine: M = 48 12.5 vs 16.2 ms, M = 64 14.2 vs 16.6, M = 96 20.3 vs 21.1 (noise), M =
// 128 31.1 vs 26.2 (there the panel engine's A tiles serve more columns per load).
constexpr int64_t kStripMaxColumns = 64;

// The permuted xᵀ [Kp64/2, ldx] from the engine's natural xᵀ [Kp/2, ldx] (pair rows past Kp/2
// zero).
void strip_xp(const uint32_t* xp, int64_t Kp, int64_t ldx, int64_t Kp64, uint32_t* out) {
  for (int64_t q = 0; q < Kp64 / 2; ++q) {
    const int64_t b = q / 32, s = (q % 32) / 16, j = q % 16;
    const int64_t src = 32 * b + 8 * (j / 4) + 4 * s + j % 4;
    if (src < Kp / 2) {
      memcpy(out + q * ldx, xp + src * ldx, size_t(ldx) * 4);
    } else {
      memset(out + q * ldx, 0, size_t(ldx) * 4);
    }
  }
}

struct alignas(64) StripTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles (all 16 rows x 64 bytes): C 0..3 (row tile t, column tile c: t * NC + c), B 4 (and 5 when
// NC = 2), A 6 and 7 (one per row tile, so that the second load does not wait for the tdpbf16ps
// reading the first).
template <int NC>
BITPRESS_TARGET_AMX_VBMI inline void strip_dp(int t, const uint16_t* a) {
  constexpr int64_t kStride = 64;
  if (t == 0) {
    _tile_loadd(6, a, kStride);
    _tile_dpbf16ps(0, 6, 4);
    if constexpr (NC == 2) _tile_dpbf16ps(1, 6, 5);
  } else if constexpr (NC == 1) {
    _tile_loadd(7, a, kStride);
    _tile_dpbf16ps(1, 7, 4);
  } else {
    _tile_loadd(7, a, kStride);
    _tile_dpbf16ps(2, 7, 4);
    _tile_dpbf16ps(3, 7, 5);
  }
}

// One pass over a strip: rows n0 .. n0 + nt (nt <= 32) of W, all of K, xp's columns 0 .. 16 NC ->
// c [32, kCStride] float32 (the engine's C block), columns 0 .. 16 NC. buf: 2 K steps x 32 rows x
// 64 bytes, 64-byte aligned. prefetch: the codes come from memory (the first pass), not L2.
template <int NC>
BITPRESS_TARGET_AMX_VBMI void strip_run(const EngineArgs& e, const uint32_t* xp, int64_t Kp64,
                                        int64_t n0, int64_t nt, uint16_t* buf, float* c,
                                        bool prefetch) {
  constexpr int RT = 2, R = kStripRows;
  StripTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const __m512i lo0 = _mm512_load_si512(kBytes.lo), lo1 = _mm512_load_si512(kBytes.lo + 64);
  const __m512i hi0 = _mm512_load_si512(kBytes.hi), hi1 = _mm512_load_si512(kBytes.hi + 64);
  const __m512i sgn = _mm512_set1_epi8(int8_t(0x80));
  const int64_t K = e.K, ldw = e.ldw, ldb = e.ldx * 4;
  const uint8_t* w = e.w + n0 * ldw;
  for (int64_t k0 = 0; k0 < Kp64; k0 += 64) {
    // Decode the strip's codes [k0, k0 + 64): row r's line -> A rows r of K steps 0 and 1.
    const __mmask64 mask = K - k0 >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k0)) - 1;
    uint16_t* dst = buf;
    for (int r = 0; r < R; ++r, dst += 32) {
      __m512i v = _mm512_setzero_si512();
      if (r < nt) {
        const uint8_t* src = w + r * ldw + k0;
        if (prefetch) {
          _mm_prefetch(reinterpret_cast<const char*>(src) + 64 * kStripPrefetchLines, _MM_HINT_T0);
        }
        v = _mm512_maskz_loadu_epi8(mask, src);
      }
      const __m512i l = _mm512_permutex2var_epi8(lo0, v, lo1);
      const __m512i h = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, v, hi1), v, sgn,
                                                  0xF8);  // h | (v & 0x80)
      _mm512_store_si512(dst, _mm512_unpacklo_epi8(l, h));
      _mm512_store_si512(dst + 32 * R, _mm512_unpackhi_epi8(l, h));
    }
    for (int s = 0; s < 2; ++s) {
      const uint32_t* b = xp + (k0 / 2 + 16 * s) * e.ldx;
      _tile_loadd(4, b, ldb);
      if constexpr (NC == 2) _tile_loadd(5, b + 16, ldb);
      for (int t = 0; t < RT; ++t) strip_dp<NC>(t, buf + (s * R + 16 * t) * 32);
    }
  }
  const int64_t ldc = kCStride * 4;
  _tile_stored(0, c, ldc);
  if constexpr (NC == 1) {
    _tile_stored(1, c + 16 * kCStride, ldc);
  } else {
    _tile_stored(1, c + 16, ldc);
    _tile_stored(2, c + 16 * kCStride, ldc);
    _tile_stored(3, c + 16 * kCStride + 16, ldc);
  }
}
#endif

}  // namespace

Status run_engine(const EngineArgs& e, const CpuThreadPool* pool, const Fp8CpuOptions& o) {
  if (!cpu::gemm_kernel_available(o.kernel)) return Status::kUnsupported;
  if (!decode_available(o.decode)) return Status::kUnsupported;
  const int64_t M = e.M, N = e.N, K = e.K, Kp = e.Kp, T = e.terms, ldx = e.ldx;
  if (M == 0 || N == 0) return Status::kSuccess;
  const bool block = e.w_scale.layout == Fp8ScaleLayout::kBlock;
  // Rows of W per task: the decoded panel [NT, PK] bf16 stays within ~1 MiB (L2). Each task
  // streams all of xᵀ (Kp/2 x ldx pairs) once: with many columns (large M) that stream, N / NT
  // times per call, costs more than the panel, so NT grows to 128 from 192 columns on (1.05x at
  // M = 256), and with AMX the panel may take 2 MiB (it spills L2 in part, but xᵀ is streamed
  // half as often: at M = 512, 4096 x 14336, CPU time on one AMX core, 240 rows measured 1.06x
  // faster than 128 in two runs, 192 as fast as 240; neutral on the AVX512-BF16 and AVX2 paths,
  // not taken there: Zen 5 has 1 MiB of L2 per core). At least 8 tasks where N allows, so that
  // the pool has work to balance.
  const bool wide = ldx > 192;
  const bool amx = o.kernel == cpu::GemmKernel::kAmx;
  const int64_t max_nt = wide ? (amx ? 256 : 128) : 64;
  const int64_t panel_bytes = wide && amx ? 2 << 20 : 1 << 20;
  // Columns computed: xᵀ's used columns rounded up to the microkernel's 16, not ldx (whose extra
  // 16 columns only shift the rows of xp in the L1 sets).
  const int64_t ncols = (M * T + 15) / 16 * 16, chunk = col_chunk(T);
  // K per panel: the panels of a task walk K in PK-long pieces (a multiple of 128, the scale
  // block), so that NT does not shrink with K: each task streams all of xᵀ once, and N / NT
  // tasks stream it N / NT times (for K = 14336 and whole-K panels, NT = 32: 128 x 15 MiB of xᵀ
  // per call at M = 512).
  int64_t PK = std::min(Kp, std::max<int64_t>(128, o.panel_k / 128 * 128));
  // Where all of xᵀ (Kp / 2 pair rows x ldx) is larger than kXtWholeBytes, PK is also at most
  // 4096 / 2^j long so that a piece's slice stays within kXtPieceBytes (L2): the tiles of a group
  // (below) then read it from L2, not L3. (An xᵀ of ~1.2 MiB, K = 4096 at M = 128, stays
  // L2-resident whole: halving PK there measured 7% slower.)
  // (The budgets are for the 2 MiB L2 of the Intel AMX cores; halved for the other variants: Zen 5
  // has 1 MiB per core. Not measured there.)
  const int l2_shift = amx ? 0 : 1;
  if (Kp * ldx * 2 > (kXtWholeBytes >> l2_shift)) {
    while (PK > 512 && PK % 256 == 0 && PK * ldx * 2 > (kXtPieceBytes >> l2_shift)) PK /= 2;
  }
  const int64_t n_pk = std::max<int64_t>(1, (Kp + PK - 1) / std::max<int64_t>(PK, 1));
  int64_t NT =
      std::max<int64_t>(16, std::min<int64_t>(max_nt, panel_bytes / (2 * (PK + 32)) / 16 * 16));
  while (NT > 16 && (N + NT - 1) / NT < 8) NT = std::max<int64_t>(16, NT / 2 / 16 * 16);
  const int64_t n_tiles = (N + NT - 1) / NT;
  // Tiles per group: with K in several pieces, a thread runs each piece over a group of tiles
  // whose C blocks (float32, accumulated across the pieces) fit in kCGroupBytes, before the next
  // piece, so that a piece's slice of xᵀ is read from L3 once per group instead of once per tile.
  // 14336 x 4096, M = 128, CPU time on one AMX core: 29.0 ms (whole-K tiles, xᵀ 4 MiB from L3
  // per tile) -> 21.4 ms (PK 2048, groups of 8; with the next row's piece prefetched).
  // One C block per column chunk when K spans several panels (they accumulate across the panels),
  // else one reused block; c_tile floats per tile.
  const int64_t c_blocks = n_pk > 1 ? (ncols + chunk - 1) / chunk : 1;
  const int64_t c_tile = c_blocks * NT * kCStride;
  const int64_t group =
      n_pk == 1
          ? 1
          : std::max<int64_t>(1, std::min<int64_t>(16, (kCGroupBytes >> l2_shift) /
                                                           (c_tile * int64_t(sizeof(float)))));
  Status status = Status::kSuccess;
#if defined(__x86_64__)
  if (o.strip && o.kernel == cpu::GemmKernel::kAmx &&
      o.decode == Fp8CpuOptions::Decode::kAvx512Vbmi && !block && ldx <= kStripMaxColumns) {
    const int64_t Kp64 = (K + 63) / 64 * 64;
    uint32_t* xs = static_cast<uint32_t*>(t_xs.get(size_t(Kp64 / 2 * ldx) * 4 + 64));
    if (!xs) return Status::kOutOfMemory;
    strip_xp(e.xp, Kp, ldx, Kp64, xs);
    constexpr int64_t R = kStripRows;
    const int64_t n_strips = (N + R - 1) / R;
    parallel_for(pool, 0, n_strips, 1, [&](int64_t tb, int64_t te) {
      uint16_t* buf = static_cast<uint16_t*>(t_panel.get(size_t(2 * R * 64) + 64));
      float* c = static_cast<float*>(t_c.get(size_t(R * kCStride) * 4 + 64));
      if (!buf || !c) {
        status = Status::kOutOfMemory;
        return;
      }
      for (int64_t strip = tb; strip < te; ++strip) {
        const int64_t n0 = strip * R, nt = std::min(R, N - n0);
        for (int64_t cp = 0; cp < ldx; cp += 32) {
          if (ldx - cp <= 16) {
            strip_run<1>(e, xs + cp, Kp64, n0, nt, buf, c + cp, cp == 0);
          } else {
            strip_run<2>(e, xs + cp, Kp64, n0, nt, buf, c + cp, cp == 0);
          }
        }
        epilogue(e, c, n0, nt, 0, ldx, false, true);
      }
      // This loop configured the tiles itself: the microkernel's cached configuration is stale.
      cpu::gemm_amx_thread_begin();
    });
    return status;
  }
#endif

  parallel_for(pool, 0, n_tiles, 1, [&](int64_t tb, int64_t te) {
    // Panel rows one cache line longer than PK: rows 4096 apart (8 KiB) would all fall in the same
    // L1 sets, and the microkernel reads 16-32 of them at once (a tile).
    const int64_t lda = PK + 32;
    uint16_t* panel = static_cast<uint16_t*>(t_panel.get(size_t(NT * lda) * 2 + 64));
    float* c = static_cast<float*>(t_c.get(size_t(group * c_tile) * 4 + 64));
    float* cb = block ? static_cast<float*>(t_cb.get(size_t(NT * kCStride) * 4 + 64)) : nullptr;
    if (!panel || !c || (block && !cb)) {
      status = Status::kOutOfMemory;
      return;
    }
    for (int64_t tg = tb; tg < te; tg += group) {
      for (int64_t pk = 0; pk < n_pk; ++pk) {
        for (int64_t tile = tg; tile < std::min(te, tg + group); ++tile) {
          const int64_t n0 = tile * NT, nt = std::min(NT, N - n0);
          // The panel: rows n0 .. n0 + nt, K from ka, kn long (a multiple of 32; zero past K).
          const int64_t ka = pk * PK, kn = std::min(PK, Kp - ka);
          const int64_t valid = std::max<int64_t>(0, std::min(kn, K - ka));
          for (int64_t r = 0; r < nt; ++r) {
            uint16_t* dst = panel + r * lda;
            // Prefetch the next row's piece (the last row of the call: none, its own ahead).
            const uint8_t* src = e.w + (n0 + r) * e.ldw + ka;
            decode_bf16(src, dst, valid, o.decode, n0 + r + 1 < N ? src + e.ldw : nullptr);
            memset(dst + valid, 0, size_t(kn - valid) * 2);
          }
          const bool last = pk == n_pk - 1;
          for (int64_t c0 = 0, ci = 0; c0 < ncols; c0 += chunk, ++ci) {
            const int64_t cc = std::min(chunk, ncols - c0);
            float* cblk = c + (tile - tg) * c_tile + (c_blocks > 1 ? ci * NT * kCStride : 0);
            cpu::GemmBf16Args g;
            g.a = panel;
            g.lda = lda;
            g.ldb = ldx;
            g.ldc = kCStride;
            g.M = nt;
            g.N = cc;
            if (!block) {
              // K in chunks: each call's A block (32 rows x kKChunk) and B block (kKChunk x 32
              // columns) stay in L1 across the microkernel's loops; C accumulates in L1 / L2.
              if (Kp == 0) {
                for (int64_t r = 0; r < nt; ++r) memset(cblk + r * kCStride, 0, size_t(cc) * 4);
              }
              for (int64_t k0 = 0; k0 < kn; k0 += kKChunk) {
                g.a = panel + k0;
                g.b = e.xp + ((ka + k0) / 2) * ldx + c0;
                g.c = cblk;
                g.K = std::min(kKChunk, kn - k0);
                g.accumulate = ka + k0 > 0;
                const Status st = cpu::gemm_bf16(o.kernel, g);
                if (st != Status::kSuccess) {
                  status = st;
                  return;
                }
              }
            } else {
              if (pk == 0) {
                for (int64_t r = 0; r < nt; ++r) memset(cblk + r * kCStride, 0, size_t(cc) * 4);
              }
              for (int64_t k0 = 0; k0 < kn; k0 += kFp8ScaleBlock) {
                const int64_t kb = (ka + k0) / kFp8ScaleBlock;  // PK is a multiple of the block
                g.a = panel + k0;
                g.b = e.xp + ((ka + k0) / 2) * ldx + c0;
                g.c = cb;
                g.K = std::min(kFp8ScaleBlock, kn - k0);
                g.accumulate = false;
                const Status st = cpu::gemm_bf16(o.kernel, g);
                if (st != Status::kSuccess) {
                  status = st;
                  return;
                }
                // yᵀ += s_w(n, kb) s_x(m, kb) * (this block's float32 sum), in float32.
                for (int64_t r = 0; r < nt; ++r) {
                  const float sw =
                      e.w_scale.data[((n0 + r) / kFp8ScaleBlock) * e.w_scale.row_stride + kb];
                  float* cr = cblk + r * kCStride;
                  const float* br = cb + r * kCStride;
                  if (!e.x_scale.data) {
                    for (int64_t j = 0; j < cc; ++j) cr[j] += sw * br[j];
                  } else {
                    for (int64_t j = 0; j < cc; ++j) {
                      const int64_t m = std::min((c0 + j) / T, M - 1);  // padding columns hold 0
                      cr[j] += sw * e.x_scale.data[m * e.x_scale.row_stride + kb] * br[j];
                    }
                  }
                }
              }
            }
            if (last) {
              epilogue(e, cblk, n0, nt, c0, cc, block, o.decode != Fp8CpuOptions::Decode::kTable);
            }
          }
        }
      }
    }
  });
  return status;
}

}  // namespace fp8_cpu

Fp8CpuOptions fp8_cpu_default_options() {
  Fp8CpuOptions o;
  const CpuIsa isa = active_cpu_isa();
  o.kernel = isa >= CpuIsa::kAvx2 ? cpu::gemm_bf16_kernel_for_active_isa()
                                  : cpu::GemmKernel::kAvx512Bf16Emulated;
  using D = Fp8CpuOptions::Decode;
  o.decode = isa < CpuIsa::kAvx512                       ? D::kTable
             : fp8_cpu::decode_available(D::kAvx512Vbmi) ? D::kAvx512Vbmi
             : fp8_cpu::decode_available(D::kAvx512)     ? D::kAvx512
                                                         : D::kTable;
  o.dot_isa = isa >= CpuIsa::kAvx512 ? CpuIsa::kAvx512
              : isa >= CpuIsa::kAvx2 ? CpuIsa::kAvx2
                                     : CpuIsa::kScalar;
  // The float32 dot-product path wins over the microkernel where the microkernel's 16-column
  // step is mostly padding and no AMX does the products (AMX takes M = 1..16 at one price). At
  // M = 1 it won with AMX too against the panel engine (1.3x F.linear bf16 against 1.0x); the
  // strip kernel, which also decodes and multiplies as the weight streams in, measured the same
  // at M = 1 (CPU time on one core, 4096 x 14336: 5.9-6.1 vs 6.1-6.3 ms) and 1.7x faster than
  // the dot path at M = 4, so with AMX the dot path keeps M = 1 only.
  o.dot_max_rows = o.kernel == cpu::GemmKernel::kAmx ? 1 : 4;
  // M = 1: 4 weight streams per thread with AVX-512 (4096 x 14336, one thread, cold: 1 / 2 / 4
  // streams 5.1 / 4.6 / 4.2 ms); with AVX2 (8 codes per step), 2 measured 4-9% faster than 4 in
  // four runs out of four (6.3-7.4 vs 6.9-7.9 ms; AVX2 code on the AVX-512 Xeon: bench/NOTES.md).
  o.dot_streams = o.dot_isa == CpuIsa::kAvx2 ? 2 : 4;
  return o;
}

namespace {

bool scale_ok(const Fp8Scale& s) {
  return s.data && (s.layout == Fp8ScaleLayout::kTensor || s.layout == Fp8ScaleLayout::kRow ||
                    s.layout == Fp8ScaleLayout::kBlock);
}

}  // namespace

Status fp8_gemm_check(const Fp8GemmParams& p) {
  if (p.M < 0 || p.N < 0 || p.K < 0) return Status::kInvalidArgument;
  if (!dtype_valid(p.out_dtype) || (p.bias && !dtype_valid(p.bias_dtype)))
    return Status::kInvalidArgument;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  if (!p.out || p.ldo < p.N || !scale_ok(p.scale_a) || !scale_ok(p.scale_b))
    return Status::kInvalidArgument;
  const bool ba = p.scale_a.layout == Fp8ScaleLayout::kBlock;
  if (ba != (p.scale_b.layout == Fp8ScaleLayout::kBlock)) return Status::kInvalidArgument;
  if (p.K > 0 && (!p.a || !p.b || p.lda < p.K || p.ldb < p.K)) return Status::kInvalidArgument;
  return Status::kSuccess;
}

Status fp8_gemm_cpu_with(const Fp8GemmParams& p, const CpuThreadPool* pool,
                         const Fp8CpuOptions& options) {
  const Status st = fp8_gemm_check(p);
  if (st != Status::kSuccess) return st;
  using namespace fp8_cpu;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  EngineArgs e;
  e.M = p.M;
  e.N = p.N;
  e.K = p.K;
  e.Kp = engine_kp(p.K);
  e.terms = 1;
  e.ldx = engine_ldx(p.M, 1);
  // aᵀ as bf16 pairs [Kp/2, ldx]: decode 16 rows of a at a time, then interleave their pairs.
  uint32_t* xp = static_cast<uint32_t*>(t_xp.get(size_t(e.Kp / 2 * e.ldx) * 4 + 64));
  uint16_t* rows = static_cast<uint16_t*>(t_panel.get(size_t(16 * e.Kp) * 2 + 64));
  if (!xp || !rows) return Status::kOutOfMemory;
  for (int64_t m0 = 0; m0 < e.ldx; m0 += 16) {
    for (int64_t i = 0; i < 16; ++i) {
      uint16_t* dst = rows + i * e.Kp;
      if (m0 + i < p.M) {
        decode_bf16(p.a + (m0 + i) * p.lda, dst, p.K, options.decode);
        memset(dst + p.K, 0, size_t(e.Kp - p.K) * 2);
      } else {
        memset(dst, 0, size_t(e.Kp) * 2);
      }
    }
#if defined(__x86_64__)
    if (active_cpu_isa() >= CpuIsa::kAvx512) {
      // 16 x 16 blocks of pairs transposed in registers (the strided scalar interleave was the
      // slowest part of W8A8 at M = 512).
      for (int64_t q0 = 0; q0 < e.Kp / 2; q0 += 16) {
        transpose_pairs16(rows + 2 * q0, e.Kp, 16, 16, xp + q0 * e.ldx + m0, e.ldx);
      }
      continue;
    }
#endif
    const uint32_t* rp = reinterpret_cast<const uint32_t*>(rows);
    for (int64_t q = 0; q < e.Kp / 2; ++q) {
      for (int64_t i = 0; i < 16; ++i) xp[q * e.ldx + m0 + i] = rp[i * (e.Kp / 2) + q];
    }
  }
  e.xp = xp;
  e.w = p.b;
  e.ldw = p.ldb;
  e.w_scale = p.scale_b;
  e.x_scale = p.scale_a;
  e.bias = p.bias;
  e.bias_dtype = p.bias_dtype;
  e.out = p.out;
  e.out_dtype = p.out_dtype;
  e.ldo = p.ldo;
  return run_engine(e, pool, options);
}

Status fp8_gemm_cpu(const Fp8GemmParams& p, const CpuThreadPool* pool) {
  return fp8_gemm_cpu_with(p, pool, fp8_cpu_default_options());
}

}  // namespace bitpress
