// W4A8 int4_gemm on the CPU (opt-in; see bitpress/int4/int4_gemm.h, int4_gemm_w4a8_cpu):
// x quantized per row to int8, int8 x int4 products summed exactly in int32 per group, the group
// folded in float32:
//
//   sx[m]    = amax_k |x[m, k]| / 127 (float32 division; 1 when amax is 0)
//   xq[m, k] = round_half_even(x[m, k] / sx[m]) (float32 division), clamped to [-127, 127]
//   C[m, g, n] = sum_{k in g} xq[m, k] q[k, n]                        (int32, exact)
//   acc[m, n]  = sum_g fma(s[g, n], float(C[m, g, n] - z[g, n] xqsum[m, g]), acc)   (float32)
//   y[m, n]    = acc[m, n] sx[m] + bias[n]
//
// The weights enter as unsigned q in [0, 15] (their zero point is removed per group with the sum
// of xq over the group, as on the bf16 path: exact in int32), so the unsigned x signed products of
// vpdpbusd take q as the unsigned operand and xq as the signed one: no +128 offset is needed.
//
// Decode: word [t, o, c] of the tile layout holds rows (0,2,4,6,1,3,5,7) of octet o in nibbles
// 0..7. (word & 0x0F0F0F0F) is the int8 quad of rows (0,4,1,5) and ((word >> 4) & 0x0F0F0F0F) that
// of rows (2,6,3,7): one shift and one and per 4 weights. x is quantized into the same order
// (kQuadRow below), so each quad's 4 products pair the right values; the int32 sums do not depend
// on the order.
//
// Variants (int4_w4a8_kernel_for): AMX-INT8 (tdpbssd on tiles: A 16 rows x 64 int8 of x, B 16 quad
// rows x 16 columns, C 16 x 16 int32; 4 C tiles = 16 rows x 64 columns, K steps of 64 over a
// group's decoded panel; groups must be whole 64-row steps), AVX512-VNNI (vpdpbusd, blocks of up to
// 4 rows x 64 columns in registers, decoded in registers), scalar (same loops), and an emulation of
// the AMX variant (the same loop nest with a scalar model of the tiles), for tests on CPUs without
// AMX. All variants compute the same int32 sums and the same float32 fold in the same order: their
// outputs are equal bit for bit.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "bitpress/cpu/gemm_microkernel.h"
#include "bitpress/int4/int4_gemm.h"
#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_buffer.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define BITPRESS_TARGET_AMX_INT8 \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define BITPRESS_TARGET_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#endif

