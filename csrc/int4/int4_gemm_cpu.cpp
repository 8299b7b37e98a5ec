// CPU kernels of int4_gemm (see bitpress/int4/int4_gemm.h for the formula and the layout).
//
// Work: the columns come in tiles of 64 and the rows of x in blocks of up to 8; each (tile,
// row block) is one task of the thread pool (the bf16 path at M >= 5 instead: panel kernel,
// below). Per task and per group g the kernel accumulates
//   a[m, n] = sum_{k in g} q'[k, n] x[m, k]
// in registers, then folds the group in:  y[m, n] += s[g, n] (a[m, n] - z'[g, n] xsum[m, g]),
// where q' and z' carry the offset of the representation (128 + q on the bf16 path, q on the
// fp32 path) and xsum is the sum of the same x values over the group. Zero points and scales
// thus cost a few operations per group, not per weight.
//
// AMX (active_cpu_isa() == kAmx, bf16/fp16 x, M >= kAmxMinRows): panels of bf16 pairs of q - z
// (integers in [-15, 15], exact in bf16; the VNNI pair layout) go to the AMX variant of the shared
// GEMM microkernel (bitpress/cpu/gemm_microkernel.h) in blocks of 32 rows x 64 columns x one
// panel's K, into float32 C tiles that hold one group's sums C_g = sum x (q - z); the fold is then
// y[m, n] += s[g, n] C_g[m, n] (one fmadd per 16 outputs and group, no xsum). The products stay
// exact bf16 x bf16 products with float32 sums, as on the AVX512-BF16 path.
//
// At M = 1 the kernel is bound by the weight stream (4.6 bits per weight with scales and zeros);
// the inner loop must unpack and multiply 128 weights per 64-byte line faster than memory
// delivers them: 2 integer ops + 1 vdpbf16ps per 32 weights on the bf16 path.
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
#endif

namespace bitpress {
namespace {

constexpr int kMaxRowBlock = 8;
// From this many rows on, the bf16 path runs the panel kernel (chunk_bf16), below it tile_bf16:
// at M = 5..8 the panel is then unpacked once for all rows (4096 x 14336, M = 8: 2.5 -> 1.6 ms);
// at M = 4 both take the same time.
constexpr int kPanelMinRows = 5;
constexpr int kRowOfNibble[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// Rows of the workspace: M rounded up to whole AMX row tiles (16); the rows past M are zero.
inline int64_t padded_rows(int64_t M) { return (M + 15) / 16 * 16; }

thread_local ThreadBuffer t_workspace;  // the calling thread's workspace (p.workspace == null)
thread_local ThreadBuffer t_acc;        // a pool thread's panel accumulators

// Pairs per slab of the bf16 pairs at M >= kPanelMinRows (16 octets, one panel; see Workspace).
constexpr int kSlabPairs = 64;

// Bytes per row of the bf16 pairs: whole slabs (either layout fits), and one line more, so that
// rows are not 4 KiB apart at K = 4096, 14336 (tile_bf16 reads its rows at once: L1 set aliasing).
inline size_t pair_row_bytes(int64_t Kp) {
  return (size_t(Kp / 2) * 4 + 4 * kSlabPairs - 1) / (4 * kSlabPairs) * (4 * kSlabPairs) + 64;
}

// Workspace: x gathered in packed-row order as float32 (fp32 paths) or as bf16 pairs hi / lo
// (bf16 path), and the per-group sums of the values each path multiplies.
struct Workspace {
  float* xf;     // [M, Kp]
  uint32_t* xh;  // [M, Kp/2]: (bf16 hi of row 2i, of row 2i+1)
  uint32_t* xl;  // [M, Kp/2]: the residuals x - hi as bf16 (zero for bf16 x)
  float* xsum;   // [M, G]
  int64_t ldf, ldp, ldg, M;
  // xh / xl in slabs [Kp/128][M][64] instead of rows (the kernel at M >= kPanelMinRows): the pairs
  // a panel of 16 octets multiplies are then contiguous over all rows and stream in order.
  bool slabs;
  // Index of pair i of row m in xh / xl.
  int64_t pair(int64_t m, int64_t i) const {
    return slabs ? (i / kSlabPairs) * M * kSlabPairs + m * kSlabPairs + i % kSlabPairs
                 : m * ldp + i;
  }
};

Workspace carve(const Int4GemmParams& p, void* workspace, bool slabs) {
  Workspace w;
  w.M = padded_rows(p.M);
  w.slabs = slabs;
  w.ldf = int64_t(align64(size_t(p.Kp) * 4) / 4);
  w.ldp = int64_t(pair_row_bytes(p.Kp) / 4);
  w.ldg = int64_t(align64(size_t(std::max<int64_t>(p.G, 1)) * 4) / 4);
  // xf (fp32 paths) and xh / xl (bf16 path) share their bytes: a call uses one or the other. At
  // M = 512, K = 14336 that keeps the workspace under 32 MB, glibc's largest mmap threshold: above
  // it every call's workspace is a fresh mapping whose first touch costs page faults.
  char* base = static_cast<char*>(workspace);
  w.xf = reinterpret_cast<float*>(base);
  w.xh = reinterpret_cast<uint32_t*>(base);
  w.xl = reinterpret_cast<uint32_t*>(base + size_t(w.M) * w.ldp * 4);
  base += size_t(w.M) * std::max(w.ldf, 2 * w.ldp) * 4;
  w.xsum = reinterpret_cast<float*>(base);
  return w;
}

#if defined(__x86_64__)
// float_to_bf16_bits on 8 lanes, the bf16 in the upper half of each lane (low half zero).
BITPRESS_TARGET_AVX512 inline __m256i bf16_hi8(__m256i u) {
  const __m256i r = _mm256_add_epi32(
      u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                          _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  const __mmask8 nan = _mm256_cmpgt_epu32_mask(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                               _mm256_set1_epi32(0x7f800000));
  const __m256i rn = _mm256_mask_or_epi32(r, nan, u, _mm256_set1_epi32(0x00400000));
  return _mm256_and_si256(rn, _mm256_set1_epi32(int(0xffff0000u)));
}

// prepare_row of the bf16 path, 8 values at a time: the scalar loops (a serial sum per group,
// six conversions per value) cost ~3.4 ns per value, 10-15% of the call at M >= 128. Same pairs
// bit for bit (the integer rounding of float_to_bf16_bits); the group sums in another order.
// Neither xf nor, for bf16 x (whose residuals are zero and never read), xl is written: at large
// M their first touch in each call's fresh workspace cost page faults.
BITPRESS_TARGET_AVX512 void prepare_pairs(const Int4GemmParams& p, const Workspace& w, int64_t m) {
  const bool lo = p.x_dtype != DType::kBFloat16;
  const int64_t base = m * p.x_row_stride;
  float* xs = w.xsum + m * w.ldg;
  for (int64_t g = 0; g < p.G; ++g) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t o = p.group_starts[g]; o < p.group_starts[g + 1]; ++o) {
      __m256i u;
      if (!p.perm) {
        // The same floats as load_as_float (fp16 -> fp32 is exact; a NaN may come out quieted,
        // and float_to_bf16_bits quiets it anyway).
        const __m128i h16 = _mm_loadu_si128(
            reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.x) + base + 8 * o));
        u = lo ? _mm256_castps_si256(_mm256_cvtph_ps(h16))
               : _mm256_slli_epi32(_mm256_cvtepu16_epi32(h16), 16);
      } else {
        alignas(32) float xv[8];
        for (int j = 0; j < 8; ++j) {
          const int64_t src = p.perm[8 * o + j];
          xv[j] = src >= 0 ? load_as_float(p.x, p.x_dtype, base + src) : 0.f;
        }
        u = _mm256_load_si256(reinterpret_cast<const __m256i*>(xv));
      }
      const __m256i h = bf16_hi8(u);
      const __m256 hf = _mm256_castsi256_ps(h);
      const int64_t d = w.pair(m, 4 * o);  // 4 pairs: within one slab
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w.xh + d),
                       _mm256_cvtepi32_epi16(_mm256_srli_epi32(h, 16)));
      if (lo) {
        const __m256i l = bf16_hi8(_mm256_castps_si256(_mm256_sub_ps(_mm256_castsi256_ps(u), hf)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(w.xl + d),
                         _mm256_cvtepi32_epi16(_mm256_srli_epi32(l, 16)));
        // hi + lo is the value the bf16 path multiplies: xsum sums exactly that.
        s = _mm256_add_ps(s, _mm256_add_ps(hf, _mm256_castsi256_ps(l)));
      } else {
        s = _mm256_add_ps(s, hf);
      }
    }
    alignas(32) float v[8];
    _mm256_store_ps(v, s);
    xs[g] = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  }
}
#endif

