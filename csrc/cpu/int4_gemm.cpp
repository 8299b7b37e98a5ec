// CPU kernels of int4_gemm (see bitpress/int4_gemm.h for the formula and the layout).
//
// Work: the columns come in tiles of 64 and the rows of x in blocks of up to 4; each (tile,
// row block) is one task of the thread pool. Per task and per group g the kernel accumulates
//   a[m, n] = sum_{k in g} q'[k, n] x[m, k]
// in registers, then folds the group in:  y[m, n] += s[g, n] (a[m, n] - z'[g, n] xsum[m, g]),
// where q' and z' carry the offset of the representation (128 + q on the bf16 path, q on the
// fp32 path) and xsum is the sum of the same x values over the group. Zero points and scales
// thus cost a few operations per group, not per weight.
//
// At M = 1 the kernel is bound by the weight stream (4.6 bits per weight with scales and zeros);
// the inner loop must unpack and multiply 128 weights per 64-byte line faster than memory
// delivers them: 2 integer ops + 1 vdpbf16ps per 32 weights on the bf16 path.
#include "bitpress/int4_gemm.h"

#include <string.h>

#include <algorithm>

#include "convert.h"
#include "isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress {
namespace {

constexpr int kMaxRowBlock = 8;
constexpr int kRowOfNibble[8] = {0, 2, 4, 6, 1, 3, 5, 7};

inline size_t align64(size_t n) { return (n + 63) & ~size_t(63); }

// Workspace: x gathered in packed-row order as float32 (fp32 paths) or as bf16 pairs hi / lo
// (bf16 path), and the per-group sums of the values each path multiplies.
struct Workspace {
  float* xf;     // [M, Kp]
  uint32_t* xh;  // [M, Kp/2]: (bf16 hi of row 2i, of row 2i+1)
  uint32_t* xl;  // [M, Kp/2]: the residuals x - hi as bf16 (zero for bf16 x)
  float* xsum;   // [M, G]
  int64_t ldf, ldp, ldg;
};

Workspace carve(const Int4GemmParams& p) {
  Workspace w;
  w.ldf = int64_t(align64(size_t(p.Kp) * 4) / 4);
  w.ldp = int64_t(align64(size_t(p.Kp / 2) * 4) / 4);
  w.ldg = int64_t(align64(size_t(std::max<int64_t>(p.G, 1)) * 4) / 4);
  char* base = static_cast<char*>(p.workspace);
  w.xf = reinterpret_cast<float*>(base);
  base += size_t(p.M) * w.ldf * 4;
  w.xh = reinterpret_cast<uint32_t*>(base);
  base += size_t(p.M) * w.ldp * 4;
  w.xl = reinterpret_cast<uint32_t*>(base);
  base += size_t(p.M) * w.ldp * 4;
  w.xsum = reinterpret_cast<float*>(base);
  return w;
}

// x row m in packed-row order (perm; zero for padding rows), and its group sums.
void prepare_row(const Int4GemmParams& p, const Workspace& w, int64_t m, bool pairs) {
  float* xf = w.xf + m * w.ldf;
  const int64_t base = m * p.x_row_stride;
  for (int64_t i = 0; i < p.Kp; ++i) {
    const int64_t src = p.perm ? p.perm[i] : i;
    xf[i] = src >= 0 ? load_as_float(p.x, p.x_dtype, base + src) : 0.f;
  }
  float* xs = w.xsum + m * w.ldg;
  for (int64_t g = 0; g < p.G; ++g) {
    float s = 0.f;
    for (int64_t i = 8 * p.group_starts[g]; i < 8 * p.group_starts[g + 1]; ++i) {
      if (pairs) {
        // hi + lo is the value the bf16 path multiplies: sum exactly that.
        const float hi = bf16_bits_to_float(float_to_bf16_bits(xf[i]));
        s += hi + bf16_bits_to_float(float_to_bf16_bits(xf[i] - hi));
      } else {
        s += xf[i];
      }
    }
    xs[g] = s;
  }
  if (!pairs) return;
  uint32_t* xh = w.xh + m * w.ldp;
  uint32_t* xl = w.xl + m * w.ldp;
  for (int64_t i = 0; i < p.Kp / 2; ++i) {
    const float a = xf[2 * i], b = xf[2 * i + 1];
    const uint16_t ah = float_to_bf16_bits(a), bh = float_to_bf16_bits(b);
    const uint16_t al = float_to_bf16_bits(a - bf16_bits_to_float(ah));
    const uint16_t bl = float_to_bf16_bits(b - bf16_bits_to_float(bh));
    xh[i] = uint32_t(ah) | (uint32_t(bh) << 16);
    xl[i] = uint32_t(al) | (uint32_t(bl) << 16);
  }
}

// acc [mb][64] + bias -> out rows m0.., columns 64t.. (< N), rounded to the output dtype.
void store_tile(const Int4GemmParams& p, int64_t t, int64_t m0, int mb, const float* acc,
                cpu::ConvertFn convert) {
  const int64_t n0 = t * kInt4TileN;
  const int64_t nn = std::min<int64_t>(kInt4TileN, p.N - n0);
  const int osz = dtype_size(p.out_dtype);
  alignas(64) float row[kInt4TileN];
  for (int m = 0; m < mb; ++m) {
    for (int64_t c = 0; c < nn; ++c) {
      row[c] =
          acc[m * kInt4TileN + c] + (p.bias ? load_as_float(p.bias, p.bias_dtype, n0 + c) : 0.f);
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
#endif

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
  const size_t ldf = align64(size_t(Kp) * 4), ldp = align64(size_t(Kp / 2) * 4);
  const size_t ldg = align64(size_t(std::max<int64_t>(G, 1)) * 4);
  return size_t(M) * (ldf + 2 * ldp + ldg) + 64;
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
  if (!p.workspace || p.workspace_bytes < int4_gemm_cpu_workspace_size(p.M, p.Kp, p.G) ||
      (reinterpret_cast<uintptr_t>(p.workspace) & 63) != 0) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

Status int4_gemm_cpu(const Int4GemmParams& p, const CpuThreadPool* pool) {
  const Status st = int4_gemm_check(p);
  if (st != Status::kSuccess || p.M == 0 || p.N == 0) return st;
  const CpuIsa isa = active_cpu_isa();
  const bool bf16_path =
      isa == CpuIsa::kAvx512 && cpu_features().avx512_bf16 && p.x_dtype != DType::kFloat32;
  const bool lo = p.x_dtype != DType::kBFloat16;
  const Workspace w = carve(p);
  parallel_for(pool, 0, p.M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) prepare_row(p, w, m, bf16_path);
  });

  const int64_t Nt = (p.N + kInt4TileN - 1) / kInt4TileN;
  const int64_t blocks = (p.M + kMaxRowBlock - 1) / kMaxRowBlock;
  const cpu::ConvertFn convert = cpu::converter(p.out_dtype, isa);
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
      } else if (isa == CpuIsa::kAvx512) {
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