namespace bitpress {
namespace {

// Position in the quantized row of packed row 8o + j: 8o + kQuadPos[j] (quad 0: rows 0,4,1,5;
// quad 1: rows 2,6,3,7).
constexpr int kQuadPos[8] = {0, 2, 4, 6, 1, 3, 5, 7};
constexpr int kRowsPerChunk = 256;
constexpr int64_t kW4A8AmxMinRows = 5;

thread_local ThreadBuffer t_ws;     // the calling thread's workspace
thread_local ThreadBuffer t_acc;    // a pool thread's float32 accumulators
thread_local ThreadBuffer t_panel;  // a pool thread's decoded group panel (AMX)

struct Ws {
  int8_t* xq;   // [Mp, ldq]: rows padded to 16 with zeros
  int32_t* xs;  // [Mp, ldg]: sum of xq over each group
  float* sx;    // [Mp]
  int64_t ldq, ldg, Mp;
};

inline int64_t pad16(int64_t m) { return (m + 15) / 16 * 16; }

size_t ws_bytes(int64_t M, int64_t Kp, int64_t G) {
  const int64_t Mp = pad16(M);
  return size_t(Mp) * align64(size_t(Kp)) +
         size_t(Mp) * align64(size_t(std::max<int64_t>(G, 1)) * 4) + align64(size_t(Mp) * 4) + 64;
}

Ws carve(const Int4GemmParams& p, void* base) {
  Ws w;
  w.Mp = pad16(p.M);
  w.ldq = int64_t(align64(size_t(p.Kp)));
  w.ldg = int64_t(align64(size_t(std::max<int64_t>(p.G, 1)) * 4) / 4);
  char* b = static_cast<char*>(base);
  w.xq = reinterpret_cast<int8_t*>(b);
  b += size_t(w.Mp) * w.ldq;
  w.xs = reinterpret_cast<int32_t*>(b);
  b += size_t(w.Mp) * w.ldg * 4;
  w.sx = reinterpret_cast<float*>(b);
  return w;
}

inline int8_t quantize1(float v, float sx) {
  float r = nearbyintf(v / sx);  // default rounding mode: half to even
  r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
  return int8_t(r != r ? 0.f : r);
}

// Row m of x -> xq (packed-row order, quads permuted), sx, group sums. Scalar.
void quantize_row_scalar(const Int4GemmParams& p, const Ws& w, int64_t m) {
  const int64_t base = m * p.x_row_stride;
  float amax = 0.f;
  for (int64_t k = 0; k < p.K; ++k)
    amax = std::max(amax, fabsf(load_as_float(p.x, p.x_dtype, base + k)));
  const float sx = amax > 0.f ? amax / 127.f : 1.f;
  w.sx[m] = sx;
  int8_t* q = w.xq + m * w.ldq;
  for (int64_t i = 0; i < p.Kp; ++i) {
    const int64_t src = p.perm ? p.perm[i] : i;
    const float v = src >= 0 ? load_as_float(p.x, p.x_dtype, base + src) : 0.f;
    q[(i & ~int64_t(7)) + kQuadPos[i & 7]] = quantize1(v, sx);
  }
}

#if defined(__x86_64__)
// The same values as quantize_row_scalar without perm, 16 at a time (the division and rounding are
// IEEE float32 in both: vdivps, vrndscaleps to nearest even).
BITPRESS_TARGET_AVX512 inline __m512 load16(const Int4GemmParams& p, int64_t i) {
  if (p.x_dtype == DType::kFloat32) return _mm512_loadu_ps(static_cast<const float*>(p.x) + i);
  const __m256i h =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p.x) + i));
  if (p.x_dtype == DType::kFloat16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

BITPRESS_TARGET_AVX512 void quantize_row_avx512(const Int4GemmParams& p, const Ws& w, int64_t m) {
  const int64_t base = m * p.x_row_stride;
  const int64_t K16 = p.K / 16 * 16;
  __m512 am = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) am = _mm512_max_ps(am, _mm512_abs_ps(load16(p, base + k)));
  float amax = _mm512_reduce_max_ps(am);
  for (int64_t k = K16; k < p.K; ++k)
    amax = std::max(amax, fabsf(load_as_float(p.x, p.x_dtype, base + k)));
  const float sx = amax > 0.f ? amax / 127.f : 1.f;
  w.sx[m] = sx;
  int8_t* q = w.xq + m * w.ldq;
  const __m512 vs = _mm512_set1_ps(sx);
  const __m512 lim = _mm512_set1_ps(127.f);
  // Bytes of two octets (0..7, 8..15) -> quad order within each octet.
  const __m128i shuf = _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16(p, base + k), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
    const __m128i b = _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(r));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm_shuffle_epi8(b, shuf));
  }
  for (int64_t i = K16; i < p.Kp; ++i) {
    q[(i & ~int64_t(7)) + kQuadPos[i & 7]] = quantize1(load_as_float(p.x, p.x_dtype, base + i), sx);
  }
}
#endif

void quantize_row(const Int4GemmParams& p, const Ws& w, int64_t m) {
#if defined(__x86_64__)
  if (!p.perm && active_cpu_isa() >= CpuIsa::kAvx512) {
    quantize_row_avx512(p, w, m);
  } else {
    quantize_row_scalar(p, w, m);
  }
#else
  quantize_row_scalar(p, w, m);
#endif
  const int8_t* q = w.xq + m * w.ldq;
  for (int64_t g = 0; g < p.G; ++g) {
    int32_t s = 0;
    for (int64_t i = 8 * p.group_starts[g]; i < 8 * p.group_starts[g + 1]; ++i) s += q[i];
    w.xs[m * w.ldg + g] = s;
  }
}

// acc[r][c] = fma(s[c], float(ct[r][c] - z[c] xs[r0 + r, g]), acc[r][c]) for r < rows, c < 64.
void fold_scalar(const Int4GemmParams& p, const Ws& w, int64_t t, int64_t g, const int32_t* ct,
                 int64_t ldc, int64_t r0, int rows, float* acc) {
  const int64_t sg = (t * p.G + g) * kInt4TileN;
  for (int r = 0; r < rows; ++r) {
    const int32_t xs = w.xs[(r0 + r) * w.ldg + g];
    for (int c = 0; c < kInt4TileN; ++c) {
      const int32_t z = p.zeros ? int32_t(p.zeros[sg + c]) : 8;
      float& a = acc[r * kInt4TileN + c];
      a = fmaf(p.scales[sg + c], float(ct[r * ldc + c] - z * xs), a);
    }
  }
}