// x row m in packed-row order (perm; zero for padding rows), and its group sums. pairs (the
// bf16 path, x86 only): as bf16 pairs instead of float32.
void prepare_row(const Int4GemmParams& p, const Workspace& w, int64_t m, bool pairs) {
#if defined(__x86_64__)
  if (pairs) return prepare_pairs(p, w, m);
#endif
  float* xf = w.xf + m * w.ldf;
  const int64_t base = m * p.x_row_stride;
  for (int64_t i = 0; i < p.Kp; ++i) {
    const int64_t src = p.perm ? p.perm[i] : i;
    xf[i] = src >= 0 ? load_as_float(p.x, p.x_dtype, base + src) : 0.f;
  }
  float* xs = w.xsum + m * w.ldg;
  for (int64_t g = 0; g < p.G; ++g) {
    float s = 0.f;
    for (int64_t i = 8 * p.group_starts[g]; i < 8 * p.group_starts[g + 1]; ++i) s += xf[i];
    xs[g] = s;
  }
}

// acc [mb][64] + bias -> out rows m0.., columns 64t.. (< N), rounded to the output dtype.
void store_tile(const Int4GemmParams& p, int64_t t, int64_t m0, int mb, const float* acc,
                cpu::ConvertFn convert, int64_t acc_stride = kInt4TileN) {
  const int64_t n0 = t * kInt4TileN;
  const int64_t nn = std::min<int64_t>(kInt4TileN, p.N - n0);
  const int osz = dtype_size(p.out_dtype);
  alignas(64) float row[kInt4TileN];
  for (int m = 0; m < mb; ++m) {
    for (int64_t c = 0; c < nn; ++c) {
      row[c] =
          acc[m * acc_stride + c] + (p.bias ? load_as_float(p.bias, p.bias_dtype, n0 + c) : 0.f);
    }
    convert(row, static_cast<char*>(p.out) + ((m0 + m) * p.out_row_stride + n0) * osz, nn);
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 path: q unpacked to float, FMA with x in float32. One body written with GCC vector
// extensions, W lanes wide, instantiated inside functions with the AVX2 / AVX-512 target
// attributes (and at 4 lanes for the portable path).
// ---------------------------------------------------------------------------------------------

// GCC ignores vector_size with a template-dependent size: spell the types out per width.
template <int W>
struct Vec;
#define BITPRESS_VEC(W_)                                    \
  template <>                                               \
  struct Vec<W_> {                                          \
    typedef float f __attribute__((vector_size(W_ * 4)));   \
    typedef int32_t i __attribute__((vector_size(W_ * 4))); \
    typedef uint8_t b __attribute__((vector_size(W_)));     \
  };
BITPRESS_VEC(4)
BITPRESS_VEC(8)
BITPRESS_VEC(16)
#undef BITPRESS_VEC

// The tile paths (M < kPanelMinRows, and fp32 x) stream each tile's words once, in address order,
// and the next tile of the same task follows in memory. The hardware prefetchers stop at 4 KiB
// pages (16 octets of a tile), so every page would start with DRAM-latency misses: the octet
// kTilePrefetchOctets ahead is prefetched explicitly (into L2: it is read once, soon).
constexpr int kTilePrefetchOctets = 16;  // 4 KiB ahead; 8-32 measured alike (bench/NOTES.md)
__attribute__((always_inline)) inline void prefetch_ahead(const Int4GemmParams& p,
                                                          const int32_t* wp) {
  const int32_t* pf = wp + kTilePrefetchOctets * kInt4TileN;
  const int32_t* end = p.qweight + ((p.N + kInt4TileN - 1) / kInt4TileN) * (p.Kp / 8) * kInt4TileN;
  if (pf < end) {
    for (int l = 0; l < 4; ++l) __builtin_prefetch(pf + 16 * l, 0, 2);
  }
}

// Accumulators live in registers for one group and one column pass: MB rows x V vectors. With
// 8 rows, passes of 2 vectors keep 16 accumulators plus the unpacked weights in 32 zmm registers.
template <int MB>
constexpr int kPassVectors = MB <= 4 ? 4 : 2;

template <int W, int MB>
__attribute__((always_inline)) inline void tile_fp32(const Int4GemmParams& p, const Workspace& w,
                                                     int64_t t, int64_t m0, float* acc) {
  using vf = typename Vec<W>::f;
  using vi = typename Vec<W>::i;
  using vb = typename Vec<W>::b;
  constexpr int V = kPassVectors<MB>;
  constexpr int CB = V * W;  // columns per pass
  const int64_t K8 = p.Kp / 8;
  for (int i = 0; i < MB * kInt4TileN; ++i) acc[i] = 0.f;
  for (int64_t g = 0; g < p.G; ++g) {
    for (int64_t cb = 0; cb < kInt4TileN; cb += CB) {
      vf a[MB][V] = {};
      for (int64_t o = p.group_starts[g]; o < p.group_starts[g + 1]; ++o) {
        const int32_t* wp = p.qweight + ((t * K8 + o) * kInt4TileN + cb);
        if (cb == 0) prefetch_ahead(p, wp);
        vi words[V];
        for (int v = 0; v < V; ++v) memcpy(&words[v], wp + v * W, sizeof(vi));
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const int64_t row = 8 * o + kRowOfNibble[i];
          vf qf[V];
          for (int v = 0; v < V; ++v)
            qf[v] = __builtin_convertvector((words[v] >> (4 * i)) & 15, vf);
          for (int m = 0; m < MB; ++m) {
            const float xv = w.xf[(m0 + m) * w.ldf + row];
            for (int v = 0; v < V; ++v) a[m][v] += qf[v] * xv;
          }
        }
      }
      const float* sp = p.scales + (t * p.G + g) * kInt4TileN + cb;
      for (int v = 0; v < V; ++v) {
        vf s, z, o;
        memcpy(&s, sp + v * W, sizeof(vf));
        if (p.zeros) {
          vb zb;
          memcpy(&zb, p.zeros + (t * p.G + g) * kInt4TileN + cb + v * W, sizeof(vb));
          z = __builtin_convertvector(zb, vf);
        } else {
          z = vf{} + 8.f;
        }
        for (int m = 0; m < MB; ++m) {
          float* op = acc + m * kInt4TileN + cb + v * W;
          memcpy(&o, op, sizeof(vf));
          o += s * (a[m][v] - z * w.xsum[(m0 + m) * w.ldg + g]);
          memcpy(op, &o, sizeof(vf));
        }
      }
    }
  }
}

#if defined(__x86_64__)

template <int MB>
BITPRESS_TARGET_AVX512 void tile_fp32_avx512(const Int4GemmParams& p, const Workspace& w, int64_t t,
                                             int64_t m0, float* acc) {
  tile_fp32<16, MB>(p, w, t, m0, acc);
}
template <int MB>
BITPRESS_TARGET_AVX2 void tile_fp32_avx2(const Int4GemmParams& p, const Workspace& w, int64_t t,
                                         int64_t m0, float* acc) {
  tile_fp32<8, MB>(p, w, t, m0, acc);
}

// ---------------------------------------------------------------------------------------------
// bf16 path (AVX-512 + AVX512_BF16): (word >> 4p) & 0x000F000F | 0x43004300 is the bf16 pair
// (128 + q[2p], 128 + q[2p+1]) of one column; vdpbf16ps multiplies it by the broadcast pair
// (x[2p], x[2p+1]) and adds both products to the column's float32 lane.
// ---------------------------------------------------------------------------------------------

template <int MB, bool LO>
BITPRESS_TARGET_AVX512BF16 void tile_bf16(const Int4GemmParams& p, const Workspace& w, int64_t t,
                                          int64_t m0, float* acc) {
  constexpr int V = kPassVectors<MB>;
  // vdpbf16ps has a latency of several cycles: with few rows, the 4 pairs of an octet would
  // form one dependency chain per accumulator and bound the weight stream. Even and odd pairs
  // go to separate accumulators (summed per group) until there are >= 16 independent chains.
  constexpr int S = MB * V >= 16 ? 1 : 2;
  const int64_t K8 = p.Kp / 8;
  const __m512i nib = _mm512_set1_epi32(0x000F000F);
  const __m512i off = _mm512_set1_epi32(0x43004300);  // bf16 128.0 in both halves
  for (int i = 0; i < MB * kInt4TileN; ++i) acc[i] = 0.f;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t o0 = p.group_starts[g], o1 = p.group_starts[g + 1];
    for (int cb = 0; cb < kInt4TileN; cb += 16 * V) {
      __m512 a[S][MB][V];
      for (int k = 0; k < S; ++k)
        for (int m = 0; m < MB; ++m)
          for (int v = 0; v < V; ++v) a[k][m][v] = _mm512_setzero_ps();
      for (int64_t o = o0; o < o1; ++o) {
        const int32_t* wp = p.qweight + (t * K8 + o) * kInt4TileN + cb;
        if (cb == 0) prefetch_ahead(p, wp);
        __m512i words[V];
        for (int v = 0; v < V; ++v) words[v] = _mm512_loadu_si512(wp + 16 * v);
#pragma GCC unroll 4
        for (int pr = 0; pr < 4; ++pr) {
          __m512i b[V];
          // imm 0xEA: (A & B) | C.
          for (int v = 0; v < V; ++v)
            b[v] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(words[v], 4 * pr), nib, off, 0xEA);
          __m512(&ak)[MB][V] = a[pr % S];
          for (int m = 0; m < MB; ++m) {
            const int64_t pi = (m0 + m) * w.ldp + 4 * o + pr;
            const __m512i xh = _mm512_set1_epi32(int(w.xh[pi]));
            for (int v = 0; v < V; ++v)
              ak[m][v] = _mm512_dpbf16_ps(ak[m][v], (__m512bh)b[v], (__m512bh)xh);
            if (LO) {
              const __m512i xl = _mm512_set1_epi32(int(w.xl[pi]));
              for (int v = 0; v < V; ++v)
                ak[m][v] = _mm512_dpbf16_ps(ak[m][v], (__m512bh)b[v], (__m512bh)xl);
            }
          }
        }
      }
      if (S == 2) {
        for (int m = 0; m < MB; ++m)
          for (int v = 0; v < V; ++v) a[0][m][v] = _mm512_add_ps(a[0][m][v], a[S - 1][m][v]);
      }
      const int64_t sg = (t * p.G + g) * kInt4TileN + cb;
      for (int v = 0; v < V; ++v) {
        const __m512 s = _mm512_loadu_ps(p.scales + sg + 16 * v);
        __m512 z = _mm512_set1_ps(136.f);  // 128 + the symmetric zero point 8
        if (p.zeros) {
          const __m128i zb =
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + sg + 16 * v));
          z = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zb)), _mm512_set1_ps(128.f));
        }
        for (int m = 0; m < MB; ++m) {
          float* op = acc + m * kInt4TileN + cb + 16 * v;
          const __m512 xs = _mm512_set1_ps(w.xsum[(m0 + m) * w.ldg + g]);
          _mm512_storeu_ps(
              op, _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, a[0][m][v]), _mm512_loadu_ps(op)));
        }
      }
    }
  }
}

// M = 1: U tiles (t .. t + U - 1) at once, their octets interleaved, so that each thread keeps U
// weight streams in flight (U pages prefetched ahead, U hardware prefetcher streams) instead of
// one: one stream per thread read at ~75% of the read floor however far ahead it was prefetched
// (bench/NOTES.md), i.e. latency-bound on too few misses in flight. acc [U][64]. The words are
// loaded again for each of the 4 pairs (L1 hits) to keep U x 4 accumulators in registers.
constexpr int kStreamTiles = 4;  // 1 -> 2 -> 4 streams measured faster each time (NOTES)
template <int U, bool LO>
BITPRESS_TARGET_AVX512BF16 void tiles_bf16(const Int4GemmParams& p, const Workspace& w, int64_t t,
                                           float* acc) {
  const int64_t K8 = p.Kp / 8;
  const __m512i nib = _mm512_set1_epi32(0x000F000F);
  const __m512i off = _mm512_set1_epi32(0x43004300);  // bf16 128.0 in both halves
  for (int i = 0; i < U * kInt4TileN; ++i) acc[i] = 0.f;
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 a[U][4];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < 4; ++v) a[u][v] = _mm512_setzero_ps();
    for (int64_t o = p.group_starts[g]; o < p.group_starts[g + 1]; ++o) {
      const int32_t* wp[U];
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        wp[u] = p.qweight + ((t + u) * K8 + o) * kInt4TileN;
        prefetch_ahead(p, wp[u]);
      }
#pragma GCC unroll 4
      for (int pr = 0; pr < 4; ++pr) {
        const __m512i xh = _mm512_set1_epi32(int(w.xh[4 * o + pr]));
        const __m512i xl = LO ? _mm512_set1_epi32(int(w.xl[4 * o + pr])) : xh;
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
#pragma GCC unroll 4
          for (int v = 0; v < 4; ++v) {
            const __m512i b = _mm512_ternarylogic_epi32(
                _mm512_srli_epi32(_mm512_loadu_si512(wp[u] + 16 * v), 4 * pr), nib, off, 0xEA);
            a[u][v] = _mm512_dpbf16_ps(a[u][v], (__m512bh)b, (__m512bh)xh);
            if (LO) a[u][v] = _mm512_dpbf16_ps(a[u][v], (__m512bh)b, (__m512bh)xl);
          }
        }
      }
    }
    const __m512 xs = _mm512_set1_ps(w.xsum[g]);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const int64_t sg = ((t + u) * p.G + g) * kInt4TileN;
      for (int v = 0; v < 4; ++v) {
        const __m512 s = _mm512_loadu_ps(p.scales + sg + 16 * v);
        __m512 z = _mm512_set1_ps(136.f);  // 128 + the symmetric zero point 8
        if (p.zeros) {
          const __m128i zb =
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + sg + 16 * v));
          z = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zb)), _mm512_set1_ps(128.f));
        }
        float* op = acc + u * kInt4TileN + 16 * v;
        _mm512_storeu_ps(op,
                         _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, a[u][v]), _mm512_loadu_ps(op)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 path, M >= kPanelMinRows: the unpack above costs 2 integer ops per vector of pairs, and with