#if defined(__x86_64__)
BITPRESS_TARGET_AVX512 void fold_avx512(const Int4GemmParams& p, const Ws& w, int64_t t, int64_t g,
                                        const int32_t* ct, int64_t ldc, int64_t r0, int rows,
                                        float* acc) {
  const int64_t sg = (t * p.G + g) * kInt4TileN;
  __m512 s[4];
  __m512i z[4];
  for (int v = 0; v < 4; ++v) {
    s[v] = _mm512_loadu_ps(p.scales + sg + 16 * v);
    z[v] = p.zeros ? _mm512_cvtepu8_epi32(
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + sg + 16 * v)))
                   : _mm512_set1_epi32(8);
  }
  for (int r = 0; r < rows; ++r) {
    const __m512i xs = _mm512_set1_epi32(w.xs[(r0 + r) * w.ldg + g]);
    for (int v = 0; v < 4; ++v) {
      const __m512i d =
          _mm512_sub_epi32(_mm512_loadu_si512(ct + r * ldc + 16 * v), _mm512_mullo_epi32(z[v], xs));
      float* op = acc + r * kInt4TileN + 16 * v;
      _mm512_storeu_ps(op, _mm512_fmadd_ps(s[v], _mm512_cvtepi32_ps(d), _mm512_loadu_ps(op)));
    }
  }
}
#endif

void fold(const Int4GemmParams& p, const Ws& w, int64_t t, int64_t g, const int32_t* ct,
          int64_t ldc, int64_t r0, int rows, float* acc) {
#if defined(__x86_64__)
  if (cpu_features().avx512f && active_cpu_isa() >= CpuIsa::kAvx512) {
    return fold_avx512(p, w, t, g, ct, ldc, r0, rows, acc);
  }
#endif
  fold_scalar(p, w, t, g, ct, ldc, r0, rows, acc);
}