// at most 8 rows x 2 vectors of accumulators it is repeated for every block of 8 rows; the integer
// ops and broadcasts then take issue slots from vdpbf16ps (~75% of its peak at M = 128). Here a
// task unpacks the tile's pairs for a span of one group once into an L1 panel and reuses it for
// every block of up to 6 rows of a chunk of rows: the inner loop is 4 loads, 6 broadcasts and
// 24 vdpbf16ps on 24 independent accumulators (6 rows x 64 columns), the mix that runs at
// ~2 vdpbf16ps per cycle on Zen 5.
// ---------------------------------------------------------------------------------------------

constexpr int kPanelRows = 6;     // rows per register block (x 4 vectors = 24 accumulators)
constexpr int kPanelOctets = 16;  // octets per panel: 64 pairs x 64 columns x 4 B = 16 KiB (L1)
static_assert(4 * kPanelOctets == kSlabPairs, "a panel is one slab of x pairs");
// A task: rows in chunks of up to 256 (fewer chunks, fewer passes over the weights: each pass of
// a K = 14336 strip comes from L3) times 4 tiles (each panel's slab of x is read from L3 once
// for 4 tiles; 1 -> 4 tiles: 114 -> 87 ms at 14336 x 4096, M = 512). fp32 accumulators: 256 KiB.
constexpr int kChunkRows = 256;
// The AMX path's row chunks: its accumulators (4 tiles x 512 rows x 64 float32, 512 KiB) stay in
// L2, and at M = 512 each panel is unpacked once instead of twice (1 thread, M = 512: 512 rows
// measured 1-5% faster than 256 and 6-10% faster than 128 at 14336 x 4096).
constexpr int kAmxChunkRows = 512;
constexpr int kTileGroup = 4;

// Pairs of octets [o0, o0 + no) of tile t as bf16 pairs (128 + q): wb[(4 (o - o0) + pr) * 64 + c].
BITPRESS_TARGET_AVX512BF16 void unpack_panel(const Int4GemmParams& p, int64_t t, int64_t o0, int no,
                                             uint32_t* wb) {
  const __m512i nib = _mm512_set1_epi32(0x000F000F);
  const __m512i off = _mm512_set1_epi32(0x43004300);
  const int32_t* wp = p.qweight + (t * (p.Kp / 8) + o0) * kInt4TileN;
  // Prefetch the words 16 octets ahead, the next panel (the strip is contiguous, and the next
  // tile's follows it): without it the unpack waited on DRAM at every panel (~40% of the time
  // at M = 16, cold; the hardware prefetchers stop at 4 KiB pages, one panel each).
  const int32_t* end = p.qweight + ((p.N + kInt4TileN - 1) / kInt4TileN) * (p.Kp / 8) * kInt4TileN;
  for (int o = 0; o < no; ++o) {
    const int32_t* pf = wp + (o + kPanelOctets) * kInt4TileN;
    if (pf < end) {
      for (int l = 0; l < 4; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(pf + 16 * l), _MM_HINT_T0);
    }
    for (int v = 0; v < 4; ++v) {
      const __m512i words = _mm512_loadu_si512(wp + o * kInt4TileN + 16 * v);
#pragma GCC unroll 4
      for (int pr = 0; pr < 4; ++pr) {
        _mm512_store_si512(
            wb + (4 * o + pr) * kInt4TileN + 16 * v,
            _mm512_ternarylogic_epi32(_mm512_srli_epi32(words, 4 * pr), nib, off, 0xEA));
      }
    }
  }
}

// acc[m][:] += s (sum over the panel's pairs of q' x[m0 + m]) (- s z' xsum[m0 + m, g] when
// `first`, the first panel of group g: the fold of a group split into panels is linear).
template <int MB, bool LO>
BITPRESS_TARGET_AVX512BF16 void panel_bf16(const Int4GemmParams& p, const Workspace& w, int64_t t,
                                           int64_t g, int64_t o0, int no, bool first,
                                           const uint32_t* wb, int64_t m0, float* acc) {
  __m512 a[MB][4];
  // Fully unrolled loops over a[][] everywhere, or GCC keeps the array on the stack.
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < 4; ++v) a[m][v] = _mm512_setzero_ps();
  // The panel lies in one slab: row m's pairs at xh[m * kSlabPairs + k].
  const uint32_t* xh = w.xh + w.pair(m0, 4 * o0);
  const uint32_t* xl = w.xl + w.pair(m0, 4 * o0);
  for (int k = 0; k < 4 * no; ++k) {
    __m512i b[4];
    for (int v = 0; v < 4; ++v) b[v] = _mm512_load_si512(wb + k * kInt4TileN + 16 * v);
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_set1_epi32(int(xh[m * kSlabPairs + k]));
      for (int v = 0; v < 4; ++v) a[m][v] = _mm512_dpbf16_ps(a[m][v], (__m512bh)b[v], (__m512bh)xv);
      if (LO) {
        const __m512i xr = _mm512_set1_epi32(int(xl[m * kSlabPairs + k]));
        for (int v = 0; v < 4; ++v)
          a[m][v] = _mm512_dpbf16_ps(a[m][v], (__m512bh)b[v], (__m512bh)xr);
      }
    }
  }
  const int64_t sg = (t * p.G + g) * kInt4TileN;
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    const __m512 s = _mm512_loadu_ps(p.scales + sg + 16 * v);
    __m512 z = _mm512_set1_ps(136.f);  // 128 + the symmetric zero point 8
    if (p.zeros) {
      const __m128i zb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + sg + 16 * v));
      z = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zb)), _mm512_set1_ps(128.f));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      float* op = acc + m * kInt4TileN + 16 * v;
      __m512 d = a[m][v];
      if (first) d = _mm512_fnmadd_ps(z, _mm512_set1_ps(w.xsum[(m0 + m) * w.ldg + g]), d);
      _mm512_storeu_ps(op, _mm512_fmadd_ps(s, d, _mm512_loadu_ps(op)));
    }
  }
}

using PanelFn = void (*)(const Int4GemmParams&, const Workspace&, int64_t, int64_t, int64_t, int,
                         bool, const uint32_t*, int64_t, float*);

template <bool LO>
PanelFn panel_fn(int mb) {
  switch (mb) {
    case 1:
      return panel_bf16<1, LO>;
    case 2:
      return panel_bf16<2, LO>;
    case 3:
      return panel_bf16<3, LO>;
    case 4:
      return panel_bf16<4, LO>;
    case 5:
      return panel_bf16<5, LO>;
    default:
      return panel_bf16<6, LO>;
  }
}

// Rows [m0, m1) (at most kChunkRows) of tiles [t0, t1) into acc [t1 - t0][m1 - m0][64].
void chunk_bf16(const Int4GemmParams& p, const Workspace& w, bool lo, int64_t t0, int64_t t1,
                int64_t m0, int64_t m1, uint32_t* wb, float* acc) {
  const int64_t rows = m1 - m0;
  for (int64_t i = 0; i < (t1 - t0) * rows * kInt4TileN; ++i) acc[i] = 0.f;
  // Blocks of equal size (16 rows: 6 + 5 + 5; 7 rows: 3 + 4), >= 16 accumulators when rows >= 12.
  const int64_t nb = (rows + kPanelRows - 1) / kPanelRows;
  for (int64_t g = 0; g < p.G; ++g) {
    // Panels end at the group's end or the slab's, whichever comes first.
    for (int64_t o = p.group_starts[g], no; o < p.group_starts[g + 1]; o += no) {
      no = std::min<int64_t>(p.group_starts[g + 1], (o / kPanelOctets + 1) * kPanelOctets) - o;
      // The tiles share the slab of x (rows x 256 B), read from L1/L2 instead of L3/DRAM.
      for (int64_t t = t0; t < t1; ++t) {
        unpack_panel(p, t, o, int(no), wb);
        float* at = acc + (t - t0) * rows * kInt4TileN;
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t r0 = rows * b / nb, r1 = rows * (b + 1) / nb;
          const PanelFn fn = lo ? panel_fn<true>(int(r1 - r0)) : panel_fn<false>(int(r1 - r0));
          fn(p, w, t, g, o, int(no), o == p.group_starts[g], wb, m0 + r0, at + r0 * kInt4TileN);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AMX: panels as above, the products on tiles (gemm_bf16_amx), then the fold per group.
// ---------------------------------------------------------------------------------------------

// From this many rows on, an AMX CPU runs chunk_amx (rows padded to 16 with zero rows). Measured
// (4096 x 4096, one thread, weights in L3): M = 3, 4: 1.25, 1.56 ms on tile_bf16, 0.9 ms on AMX (a
// 16-row tile costs the same for 3 rows as for 16); M = 2: 0.88 vs 0.97 ms.
constexpr int kAmxMinRows = 3;
constexpr int kAmxBlockRows = 32;  // the microkernel's 2 x 2 tile block

// Panels must be whole tile steps of K (32 = 4 octets): every group start a multiple of 4 octets
// (group sizes that are multiples of 32 rows; slabs are 16 octets). Otherwise the AVX512-BF16 path.
bool amx_groups_ok(const Int4GemmParams& p) {
  for (int64_t g = 0; g <= p.G; ++g) {
    if (p.group_starts[g] % 4) return false;
  }
  return true;
}

// Pairs of octets [o0, o0 + no) of tile t (in group g) as bf16 pairs of q - z, for the AMX path:
// wb[(4 (o - o0) + pr) * 64 + c]. q - z is an integer in [-15, 15], exact in bf16, so each tile sum
// is the group's partial sum itself and the fold is one fmadd per 16 outputs (acc += s C_g); the
// 128 + q pairs of the AVX512-BF16 path need a second one (- s z' xsum) and a broadcast of xsum,
// which made the fold about half as costly as the tile products at M = 512. The pair comes from a
// 32-entry table (vpermw): index = q + 16 - z, table[i] = bf16(i - 16).
// The bf16 pairs of q - z of octets [o0, o0 + no) of tile t (all in group g), pair row
// 4 (o - o0) + pr, 16 columns (vector v) at a time, handed to out(row, v, pairs). Prefetches 16
// octets ahead, as unpack_panel does. ASYM: with the group's zero points, else the symmetric 8.
template <bool ASYM, class Out>
BITPRESS_TARGET_AVX512BF16 __attribute__((always_inline)) inline void qz_pairs(
    const Int4GemmParams& p, int64_t t, int64_t g, int64_t o0, int no, const Out& out) {
  alignas(64) static const uint16_t kTable[32] = {
      0xc180, 0xc170, 0xc160, 0xc150, 0xc140, 0xc130, 0xc120, 0xc110,  // -16 .. -9
      0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80,  // -8 .. -1
      0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,  // 0 .. 7
      0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,  // 8 .. 15
  };
  const __m512i table = _mm512_load_si512(kTable);
  // bf16(q - 8) at index q and q + 16.
  const __m512i sym = _mm512_shuffle_i64x2(table, table, 0x99);  // 128-bit lanes 1, 2, 1, 2
  const __m512i nib = _mm512_set1_epi32(0x000F000F);
  __m512i bias[4];  // 16 - z in both 16-bit halves of each column's lane
  const int64_t sg = (t * p.G + g) * kInt4TileN;
  for (int v = 0; v < 4; ++v) {
    bias[v] = _mm512_set1_epi32(0x00080008);
    if (ASYM) {
      const __m512i z = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + sg + 16 * v)));
      const __m512i c = _mm512_sub_epi32(_mm512_set1_epi32(16), z);
      bias[v] = _mm512_or_si512(c, _mm512_slli_epi32(c, 16));
    }
  }
  const int32_t* wp = p.qweight + (t * (p.Kp / 8) + o0) * kInt4TileN;
  const int32_t* end = p.qweight + ((p.N + kInt4TileN - 1) / kInt4TileN) * (p.Kp / 8) * kInt4TileN;
  for (int o = 0; o < no; ++o) {
    const int32_t* pf = wp + (o + kPanelOctets) * kInt4TileN;
    if (pf < end) {
      for (int l = 0; l < 4; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(pf + 16 * l), _MM_HINT_T0);
    }
    for (int v = 0; v < 4; ++v) {
      const __m512i words = _mm512_loadu_si512(wp + o * kInt4TileN + 16 * v);
#pragma GCC unroll 4
      for (int pr = 0; pr < 4; ++pr) {
        // Symmetric: vpermw reads the low 5 bits of each index, the nibble and the lowest bit of
        // the next one, which the symmetric table (q - 8, twice) ignores; no mask, no add.
        const __m512i qz =
            ASYM ? _mm512_permutexvar_epi16(
                       _mm512_add_epi16(_mm512_and_si512(_mm512_srli_epi32(words, 4 * pr), nib),
                                        bias[v]),
                       table)
                 : _mm512_permutexvar_epi16(_mm512_srli_epi32(words, 4 * pr), sym);
        out(4 * o + pr, v, qz);
      }
    }
  }
}

// Stores the pairs as they are: wb[row * 64 + c].
struct StorePairs {
  uint32_t* wb;
  BITPRESS_TARGET_AVX512BF16 __attribute__((always_inline)) void operator()(int row, int v,
                                                                            __m512i qz) const {
    _mm512_store_si512(wb + row * kInt4TileN + 16 * v, qz);
  }
};

BITPRESS_TARGET_AVX512BF16 void unpack_panel_amx(const Int4GemmParams& p, int64_t t, int64_t g,
                                                 int64_t o0, int no, uint32_t* wb) {
  if (p.zeros) {
    qz_pairs<true>(p, t, g, o0, no, StorePairs{wb});
  } else {
    qz_pairs<false>(p, t, g, o0, no, StorePairs{wb});
  }
}

// acc[m][c] += s[c] ct[m][c] for rows [0, rows) and columns [16 v0, 16 v1) (ct: the group's sums
// of x (q - z)).
BITPRESS_TARGET_AVX512 void fold_amx(const Int4GemmParams& p, int64_t t, int64_t g, const float* ct,
                                     int rows, float* acc, int v0, int v1) {
  const int64_t sg = (t * p.G + g) * kInt4TileN;
  for (int v = v0; v < v1; ++v) {
    const __m512 s = _mm512_loadu_ps(p.scales + sg + 16 * v);
#pragma GCC unroll 4
    for (int m = 0; m < rows; ++m) {
      float* op = acc + m * kInt4TileN + 16 * v;
      _mm512_storeu_ps(op, _mm512_fmadd_ps(s, _mm512_load_ps(ct + m * kInt4TileN + 16 * v),
                                           _mm512_loadu_ps(op)));
    }
  }
}

// Rows [m0, m1) (m0 a multiple of 32, m1 of 16, at most kAmxChunkRows) of tiles [t0, t1) into
// acc [t1 - t0][m1 - m0][64].
//
// The fold of a block runs after the next block's tile instructions are issued: the tile unit
// then works through that block's tdpbf16ps while the cores' vector ports fold the previous one
// from the other half of a double buffer. Folding right after each block's own tilestored
// serialized the two (the fold waits on the stores, the next block's tiles on the fold's place in
// the reorder buffer). The block is issued as two 32 x 32 calls with half of the previous block's
// fold after each (~260 uops): a whole fold (~520 uops) behind a call's tile stores filled the
// reorder buffer (512 entries), so the next call's tile instructions issued only once those
// stores retired.
void chunk_amx(const Int4GemmParams& p, const Workspace& w, bool lo, int64_t t0, int64_t t1,
               int64_t m0, int64_t m1, uint32_t* wb, float* acc) {
  const int64_t rows = m1 - m0;
  for (int64_t i = 0; i < (t1 - t0) * rows * kInt4TileN; ++i) acc[i] = 0.f;
  alignas(64) float ct[2][kAmxBlockRows * kInt4TileN];
  struct Pending {
    int64_t t, g;
    int rows;
    float* acc;
  } pending{};
  bool have = false;
  int buf = 0;
  cpu::GemmBf16Args a;
  a.lda = 2 * kSlabPairs;  // a slab row: 64 pairs of bf16
  a.b = wb;
  a.ldb = kInt4TileN;
  a.ldc = kInt4TileN;
  a.N = kInt4TileN / 2;
  for (int64_t g = 0; g < p.G; ++g) {
    for (int64_t o = p.group_starts[g], no; o < p.group_starts[g + 1]; o += no) {
      no = std::min<int64_t>(p.group_starts[g + 1], (o / kPanelOctets + 1) * kPanelOctets) - o;
      a.K = 8 * no;
      for (int64_t t = t0; t < t1; ++t) {
        unpack_panel_amx(p, t, g, o, int(no), wb);
        float* at = acc + (t - t0) * rows * kInt4TileN;
        for (int64_t r = m0; r < m1; r += kAmxBlockRows) {
          a.M = std::min<int64_t>(kAmxBlockRows, m1 - r);
          for (int h = 0; h < 2; ++h) {
            a.c = ct[buf] + h * a.N;
            a.b = wb + h * a.N;
            a.a = reinterpret_cast<const uint16_t*>(w.xh + w.pair(r, 4 * o));
            a.accumulate = false;
            cpu::gemm_bf16_amx(a);
            if (lo) {
              a.a = reinterpret_cast<const uint16_t*>(w.xl + w.pair(r, 4 * o));
              a.accumulate = true;
              cpu::gemm_bf16_amx(a);
            }
            if (have) {
              fold_amx(p, pending.t, pending.g, ct[buf ^ 1], pending.rows, pending.acc, 2 * h,
                       2 * h + 2);
            }
          }
          pending = {t, g, int(a.M), at + (r - m0) * kInt4TileN};
          have = true;
          buf ^= 1;
        }
      }
    }
  }
  if (have) fold_amx(p, pending.t, pending.g, ct[buf ^ 1], pending.rows, pending.acc, 0, 4);
}
#endif

// ---------------------------------------------------------------------------------------------
// Dequantized panels on AMX (int4_gemm_cpu_dequant_amx): the weight decoded per K chunk to
// bf16((q - z) s), then plain tile products over the chunk.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kDqTiles = 4;
constexpr int64_t kDqChunkOctets = 32;  // K per panel: 256 (4 tiles: 128 KiB of bf16 pairs)

#if defined(__x86_64__)
// Stores bf16((q - z) s): wb[row * ld + c], s the group's scales of the columns.
struct StoreScaledPairs {
  uint32_t* wb;
  int64_t ld;
  __m512 sc[4];
  __m512i pairs, hi_mask;
  BITPRESS_TARGET_AVX512BF16 __attribute__((always_inline)) void operator()(int row, int v,
                                                                            __m512i qz) const {
    const __m512 lo = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(qz, 16)), sc[v]);
    const __m512 hi = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(qz, hi_mask)), sc[v]);
    const __m512i b = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    _mm512_store_si512(wb + row * ld + 16 * v, _mm512_permutexvar_epi16(pairs, b));
  }
};