// acc * sx + bias -> out rows [m0, m0 + rows), columns of tile t.
void store_rows(const Int4GemmParams& p, const Ws& w, int64_t t, int64_t m0, int rows,
                const float* acc, cpu::ConvertFn convert) {
  const int64_t n0 = t * kInt4TileN;
  const int64_t nn = std::min<int64_t>(kInt4TileN, p.N - n0);
  const int osz = dtype_size(p.out_dtype);
  alignas(64) float row[kInt4TileN];
  for (int m = 0; m < rows; ++m) {
    const float sx = w.sx[m0 + m];
    for (int64_t c = 0; c < nn; ++c) {
      row[c] = acc[m * kInt4TileN + c] * sx +
               (p.bias ? load_as_float(p.bias, p.bias_dtype, n0 + c) : 0.f);
    }
    convert(row, static_cast<char*>(p.out) + ((m0 + m) * p.out_row_stride + n0) * osz, nn);
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar and VNNI: rows [r0, r0 + rows) (rows <= 4) of tile t into acc [rows][64].
// ---------------------------------------------------------------------------------------------

void block_scalar(const Int4GemmParams& p, const Ws& w, int64_t t, int64_t r0, int rows,
                  float* acc) {
  const int64_t K8 = p.Kp / 8;
  int32_t ct[4 * kInt4TileN];
  for (int64_t g = 0; g < p.G; ++g) {
    memset(ct, 0, sizeof(ct));
    for (int64_t o = p.group_starts[g]; o < p.group_starts[g + 1]; ++o) {
      const int32_t* wp = p.qweight + (t * K8 + o) * kInt4TileN;
      for (int c = 0; c < kInt4TileN; ++c) {
        const uint32_t word = uint32_t(wp[c]);
        const uint32_t quad[2] = {word & 0x0F0F0F0Fu, (word >> 4) & 0x0F0F0F0Fu};
        for (int r = 0; r < rows; ++r) {
          const int8_t* xq = w.xq + (r0 + r) * w.ldq + 8 * o;
          int32_t s = 0;
          for (int h = 0; h < 2; ++h)
            for (int b = 0; b < 4; ++b) s += int32_t((quad[h] >> (8 * b)) & 0xFF) * xq[4 * h + b];
          ct[r * kInt4TileN + c] += s;
        }
      }
    }
    fold(p, w, t, g, ct, kInt4TileN, r0, rows, acc);
  }
}

#if defined(__x86_64__)
template <int MB>
BITPRESS_TARGET_VNNI void block_vnni(const Int4GemmParams& p, const Ws& w, int64_t t, int64_t r0,
                                     float* acc) {
  const int64_t K8 = p.Kp / 8;
  const __m512i mask = _mm512_set1_epi32(0x0F0F0F0F);
  alignas(64) int32_t ct[MB * kInt4TileN];
  const int32_t* end = p.qweight + ((p.N + kInt4TileN - 1) / kInt4TileN) * K8 * kInt4TileN;
  for (int64_t g = 0; g < p.G; ++g) {
    __m512i a[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < 4; ++v) a[m][v] = _mm512_setzero_si512();
    for (int64_t o = p.group_starts[g]; o < p.group_starts[g + 1]; ++o) {
      const int32_t* wp = p.qweight + (t * K8 + o) * kInt4TileN;
      const int32_t* pf = wp + 16 * kInt4TileN;
      if (pf < end) {
        for (int l = 0; l < 4; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(pf + 16 * l), _MM_HINT_T0);
      }
      __m512i b0[4], b1[4];
      for (int v = 0; v < 4; ++v) {
        const __m512i word = _mm512_loadu_si512(wp + 16 * v);
        b0[v] = _mm512_and_si512(word, mask);
        b1[v] = _mm512_and_si512(_mm512_srli_epi32(word, 4), mask);
      }
      for (int m = 0; m < MB; ++m) {
        const int32_t* xq = reinterpret_cast<const int32_t*>(w.xq + (r0 + m) * w.ldq + 8 * o);
        const __m512i x0 = _mm512_set1_epi32(xq[0]), x1 = _mm512_set1_epi32(xq[1]);
        for (int v = 0; v < 4; ++v) {
          a[m][v] = _mm512_dpbusd_epi32(a[m][v], b0[v], x0);
          a[m][v] = _mm512_dpbusd_epi32(a[m][v], b1[v], x1);
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < 4; ++v) _mm512_store_si512(ct + m * kInt4TileN + 16 * v, a[m][v]);
    fold_avx512(p, w, t, g, ct, kInt4TileN, r0, MB, acc);
  }
}

using BlockFn = void (*)(const Int4GemmParams&, const Ws&, int64_t, int64_t, float*);
BlockFn vnni_fn(int mb) {
  switch (mb) {
    case 1:
      return block_vnni<1>;
    case 2:
      return block_vnni<2>;
    case 3:
      return block_vnni<3>;
    default:
      return block_vnni<4>;
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// AMX-INT8: one loop nest over tile operations, real (Ops = AmxReal) or emulated (AmxEmu).
// Tiles: C 0..3 = 16 rows x 16 int32 (columns 16j..16j+15 of the tile), A 4 = 16 rows x 64 int8,
// B 5, 6 = 16 quad rows x 16 columns x 4 int8 (alternating).
// ---------------------------------------------------------------------------------------------

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig int8_config() {
  TileConfig c;
  for (int t = 0; t < 7; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  return c;
}

#if defined(__x86_64__)
struct AmxReal {
  BITPRESS_TARGET_AMX_INT8 static void begin() {
    static const TileConfig cfg = int8_config();
    _tile_loadconfig(&cfg);
  }
  BITPRESS_TARGET_AMX_INT8 static void end() {
    _tile_release();
    cpu::gemm_amx_thread_begin();  // the bf16 microkernel's cached configuration is gone
  }
  BITPRESS_TARGET_AMX_INT8 static void block(const int8_t* a, int64_t lda, const uint32_t* b,
                                             int64_t steps, int32_t* c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < steps; ++s) {
      const uint32_t* bs = b + s * 16 * kInt4TileN;
      _tile_loadd(4, a + 64 * s, lda);
      _tile_loadd(5, bs, kInt4TileN * 4);
      _tile_dpbssd(0, 4, 5);
      _tile_loadd(6, bs + 16, kInt4TileN * 4);
      _tile_dpbssd(1, 4, 6);
      _tile_loadd(5, bs + 32, kInt4TileN * 4);
      _tile_dpbssd(2, 4, 5);
      _tile_loadd(6, bs + 48, kInt4TileN * 4);
      _tile_dpbssd(3, 4, 6);
    }
    _tile_stored(0, c, kInt4TileN * 4);
    _tile_stored(1, c + 16, kInt4TileN * 4);
    _tile_stored(2, c + 32, kInt4TileN * 4);
    _tile_stored(3, c + 48, kInt4TileN * 4);
  }
};
#endif

// Scalar model of the same instruction sequence: tiles as arrays, tdpbssd as in the SDM
// (C[m][n] += sum_{k<16} sum_{i<4} int8(A[m][4k+i]) int8(B[k][4n+i])).
struct AmxEmu {
  struct Tiles {
    alignas(64) uint8_t t[8][16][64];
  };
  static Tiles& tiles() {
    thread_local Tiles s;
    return s;
  }
  static void begin() {}
  static void end() {}
  static void load(int i, const void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r)
      memcpy(tiles().t[i][r], static_cast<const char*>(p) + r * stride, 64);
  }
  static void store(int i, void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) memcpy(static_cast<char*>(p) + r * stride, tiles().t[i][r], 64);
  }
  static void dpbssd(int c, int a, int b) {
    Tiles& T = tiles();
    for (int m = 0; m < 16; ++m) {
      for (int n = 0; n < 16; ++n) {
        int32_t acc;
        memcpy(&acc, &T.t[c][m][4 * n], 4);
        for (int k = 0; k < 16; ++k)
          for (int i = 0; i < 4; ++i)
            acc += int32_t(int8_t(T.t[a][m][4 * k + i])) * int32_t(int8_t(T.t[b][k][4 * n + i]));
        memcpy(&T.t[c][m][4 * n], &acc, 4);
      }
    }
  }
  static void block(const int8_t* a, int64_t lda, const uint32_t* b, int64_t steps, int32_t* c) {
    for (int i = 0; i < 4; ++i) memset(tiles().t[i], 0, sizeof(tiles().t[i]));
    for (int64_t s = 0; s < steps; ++s) {
      const uint32_t* bs = b + s * 16 * kInt4TileN;
      load(4, a + 64 * s, lda);
      load(5, bs, kInt4TileN * 4);
      dpbssd(0, 4, 5);
      load(6, bs + 16, kInt4TileN * 4);
      dpbssd(1, 4, 6);
      load(5, bs + 32, kInt4TileN * 4);
      dpbssd(2, 4, 5);
      load(6, bs + 48, kInt4TileN * 4);
      dpbssd(3, 4, 6);
    }
    for (int i = 0; i < 4; ++i) store(i, c + 16 * i, kInt4TileN * 4);
  }
};

// Octets [o0, o1) of tile t as int8 quads: wb[(2 (o - o0) + h) * 64 + c].
void decode_panel_scalar(const Int4GemmParams& p, int64_t t, int64_t o0, int64_t o1, uint32_t* wb) {
  const int32_t* wp = p.qweight + (t * (p.Kp / 8) + o0) * kInt4TileN;
  for (int64_t o = 0; o < o1 - o0; ++o) {
    for (int c = 0; c < kInt4TileN; ++c) {
      const uint32_t word = uint32_t(wp[o * kInt4TileN + c]);
      wb[(2 * o) * kInt4TileN + c] = word & 0x0F0F0F0Fu;
      wb[(2 * o + 1) * kInt4TileN + c] = (word >> 4) & 0x0F0F0F0Fu;
    }
  }
}

#if defined(__x86_64__)
BITPRESS_TARGET_AVX512 void decode_panel_avx512(const Int4GemmParams& p, int64_t t, int64_t o0,
                                                int64_t o1, uint32_t* wb) {
  const __m512i mask = _mm512_set1_epi32(0x0F0F0F0F);
  const int32_t* wp = p.qweight + (t * (p.Kp / 8) + o0) * kInt4TileN;
  const int32_t* end = p.qweight + ((p.N + kInt4TileN - 1) / kInt4TileN) * (p.Kp / 8) * kInt4TileN;
  for (int64_t o = 0; o < o1 - o0; ++o) {
    // The next group's words (the strip is contiguous, the next tile's follows it).
    const int32_t* pf = wp + (o + 16) * kInt4TileN;
    if (pf < end) {
      for (int l = 0; l < 4; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(pf + 16 * l), _MM_HINT_T0);
    }
    for (int v = 0; v < 4; ++v) {
      const __m512i word = _mm512_loadu_si512(wp + o * kInt4TileN + 16 * v);
      _mm512_store_si512(wb + (2 * o) * kInt4TileN + 16 * v, _mm512_and_si512(word, mask));
      _mm512_store_si512(wb + (2 * o + 1) * kInt4TileN + 16 * v,
                         _mm512_and_si512(_mm512_srli_epi32(word, 4), mask));
    }
  }
}
#endif

// Rows [m0, m1) (multiples of 16, at most kRowsPerChunk) of tile t into acc [m1 - m0][64].
template <class Ops>
void chunk_amx(const Int4GemmParams& p, const Ws& w, int64_t t, int64_t m0, int64_t m1,
               uint32_t* wb, float* acc, bool avx512) {
  alignas(64) int32_t ct[16 * kInt4TileN];
  for (int64_t i = 0; i < (m1 - m0) * kInt4TileN; ++i) acc[i] = 0.f;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t o0 = p.group_starts[g], o1 = p.group_starts[g + 1];
    if (o1 == o0) continue;
#if defined(__x86_64__)
    if (avx512) {
      decode_panel_avx512(p, t, o0, o1, wb);
    } else {
      decode_panel_scalar(p, t, o0, o1, wb);
    }
#else
    decode_panel_scalar(p, t, o0, o1, wb);
#endif
    const int64_t steps = (o1 - o0) / 8;  // 64 rows per tdpbssd
    for (int64_t r = m0; r < m1; r += 16) {
      Ops::block(w.xq + r * w.ldq + 8 * o0, w.ldq, wb, steps, ct);
      fold(p, w, t, g, ct, kInt4TileN, r, 16, acc + (r - m0) * kInt4TileN);
    }
  }
}

bool amx_groups_ok(const Int4GemmParams& p) {
  for (int64_t g = 0; g <= p.G; ++g) {
    if (p.group_starts[g] % 8) return false;
  }
  return true;
}

int64_t max_group_octets(const Int4GemmParams& p) {
  int64_t mx = 0;
  for (int64_t g = 0; g < p.G; ++g)
    mx = std::max<int64_t>(mx, p.group_starts[g + 1] - p.group_starts[g]);
  return mx;
}

}  // namespace

const char* int4_w4a8_kernel_name(Int4W4A8Kernel k) {
  switch (k) {
    case Int4W4A8Kernel::kAmx:
      return "amx-int8";
    case Int4W4A8Kernel::kVnni:
      return "avx512-vnni";
    case Int4W4A8Kernel::kScalar:
      return "scalar";
    case Int4W4A8Kernel::kAmxEmulated:
      return "amx-int8-emulated";
    default:
      return "auto";
  }
}

bool int4_w4a8_kernel_available(Int4W4A8Kernel k) {
  switch (k) {
#if defined(__x86_64__)
    case Int4W4A8Kernel::kAmx:
      return cpu_features().amx_int8 && amx_usable();
    case Int4W4A8Kernel::kVnni:
      return cpu_features().avx512_vnni && cpu_features().avx512f && cpu_features().avx512bw;
#endif
    case Int4W4A8Kernel::kScalar:
    case Int4W4A8Kernel::kAmxEmulated:
      return true;
    default:
      return false;
  }
}

Int4W4A8Kernel int4_w4a8_kernel_for(const Int4GemmParams& p) {
  const CpuIsa isa = active_cpu_isa();
  // AMX from kW4A8AmxMinRows rows: below, the VNNI kernel's single 4-row register block decodes
  // the weights once and in registers, while the tiles pay a decode through memory for mostly
  // empty rows (one thread, 4096 x 4096: M = 2 0.44 ms VNNI against 0.74 AMX, M = 4 0.48 against
  // 0.79; M = 5-6 alike; M >= 7 AMX ahead).
  if (isa == CpuIsa::kAmx && int4_w4a8_kernel_available(Int4W4A8Kernel::kAmx) &&
      p.M >= kW4A8AmxMinRows && p.group_starts && amx_groups_ok(p)) {
    return Int4W4A8Kernel::kAmx;
  }
  if (isa >= CpuIsa::kAvx512 && int4_w4a8_kernel_available(Int4W4A8Kernel::kVnni)) {
    return Int4W4A8Kernel::kVnni;
  }
  return Int4W4A8Kernel::kScalar;
}

Status int4_gemm_w4a8_cpu(const Int4GemmParams& p, const CpuThreadPool* pool,
                          Int4W4A8Kernel kernel) {
  const Status st = int4_gemm_check(p);
  if (st != Status::kSuccess || p.M == 0 || p.N == 0) return st;
  if (kernel == Int4W4A8Kernel::kAuto) kernel = int4_w4a8_kernel_for(p);
  if (!int4_w4a8_kernel_available(kernel)) return Status::kUnsupported;
  const bool amx = kernel == Int4W4A8Kernel::kAmx || kernel == Int4W4A8Kernel::kAmxEmulated;
  if (amx && !amx_groups_ok(p)) return Status::kInvalidArgument;
  void* base = t_ws.get(ws_bytes(p.M, p.Kp, p.G));
  if (!base) return Status::kOutOfMemory;
  const Ws w = carve(p, base);
  parallel_for(pool, 0, p.M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(p, w, m);
  });
  for (int64_t m = p.M; m < w.Mp; ++m) {
    memset(w.xq + m * w.ldq, 0, size_t(w.ldq));
    for (int64_t g = 0; g < p.G; ++g) w.xs[m * w.ldg + g] = 0;
    w.sx[m] = 1.f;
  }
  const CpuIsa isa = active_cpu_isa();
  const cpu::ConvertFn convert = cpu::converter(p.out_dtype, isa);
  const int64_t Nt = (p.N + kInt4TileN - 1) / kInt4TileN;
  bool oom = false;
  if (amx) {
    const int64_t chunks = (w.Mp + kRowsPerChunk - 1) / kRowsPerChunk;
    const int64_t blocks = w.Mp / 16;
    const size_t panel_bytes = size_t(2 * max_group_octets(p)) * kInt4TileN * 4;
    const bool avx512 = isa >= CpuIsa::kAvx512;
    parallel_for(pool, 0, Nt * chunks, 1, [&](int64_t i0, int64_t i1) {
      float* acc = static_cast<float*>(t_acc.get(size_t(kRowsPerChunk) * kInt4TileN * 4));
      uint32_t* wb = static_cast<uint32_t*>(t_panel.get(std::max<size_t>(panel_bytes, 64)));
      if (!acc || !wb) {
        oom = true;
        return;
      }
#if defined(__x86_64__)
      if (kernel == Int4W4A8Kernel::kAmx) AmxReal::begin();
#endif
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / chunks, c = i % chunks;
        const int64_t m0 = blocks * c / chunks * 16, m1 = blocks * (c + 1) / chunks * 16;
#if defined(__x86_64__)
        if (kernel == Int4W4A8Kernel::kAmx) {
          chunk_amx<AmxReal>(p, w, t, m0, m1, wb, acc, avx512);
        } else {
          chunk_amx<AmxEmu>(p, w, t, m0, m1, wb, acc, avx512);
        }
#else
        chunk_amx<AmxEmu>(p, w, t, m0, m1, wb, acc, false);
#endif
        const int rows = int(std::min(m1, p.M) - m0);
        if (rows > 0) store_rows(p, w, t, m0, rows, acc, convert);
      }
#if defined(__x86_64__)
      if (kernel == Int4W4A8Kernel::kAmx) AmxReal::end();
#endif
    });
    return oom ? Status::kOutOfMemory : Status::kSuccess;
  }
  const int64_t blocks = (p.M + 3) / 4;
  parallel_for(pool, 0, Nt * blocks, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float acc[4 * kInt4TileN];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / blocks, m0 = (i % blocks) * 4;
      const int mb = int(std::min<int64_t>(4, p.M - m0));
      for (int j = 0; j < mb * kInt4TileN; ++j) acc[j] = 0.f;
#if defined(__x86_64__)
      if (kernel == Int4W4A8Kernel::kVnni) {
        vnni_fn(mb)(p, w, t, m0, acc);
      } else {
        block_scalar(p, w, t, m0, mb, acc);
      }
#else
      block_scalar(p, w, t, m0, mb, acc);
#endif
      store_rows(p, w, t, m0, mb, acc, convert);
    }
  });
  return Status::kSuccess;
}

}  // namespace bitpress