// The pairs of octets [o0, o0 + no) of tile t (group g) as bf16((q - z) s), laid out as
// unpack_panel_amx's with row stride ld: (q - z) from the same tables, the float32 products
// rounded by vcvtne2ps2bf16 (nearest even; NaN quiet, as float_to_bf16_bits; a denormal product
// flushes to zero, which the tiles' DAZ would count as zero anyway) and re-interleaved into pairs
// by one vpermw.
BITPRESS_TARGET_AVX512BF16 void unpack_scaled_panel_amx(const Int4GemmParams& p, int64_t t,
                                                        int64_t g, int64_t o0, int no, uint32_t* wb,
                                                        int64_t ld) {
  alignas(64) static const uint16_t kPairs[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                  21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                  11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  StoreScaledPairs out;
  out.wb = wb;
  out.ld = ld;
  out.pairs = _mm512_load_si512(kPairs);
  out.hi_mask = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  const int64_t sg = (t * p.G + g) * kInt4TileN;
  for (int v = 0; v < 4; ++v) out.sc[v] = _mm512_loadu_ps(p.scales + sg + 16 * v);
  if (p.zeros) {
    qz_pairs<true>(p, t, g, o0, no, out);
  } else {
    qz_pairs<false>(p, t, g, o0, no, out);
  }
}

#endif

thread_local ThreadBuffer t_xpad;  // the calling thread: x gathered row-major, padded (dequant)

}  // namespace

Status int4_gemm_cpu_dequant_amx(const Int4GemmParams& p, const CpuThreadPool* pool) {
  const Status st = int4_gemm_check(p);
  if (st != Status::kSuccess || p.M == 0 || p.N == 0) return st;
#if defined(__x86_64__)
  if (!int4_gemm_dequant_amx_supported(p)) return Status::kUnsupported;
  // x gathered by perm (rows of x that no packed row names multiply nothing), zero past K and
  // past M up to 16 rows, row-major with a row stride 64 bytes longer than Kp (a power-of-two
  // stride would put the 16 rows of a tile in a few L1 sets).
  const int64_t Mp = (p.M + 15) / 16 * 16, lda = p.Kp + 32;
  uint16_t* xp = static_cast<uint16_t*>(t_xpad.get(size_t(Mp) * lda * 2));
  if (!xp) return Status::kOutOfMemory;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  parallel_for(pool, 0, Mp, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      uint16_t* row = xp + m * lda;
      if (m >= p.M) {
        memset(row, 0, size_t(p.Kp) * 2);
        continue;
      }
      const uint16_t* src = x + m * p.x_row_stride;
      if (p.perm) {
        for (int64_t r = 0; r < p.Kp; ++r) row[r] = p.perm[r] >= 0 ? src[p.perm[r]] : 0;
      } else {
        memcpy(row, src, size_t(p.K) * 2);
        memset(row + p.K, 0, size_t(p.Kp - p.K) * 2);
      }
    }
  });
  const int64_t Nt = (p.N + kInt4TileN - 1) / kInt4TileN;
  const cpu::ConvertFn convert = cpu::converter(p.out_dtype, CpuIsa::kAmx);
  const int64_t blocks = Mp / 16, chunks = (Mp + kAmxChunkRows - 1) / kAmxChunkRows;
  const int64_t groups = (Nt + kDqTiles - 1) / kDqTiles;
  const int64_t n_oct = p.Kp / 8;
  bool oom = false;
  parallel_for(pool, 0, groups * chunks, 1, [&](int64_t i0, int64_t i1) {
    cpu::gemm_amx_thread_begin();
    float* acc = static_cast<float*>(
        t_acc.get(size_t(kDqTiles) * kAmxChunkRows * kInt4TileN * sizeof(float) +
                  size_t(4 * kDqChunkOctets) * kDqTiles * kInt4TileN * 4));
    if (!acc) {
      oom = true;
      return;
    }
    uint32_t* wb = reinterpret_cast<uint32_t*>(acc + kDqTiles * kAmxChunkRows * kInt4TileN);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i % chunks;
      const int64_t m0 = blocks * c / chunks * 16, m1 = blocks * (c + 1) / chunks * 16;
      const int64_t t0 = i / chunks * kDqTiles, t1 = std::min(Nt, t0 + kDqTiles);
      const int64_t rows = m1 - m0, ld = (t1 - t0) * kInt4TileN;
      // The tiles' panels side by side (B [pairs][ld]) and C [rows][ld]: one microkernel call
      // per chunk sweeps all their columns, so each 32-row block of x (16 KiB of the chunk, L1)
      // serves 8 column blocks instead of 2.
      cpu::GemmBf16Args a;
      a.lda = lda;
      a.b = wb;
      a.ldb = ld;
      a.c = acc;
      a.ldc = ld;
      a.M = rows;
      a.N = ld;
      for (int64_t oc = 0, g = 0; oc < n_oct; oc += kDqChunkOctets) {
        const int64_t oe = std::min(n_oct, oc + kDqChunkOctets);
        for (int64_t t = t0; t < t1; ++t) {
          // The chunk's pairs of tile t, group by group.
          int64_t gg = g;
          for (int64_t o = oc; o < oe;) {
            while (p.group_starts[gg + 1] <= o) ++gg;
            const int64_t no = std::min<int64_t>(oe, p.group_starts[gg + 1]) - o;
            uint32_t* dst = wb + 4 * (o - oc) * ld + (t - t0) * kInt4TileN;
            unpack_scaled_panel_amx(p, t, gg, o, int(no), dst, ld);
            o += no;
          }
        }
        a.a = xp + m0 * lda + 8 * oc;
        a.K = 8 * (oe - oc);
        a.accumulate = oc > 0;
        cpu::gemm_bf16_amx(a);
        while (g < p.G && p.group_starts[g + 1] <= oe) ++g;
      }
      const int mb = int(std::min(m1, p.M) - m0);
      for (int64_t t = t0; t < t1 && mb > 0; ++t) {
        store_tile(p, t, m0, mb, acc + (t - t0) * kInt4TileN, convert, ld);
      }
    }
  });
  return oom ? Status::kOutOfMemory : Status::kSuccess;
#else
  return Status::kUnsupported;
#endif
}

bool int4_gemm_dequant_amx_supported(const Int4GemmParams& p) {
#if defined(__x86_64__)
  return active_cpu_isa() == CpuIsa::kAmx && cpu_features().avx512_bf16 &&
         p.x_dtype == DType::kBFloat16 && p.Kp % 32 == 0 && p.M > 0;
#else
  (void)p;
  return false;
#endif
}

namespace {

template <int MB>
void tile_fp32_portable(const Int4GemmParams& p, const Workspace& w, int64_t t, int64_t m0,
                        float* acc) {
  tile_fp32<4, MB>(p, w, t, m0, acc);
}

using TileFn = void (*)(const Int4GemmParams&, const Workspace&, int64_t, int64_t, float*);

template <template <int> class Sel>
TileFn by_rows(int mb) {
  switch (mb) {
    case 1:
      return Sel<1>::fn;
    case 2:
      return Sel<2>::fn;
    case 3:
      return Sel<3>::fn;
    case 4:
      return Sel<4>::fn;
    case 5:
      return Sel<5>::fn;
    case 6:
      return Sel<6>::fn;
    case 7:
      return Sel<7>::fn;
    default:
      return Sel<8>::fn;
  }
}

template <int MB>
struct SelPortable {
  static constexpr TileFn fn = tile_fp32_portable<MB>;
};
#if defined(__x86_64__)
template <int MB>
struct SelAvx2 {
  static constexpr TileFn fn = tile_fp32_avx2<MB>;
};
template <int MB>
struct SelAvx512 {
  static constexpr TileFn fn = tile_fp32_avx512<MB>;
};
template <int MB>
struct SelBf16 {
  static constexpr TileFn fn = tile_bf16<MB, false>;
};
template <int MB>
struct SelBf16Lo {
  static constexpr TileFn fn = tile_bf16<MB, true>;
};
#endif

}  // namespace

size_t int4_gemm_cpu_workspace_size(int64_t M, int64_t Kp, int64_t G) {
  const size_t ldf = align64(size_t(Kp) * 4), ldp = pair_row_bytes(Kp);
  const size_t ldg = align64(size_t(std::max<int64_t>(G, 1)) * 4);
  return size_t(padded_rows(M)) * (std::max(ldf, 2 * ldp) + ldg) + 64;  // see carve()
}

Status int4_gemm_check(const Int4GemmParams& p) {
  if (p.M < 0 || p.K < 0 || p.N < 0 || p.Kp < 0 || p.Kp % 8 != 0 || p.G < 0) {
    return Status::kInvalidArgument;
  }
  if (!dtype_valid(p.x_dtype) || !dtype_valid(p.out_dtype)) return Status::kInvalidArgument;
  if (p.bias && !dtype_valid(p.bias_dtype)) return Status::kInvalidArgument;
  if (!p.perm && p.Kp != p.K) return Status::kInvalidArgument;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  if (!p.out || p.out_row_stride < p.N) return Status::kInvalidArgument;
  if (!p.group_starts || (p.Kp > 0 && (!p.qweight || !p.scales))) return Status::kInvalidArgument;
  if (p.K > 0 && (!p.x || p.x_row_stride < p.K)) return Status::kInvalidArgument;
  if (p.G == 0 ? p.Kp != 0 : (p.group_starts[0] != 0 || p.group_starts[p.G] != p.Kp / 8)) {
    return Status::kInvalidArgument;
  }
  for (int64_t g = 0; g < p.G; ++g) {
    if (p.group_starts[g + 1] < p.group_starts[g]) return Status::kInvalidArgument;
  }
  if (p.perm) {
    for (int64_t i = 0; i < p.Kp; ++i) {
      if (p.perm[i] < -1 || p.perm[i] >= p.K) return Status::kInvalidArgument;
    }
  }
  if (p.workspace && (p.workspace_bytes < int4_gemm_cpu_workspace_size(p.M, p.Kp, p.G) ||
                      (reinterpret_cast<uintptr_t>(p.workspace) & 63) != 0)) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

Status int4_gemm_cpu(const Int4GemmParams& p, const CpuThreadPool* pool) {
  const Status st = int4_gemm_check(p);
  if (st != Status::kSuccess || p.M == 0 || p.N == 0) return st;
  const CpuIsa isa = active_cpu_isa();
  const bool bf16_path =
      isa >= CpuIsa::kAvx512 && cpu_features().avx512_bf16 && p.x_dtype != DType::kFloat32;
  const bool lo = p.x_dtype != DType::kBFloat16;
#if defined(__x86_64__)
  const bool amx = bf16_path && isa == CpuIsa::kAmx && p.M >= kAmxMinRows && amx_groups_ok(p);
#else
  const bool amx = false;
#endif
  const bool panels = bf16_path && (p.M >= kPanelMinRows || amx);
  void* ws = p.workspace;
  if (!ws) {
    ws = t_workspace.get(int4_gemm_cpu_workspace_size(p.M, p.Kp, p.G));
    if (!ws) return Status::kOutOfMemory;
  }
  const Workspace w = carve(p, ws, panels);
  // The AMX path multiplies bf16 x as it is (its products need no residual, its fold no xsum):
  // a row is copied into its slabs, 256 bytes at a time, instead of converted and summed.
  const bool copy_rows = amx && !lo && !p.perm;
  parallel_for(pool, 0, p.M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (copy_rows) {
        const uint16_t* src = static_cast<const uint16_t*>(p.x) + m * p.x_row_stride;
        for (int64_t i = 0; i < p.Kp / 2; i += kSlabPairs) {
          memcpy(w.xh + w.pair(m, i), src + 2 * i,
                 size_t(std::min<int64_t>(kSlabPairs, p.Kp / 2 - i)) * 4);
        }
      } else {
        prepare_row(p, w, m, bf16_path);
      }
    }
  });
  if (panels && w.M > p.M) {
    // The zero rows of the last row tile (the AMX path reads them; their sums are never stored).
    for (int64_t m = p.M; m < w.M; ++m) {
      for (int64_t i = 0; i < p.Kp / 2; ++i) {
        w.xh[w.pair(m, i)] = 0;
        if (lo) w.xl[w.pair(m, i)] = 0;
      }
      for (int64_t g = 0; g < p.G; ++g) w.xsum[m * w.ldg + g] = 0.f;
    }
  }

  const int64_t Nt = (p.N + kInt4TileN - 1) / kInt4TileN;
  const cpu::ConvertFn convert = cpu::converter(p.out_dtype, isa);
#if defined(__x86_64__)
  if (amx) {
    // Tasks: (4 tiles) x (chunks of whole 32-row blocks, at most kAmxChunkRows rows).
    const int64_t Mp = w.M, blocks = (Mp + kAmxBlockRows - 1) / kAmxBlockRows;
    const int64_t chunks = (Mp + kAmxChunkRows - 1) / kAmxChunkRows;
    const int64_t groups = (Nt + kTileGroup - 1) / kTileGroup;
    bool oom = false;
    parallel_for(pool, 0, groups * chunks, 1, [&](int64_t i0, int64_t i1) {
      // oneDNN (F.linear) and others configure and release this thread's tiles between our calls.
      cpu::gemm_amx_thread_begin();
      alignas(64) uint32_t wb[4 * kPanelOctets * kInt4TileN];
      float* acc = static_cast<float*>(
          t_acc.get(size_t(kTileGroup) * kAmxChunkRows * kInt4TileN * sizeof(float)));
      if (!acc) {
        oom = true;
        return;
      }
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % chunks;
        const int64_t m0 = blocks * c / chunks * kAmxBlockRows;
        const int64_t m1 = std::min(Mp, blocks * (c + 1) / chunks * kAmxBlockRows);
        const int64_t t0 = i / chunks * kTileGroup, t1 = std::min(Nt, t0 + kTileGroup);
        chunk_amx(p, w, lo, t0, t1, m0, m1, wb, acc);
        const int mb = int(std::min(m1, p.M) - m0);
        for (int64_t t = t0; t < t1; ++t)
          store_tile(p, t, m0, mb, acc + (t - t0) * (m1 - m0) * kInt4TileN, convert);
      }
    });
    return oom ? Status::kOutOfMemory : Status::kSuccess;
  }
  if (panels) {
    const int64_t chunks = (p.M + kChunkRows - 1) / kChunkRows;
    const int64_t groups = (Nt + kTileGroup - 1) / kTileGroup;
    const int64_t max_rows = (p.M + chunks - 1) / chunks;
    parallel_for(pool, 0, groups * chunks, 1, [&](int64_t i0, int64_t i1) {
      alignas(64) uint32_t wb[4 * kPanelOctets * kInt4TileN];
      // Up to 256 KiB: this thread's reusable buffer, not a worker's stack. Without memory, one
      // tile and 16 rows at a time from a stack buffer.
      alignas(64) float small[16 * kInt4TileN];
      const size_t bytes = size_t(kTileGroup) * max_rows * kInt4TileN * 4;
      float* heap = static_cast<float*>(t_acc.get(bytes));
      const int64_t tg = heap ? kTileGroup : 1, rg = heap ? max_rows : 16;
      float* acc = heap ? heap : small;
      for (int64_t i = i0; i < i1; ++i) {
        // Consecutive tasks walk the row chunks of the same tiles: their weight strips stay in L2.
        const int64_t c = i % chunks, m0 = p.M * c / chunks, m1 = p.M * (c + 1) / chunks;
        const int64_t T0 = i / chunks * kTileGroup, T1 = std::min(Nt, T0 + kTileGroup);
        for (int64_t t0 = T0; t0 < T1; t0 += tg) {
          for (int64_t r0 = m0; r0 < m1; r0 += rg) {
            const int64_t t1 = std::min(T1, t0 + tg), r1 = std::min(m1, r0 + rg);
            chunk_bf16(p, w, lo, t0, t1, r0, r1, wb, acc);
            for (int64_t t = t0; t < t1; ++t)
              store_tile(p, t, r0, int(r1 - r0), acc + (t - t0) * (r1 - r0) * kInt4TileN, convert);
          }
        }
      }
    });
    return Status::kSuccess;
  }
#endif
#if defined(__x86_64__)
  if (bf16_path && p.M == 1) {
    // Tasks of kStreamTiles tiles (tiles_bf16); the last one may have fewer.
    constexpr int U = kStreamTiles;
    parallel_for(pool, 0, (Nt + U - 1) / U, 1, [&](int64_t i0, int64_t i1) {
      alignas(64) float acc[U * kInt4TileN];
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = U * i;
        const int64_t n = std::min<int64_t>(U, Nt - t);
        if (n == 4) {
          (lo ? tiles_bf16<4, true> : tiles_bf16<4, false>)(p, w, t, acc);
        } else if (n >= 2) {
          (lo ? tiles_bf16<2, true> : tiles_bf16<2, false>)(p, w, t, acc);
          if (n == 3) {
            (lo ? tile_bf16<1, true> : tile_bf16<1, false>)(p, w, t + 2, 0, acc + 2 * kInt4TileN);
          }
        } else {
          (lo ? tile_bf16<1, true> : tile_bf16<1, false>)(p, w, t, 0, acc);
        }
        for (int64_t u = 0; u < n; ++u) store_tile(p, t + u, 0, 1, acc + u * kInt4TileN, convert);
      }
    });
    return Status::kSuccess;
  }
#endif
  const int64_t blocks = (p.M + kMaxRowBlock - 1) / kMaxRowBlock;
  parallel_for(pool, 0, Nt * blocks, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float acc[kMaxRowBlock * kInt4TileN];
    for (int64_t i = i0; i < i1; ++i) {
      // Consecutive tasks walk the row blocks of one tile: its weight strip (K/2 bytes per
      // column, 128 KiB at K = 4096) is read from DRAM once and then from L2.
      const int64_t t = i / blocks, m0 = (i % blocks) * kMaxRowBlock;
      const int mb = int(std::min<int64_t>(kMaxRowBlock, p.M - m0));
      TileFn fn;
#if defined(__x86_64__)
      if (bf16_path) {
        fn = lo ? by_rows<SelBf16Lo>(mb) : by_rows<SelBf16>(mb);
      } else if (isa >= CpuIsa::kAvx512) {
        fn = by_rows<SelAvx512>(mb);
      } else if (isa == CpuIsa::kAvx2) {
        fn = by_rows<SelAvx2>(mb);
      } else {
        fn = by_rows<SelPortable>(mb);
      }
#else
      fn = by_rows<SelPortable>(mb);
#endif
      fn(p, w, t, m0, acc);
      store_tile(p, t, m0, mb, acc, convert);
    }
  });
  return Status::kSuccess;
}

}  // namespace bitpress
