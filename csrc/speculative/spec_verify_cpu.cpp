// CPU kernel of spec_verify (contract in bitpress/speculative/spec_verify.h and
// bitpress.ops.spec_verify).
//
// One task per row (at::parallel_for over rows through the pool hook). A row walks its positions
// in order and stops at the first rejection, so only the positions it decides are read. Each
// position streams its logits once, kChunk elements at a time through an L1-resident buffer:
//   greedy:   chunk max, then the first index of it (only when the chunk beats the running max);
//   sampling: online softmax (Milakov & Gimelshein 2018) in base 2 (z = logit * log2(e) / T):
//             running max m and sum S, S rescaled by 2^(m_old - m_new) when a chunk raises the
//             max; chunks whose max is more than 126 below m add exactly 0 and skip the exp; the
//             accept test needs only e(x) / S. The load of chunk c + 1 runs inside the exp loop
//             of chunk c. A draft position of an unfiltered row first tries sure_accept: a max
//             pass whose bound on S can prove the accept without any exp (peaked targets).
// The token sampled at the deciding position costs one more pass over that row: per-chunk sums of
// the weights, then the chunk that holds the target and a sequential walk inside it.
// top_k / top_p rows keep the scaled logits of the position in a row buffer and find their
// thresholds by binary searches over it (32 counting passes for top_k, ~30 masked sums for top_p).
//
// The math is written once with GCC vector extensions and compiled for each ISA path under its
// target attribute (16 lanes AVX-512, 8 lanes AVX2, 4 lanes portable); the scalar tails use the
// same shared helpers. fp-contract=off keeps every multiply and add rounded on its own, as in the
// other backends (an FMA would change the last bit of exp and of the accept test).
#pragma GCC optimize("fp-contract=off")
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always_inline helpers only

#include <string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "bitpress/speculative/spec_verify.h"
#include "common/isa.h"

namespace bitpress {
namespace {

constexpr int64_t kChunk = 2048;  // floats per chunk: 8 KiB, two buffers stay in L1
constexpr float kInf = std::numeric_limits<float>::infinity();

template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};

template <int W>
__attribute__((always_inline)) inline typename Vec<W>::f vload(const float* p) {
  typename Vec<W>::f v;
  memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
__attribute__((always_inline)) inline typename Vec<W>::f vsplat(float x) {
  return typename Vec<W>::f{} + x;
}

// m ? a : b with a lane mask (-1 / 0) as bit operations: GCC lowers the vector ?: of C++ to a
// per-lane scalar sequence here, the bit select to vpternlog / blends.
template <int W>
__attribute__((always_inline)) inline typename Vec<W>::f vsel(typename Vec<W>::i m,
                                                              typename Vec<W>::f a,
                                                              typename Vec<W>::f b) {
  using I = typename Vec<W>::i;
  using F = typename Vec<W>::f;
  return (F)(((I)a & m) | ((I)b & ~m));
}

// a >= b as a lane mask (-1 / 0). The empty asm keeps the mask an ordinary integer vector: where
// GCC sees such a comparison and-ed with another or feeding a select, it builds an AVX-512 mask
// expression that its generic vector lowering then expands lane by lane (vcomiss / setae per lane,
// several times slower than the exp itself).
template <int W>
__attribute__((always_inline)) inline typename Vec<W>::i vge(typename Vec<W>::f a,
                                                             typename Vec<W>::f b) {
  typename Vec<W>::i m = a >= b;
  asm("" : "+x"(m));
  return m;
}

// spec::exp2_neg on W lanes: the same operations in the same order. 2^n is built from the bits of
// t = d + 1.5 * 2^23, whose low mantissa bits hold n + 2^22: (bits(t) + 127) << 23 keeps the low
// 9 bits of n + 127 (the 2^22 term shifts out), the same bits as converting n to an integer.
// Lanes with d < -126 (or NaN) are computed on garbage and zeroed at the end.
//
// AVX-512 (W = 16) spells the same values with fewer instructions, as inline asm because the
// intrinsics cannot be inlined into these untargeted templates (GCC checks the target of each
// always_inline callee before the template reaches rows_avx512):
//   n = vrndscaleps(d, nearest even): the same n as (d + M) - M for |d| < 2^22, one operation
//     instead of two (|d| >= 2^22 only for d < -126, zeroed);
//   y * 2^n = vscalefps(y, n): exact (y in [1, 2) for n = -126, so never subnormal), equal to the
//     multiply by the built power of two for n in [-126, 0] (d = z - max z <= 0 or NaN, never
//     above 0); it replaces the vpaddd + vpslld + vmulps that built and applied 2^n;
//   the zeroing of d < -126 / NaN lanes: a zero-masked vscalefps (no separate select).
// 18 instead of 22 zmm operations per 16 exps in exp_sum_load. Compared bit for bit with the
// W-lane formula over all 2^32 float patterns: identical for every d <= 0 and every NaN (d > 0
// never occurs). Not used: fma(a, 1, b) for the adds (the same bits as a + b, on the FMA pipes):
// this core (AMD family 0x1A) completed about two 512-bit FP operations per cycle whatever their
// kind (18 in ~8.3 cycles at 3.9 GHz in a microbenchmark, 2.1 ns per 16 exps), so only fewer
// operations help; moving 1 to 6 adds to FMA made the loop 0-6% slower (FMA latency).
// 2^f for f in [-0.5, 0.5]: the Horner steps of spec::exp2_neg, each multiply and add rounded on
// its own (fp-contract=off).
template <int W>
__attribute__((always_inline)) inline typename Vec<W>::f vexp2_poly(typename Vec<W>::f f) {
  typename Vec<W>::f y = vsplat<W>(spec::kExp2C6) * f + spec::kExp2C5;
  y = y * f + spec::kExp2C4;
  y = y * f + spec::kExp2C3;
  y = y * f + spec::kExp2C2;
  y = y * f + spec::kExp2C1;
  return y * f + 1.0f;
}

template <int W>
__attribute__((always_inline)) inline typename Vec<W>::f vexp2_neg(typename Vec<W>::f d) {
  using F = typename Vec<W>::f;
  using I = typename Vec<W>::i;
  using U = typename Vec<W>::u;
  if constexpr (W == 16) {
    const F kmin = vsplat<W>(spec::kExp2Min);
    uint16_t ok;  // d >= -126: false for NaN and -inf (predicate GE_OQ)
    asm("vcmpps $0x1d, %[m], %[d], %[k]" : [k] "=Yk"(ok) : [d] "v"(d), [m] "v"(kmin));
    F n;
    asm("vrndscaleps $8, %[d], %[n]" : [n] "=v"(n) : [d] "v"(d));  // nearest even, no #P
    const F f = d - n;
    const F y = vexp2_poly<W>(f);
    F r;
    asm("vscalefps %[n], %[y], %[r]%{%[k]%}%{z%}"
        : [r] "=v"(r)
        : [y] "v"(y), [n] "v"(n), [k] "Yk"(ok));
    return r;
  } else {
    const I ok = d >= vsplat<W>(spec::kExp2Min);  // false for NaN and -inf
    const F t = d + spec::kRoundMagic;
    const F n = t - spec::kRoundMagic;
    const F f = d - n;
    const F y = vexp2_poly<W>(f);
    const U pow2 = ((U)t + 127u) << 23;
    return vsel<W>(ok, y * (F)pow2, vsplat<W>(0.0f));
  }
}

// m = v > m ? v : m, lane by lane (NaN in v keeps m): exactly vmaxps(v, m), one operation instead
// of a compare and a blend; asm for the same reason as above (written in place: no extra move).
template <int W>
__attribute__((always_inline)) inline void vmax_into(typename Vec<W>::f& m, typename Vec<W>::f v) {
  if constexpr (W == 16) {
    asm("vmaxps %[m], %[v], %[m]" : [m] "+v"(m) : [v] "v"(v));
  } else if constexpr (W == 8) {
    asm("vmaxps %[m], %[v], %[m]" : [m] "+x"(m) : [v] "x"(v));
  } else {
    m = vsel<W>(v > m, v, m);
  }
}

// v < m ? v : m (vminps(v, m); NaN in v gives m): only for upper bounds, where either is fine.
template <int W>
__attribute__((always_inline)) inline typename Vec<W>::f vmin_bound(typename Vec<W>::f v,
                                                                    typename Vec<W>::f m) {
  typename Vec<W>::f r;
  if constexpr (W == 16) {
    asm("vminps %[m], %[v], %[r]" : [r] "=v"(r) : [v] "v"(v), [m] "v"(m));
  } else if constexpr (W == 8) {
    asm("vminps %[m], %[v], %[r]" : [r] "=x"(r) : [v] "x"(v), [m] "x"(m));
  } else {
    r = vsel<W>(v < m, v, m);
  }
  return r;
}

// W uint16 from p, zero-extended to uint32 lanes. For W = 16 one vpmovzxwd from memory: GCC
// splits __builtin_convertvector of 16 halves into two 8-lane conversions, an extract and an
// insert (4 operations instead of 1 in every bf16 / fp16 load).
template <int W>
__attribute__((always_inline)) inline typename Vec<W>::u widen_u16(const uint16_t* p) {
  if constexpr (W == 16) {
    typedef uint16_t Mem __attribute__((vector_size(32), may_alias));
    typename Vec<W>::u u;
    asm("vpmovzxwd %[h], %[u]" : [u] "=v"(u) : [h] "m"(*reinterpret_cast<const Mem*>(p)));
    return u;
  } else {
    typename Vec<W>::h h;
    memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, typename Vec<W>::u);
  }
}

// Exact fp16 -> float without F16C: the fp16 magnitude bits placed in a float are the value times
// 2^-112 (normal and subnormal alike), so one exact multiply restores it; inf / NaN set apart.
BITPRESS_INLINE float half_to_float_mul(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  float f = em >= 0x7c00u ? bits_float(0x7f800000u | ((em & 0x3ffu) << 13))
                          : bits_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  return (h & 0x8000u) ? -f : f;
}

// float(src[i .. i + W)) * scale for one dtype (DT: an int DType, so that the fused loops below
// have no dtype branch inside).
template <int W, int DT>
__attribute__((always_inline)) inline typename Vec<W>::f load_vec(const void* src, int64_t i,
                                                                  float scale) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  if constexpr (DT == int(DType::kFloat32)) {
    return vload<W>(static_cast<const float*>(src) + i) * scale;
  } else if constexpr (DT == int(DType::kBFloat16)) {
    const U u = widen_u16<W>(static_cast<const uint16_t*>(src) + i) << 16;
    return (F)(u)*scale;
  } else {
    const U exp_mask = U{} + 0x7c00u, mag_mask = U{} + 0x7fffu;
    const U w = widen_u16<W>(static_cast<const uint16_t*>(src) + i);
    const U em = w & mag_mask;
    const U special = (U{} + 0x7f800000u) | ((em & 0x3ffu) << 13);
    const U shifted = em << 13;
    F f = (F)(shifted) * 5.192296858534828e+33f;
    const U big = (U)(em >= exp_mask);
    const U fu = (special & big) | ((U)(f) & ~big);
    const U signed_u = fu | ((w & 0x8000u) << 16);
    return (F)(signed_u)*scale;
  }
}

template <int DT>
BITPRESS_INLINE float load_scalar(const void* src, int64_t i) {
  if constexpr (DT == int(DType::kFloat32)) {
    return static_cast<const float*>(src)[i];
  } else if constexpr (DT == int(DType::kBFloat16)) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(src)[i]);
  } else {
    return half_to_float_mul(static_cast<const uint16_t*>(src)[i]);
  }
}

// The end of a chunk load whose full vectors [0, i) are in dst and whose lane maxima are mv: the
// scalar tail [i, n), the max (lanes in order, then the tail: the first maximum wins, as in one
// sequential pass) and `pad` up to a multiple of W.
template <int W, int DT>
__attribute__((always_inline)) inline float finish_chunk(typename Vec<W>::f mv, const void* src,
                                                         int64_t off, int64_t i, int64_t n,
                                                         float scale, float pad,
                                                         float* __restrict dst) {
  for (int64_t t = i; t < n; ++t) dst[t] = load_scalar<DT>(src, off + t) * scale;
  float r = -kInf;
  for (int l = 0; l < W; ++l) r = mv[l] > r ? mv[l] : r;
  for (int64_t t = i; t < n; ++t) r = dst[t] > r ? dst[t] : r;  // the scalar tail
  for (int64_t t = n; t % W; ++t) dst[t] = pad;
  return r;
}

// dst[i] = float(src[off + i]) * scale for i < n, then `pad` up to a multiple of W. Returns the
// largest dst[i], i < n (NaN ignored; -inf if none): the max pass fused into the load, so the
// chunk is read back from L1 once less.
template <int W, int DT>
__attribute__((always_inline)) inline float load_chunk_t(const void* src, int64_t off, int64_t n,
                                                         float scale, float pad,
                                                         float* __restrict dst) {
  using F = typename Vec<W>::f;
  F mv = vsplat<W>(-kInf);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const F v = load_vec<W, DT>(src, off + i, scale);
    memcpy(dst + i, &v, sizeof(v));
    vmax_into<W>(mv, v);
  }
  return finish_chunk<W, DT>(mv, src, off, i, n, scale, pad, dst);
}

template <int W>
__attribute__((always_inline)) inline float load_chunk(const void* src, DType dt, int64_t off,
                                                       int64_t n, float scale, float pad,
                                                       float* __restrict dst) {
  if (dt == DType::kFloat32)
    return load_chunk_t<W, int(DType::kFloat32)>(src, off, n, scale, pad, dst);
  if (dt == DType::kBFloat16)
    return load_chunk_t<W, int(DType::kBFloat16)>(src, off, n, scale, pad, dst);
  return load_chunk_t<W, int(DType::kFloat16)>(src, off, n, scale, pad, dst);
}

template <int W>
__attribute__((always_inline)) inline float hsum(typename Vec<W>::f s) {
  float r = 0.0f;
  for (int l = 0; l < W; ++l) r += s[l];
  return r;
}

// Σ 2^(z - m) over a padded chunk z[0, np), fused with the load of the row's next chunk
// (src[off, off + n1), n1 <= 0: none) into znext; returns its max in *next_max. Separate passes
// ran one after the other: the exp loop is bound by the latency of its Horner chains (spare issue
// slots) and the load pass by the reads, so the loads of the next chunk are issued among the
// exps of this one and their misses overlap the exp work (this replaced a software prefetch of
// the next chunk, which gained nothing measurable). The sum runs in the same order as before.
template <int W, int DT>
__attribute__((always_inline)) inline float exp_sum_load(const float* z, int64_t np, float m,
                                                         const void* src, int64_t off, int64_t n1,
                                                         float scale, float* __restrict znext,
                                                         float* next_max) {
  using F = typename Vec<W>::f;
  F s = vsplat<W>(0.0f), mv = vsplat<W>(-kInf);
  const int64_t nl = n1 > 0 ? n1 / W * W : 0;  // full vectors of the next chunk
  int64_t i = 0;
  for (; i < np; i += W) {
    if (i < nl) {
      const F v = load_vec<W, DT>(src, off + i, scale);
      memcpy(znext + i, &v, sizeof(v));
      vmax_into<W>(mv, v);
    }
    s += vexp2_neg<W>(vload<W>(z + i) - m);
  }
  for (; i < nl; i += W) {  // the next chunk is longer than this one (not with equal chunks)
    const F v = load_vec<W, DT>(src, off + i, scale);
    memcpy(znext + i, &v, sizeof(v));
    vmax_into<W>(mv, v);
  }
  if (n1 > 0) *next_max = finish_chunk<W, DT>(mv, src, off, nl, n1, scale, -kInf, znext);
  return hsum<W>(s);
}

struct Filter {
  float m = 0.0f, S = 0.0f;  // max of the scaled logits; normalizer over the kept set
  float zthr = -kInf;        // top_k: keep z >= zthr
  float etau = 0.0f;         // top_p: keep 2^(z - m) >= etau
  bool kept(float z, float e) const { return z >= zthr && e >= etau; }
};

struct Scratch {
  std::vector<float> chunk, chunk2, q, row, e, csum;
  std::vector<uint32_t> keys;
};

inline int64_t padded(int64_t n, int W) { return (n + W - 1) / W * W; }

// Every member is forced inline: only code inlined into the target-attributed entry points below
// is compiled for AVX2 / AVX-512 (a separate function would get the baseline ISA and emulate the
// wide vectors).
#define BITPRESS_FORCE_INLINE __attribute__((always_inline)) inline

// A draft_probs value the kernel can use: finite and >= 0.
BITPRESS_FORCE_INLINE bool q_ok(float q) { return q >= 0.0f && q < kInf; }

template <int W>
struct RowKernel {
  const SpecVerifyParams& p;
  Scratch& s;
  std::atomic<int64_t>& bad_q;  // smallest flat index of an invalid q read, or INT64_MAX
  int64_t cur_b = 0, cur_j = 0;
  bool q_failed = false;

  BITPRESS_FORCE_INLINE void q_bad(int64_t b, int64_t j, int64_t v) {
    const int64_t idx = (b * p.K + j) * p.V + v;
    int64_t cur = bad_q.load(std::memory_order_relaxed);
    while (idx < cur && !bad_q.compare_exchange_weak(cur, idx, std::memory_order_relaxed)) {
    }
    q_failed = true;
  }

  BITPRESS_FORCE_INLINE const void* logits_row(int64_t b, int64_t j) const {
    return static_cast<const char*>(p.logits) +
           (b * p.logits_stride_b + j * p.logits_stride_k) * dtype_size(p.logits_dtype);
  }
  BITPRESS_FORCE_INLINE const void* q_row(int64_t b, int64_t j) const {
    return static_cast<const char*>(p.draft_probs) +
           (b * p.draft_probs_stride_b + j * p.draft_probs_stride_k) *
               dtype_size(p.draft_probs_dtype);
  }

  // argmax_v logits[v] (ties: lowest v).
  BITPRESS_FORCE_INLINE int64_t argmax(const void* row) {
    float best = -kInf;
    int64_t arg = 0;
    bool found = false;
    float* z = s.chunk.data();
    for (int64_t c0 = 0; c0 < p.V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, p.V - c0);
      const float cm = load_chunk<W>(row, p.logits_dtype, c0, n, 1.0f, -kInf, z);
      if (cm > best || (!found && cm == best)) {
        for (int64_t i = 0; i < n; ++i) {
          if (z[i] == cm) {
            arg = c0 + i;
            break;
          }
        }
        best = cm;
        found = true;
      }
    }
    return arg;
  }

  // Online softmax statistics of a row without filters: one pass. Chunk c + 1 is loaded (into
  // the other buffer) during the exp loop of chunk c, see exp_sum_load.
  template <int DT>
  BITPRESS_FORCE_INLINE Filter stats_t(const void* row, float scale) {
    Filter f;
    float m = -kInf, S = 0.0f;
    float* z = s.chunk.data();
    float* znext = s.chunk2.data();
    float cm = load_chunk_t<W, DT>(row, 0, std::min(kChunk, p.V), scale, -kInf, z);
    for (int64_t c0 = 0; c0 < p.V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, p.V - c0), np = padded(n, W);
      if (cm > m) {
        S = spec::mul(S, spec::exp2_neg(spec::sub(m, cm)));
        m = cm;
      }
      const int64_t n1 = std::min(kChunk, p.V - c0 - n);  // the next chunk (<= 0: none)
      float cm1 = -kInf;
      // Every z - m <= cm - m: below -126 the chunk's exp2_neg values are all exactly 0 and so is
      // its sum (adding +0 leaves S unchanged), so skipping it changes no bit.
      if (spec::sub(cm, m) >= spec::kExp2Min) {
        S = spec::add(S, exp_sum_load<W, DT>(z, np, m, row, c0 + n, n1, scale, znext, &cm1));
      } else if (n1 > 0) {
        cm1 = load_chunk_t<W, DT>(row, c0 + n, n1, scale, -kInf, znext);
      }
      std::swap(z, znext);
      cm = cm1;
    }
    f.m = m;
    f.S = S;
    return f;
  }

  BITPRESS_FORCE_INLINE Filter stats(const void* row, float scale) {
    if (p.logits_dtype == DType::kFloat32) return stats_t<int(DType::kFloat32)>(row, scale);
    if (p.logits_dtype == DType::kBFloat16) return stats_t<int(DType::kBFloat16)>(row, scale);
    return stats_t<int(DType::kFloat16)>(row, scale);
  }

  // Statistics with top_k / top_p: thresholds by binary search over a row buffer.
  BITPRESS_FORCE_INLINE Filter filtered_stats(const void* row, float scale, int64_t k,
                                              float top_p) {
    using F = typename Vec<W>::f;
    using I = typename Vec<W>::i;
    using U = typename Vec<W>::u;
    const int64_t np = padded(p.V, W);
    float* z = s.row.data();
    Filter f;
    f.m = -kInf;
    for (int64_t c0 = 0; c0 < p.V; c0 += kChunk) {
      const float cm =
          load_chunk<W>(row, p.logits_dtype, c0, std::min(kChunk, p.V - c0), scale, -kInf, z + c0);
      f.m = cm > f.m ? cm : f.m;
    }
    if (k > 0 && k < p.V) {
      uint32_t* keys = s.keys.data();
      for (int64_t i = 0; i < p.V; ++i) keys[i] = spec::order_key(z[i]);
      // Largest t with #{key >= t} >= k: the key of the k-th largest scaled logit.
      uint64_t lo = 0, hi = uint64_t(1) << 32;
      while (hi - lo > 1) {
        const uint64_t mid = (lo + hi) / 2;
        const U t = U{} + uint32_t(mid);
        I cnt = I{};
        int64_t i = 0;
        for (; i + W <= p.V; i += W) {
          U kv;
          memcpy(&kv, keys + i, sizeof(kv));
          cnt -= (kv >= t);  // true lanes are -1
        }
        int64_t total = 0;
        for (int l = 0; l < W; ++l) total += cnt[l];
        for (; i < p.V; ++i) total += keys[i] >= uint32_t(mid);
        if (total >= k) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      f.zthr = spec::key_float(uint32_t(lo));
    }
    float* e = s.e.data();
    const F zthr = vsplat<W>(f.zthr);
    F acc = vsplat<W>(0.0f);
    for (int64_t i = 0; i < np; i += W) {
      const F zv = vload<W>(z + i);
      const F ev = vsel<W>(vge<W>(zv, zthr), vexp2_neg<W>(zv - f.m), vsplat<W>(0.0f));
      memcpy(e + i, &ev, sizeof(ev));
      acc += ev;
    }
    f.S = hsum<W>(acc);
    if (top_p > 0.0f && top_p < 1.0f) {
      // Largest tau (as float bits, e >= 0 so bit order is value order) whose kept mass
      // Σ_{e >= tau} e reaches top_p * S: the smallest top set, ties at tau kept.
      const float target = spec::mul(top_p, f.S);
      uint32_t lo = 0, hi = 0x3f800001u;
      while (hi - lo > 1) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (mass(e, np, mid) >= target) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      f.etau = bits_float(lo);
      f.S = mass(e, np, lo);
    }
    return f;
  }

  // Σ e over e >= tau (tau as float bits; e >= 0, so bit order is value order).
  BITPRESS_FORCE_INLINE static float mass(const float* e, int64_t np, uint32_t t) {
    using F = typename Vec<W>::f;
    const F tau = vsplat<W>(bits_float(t));
    F a = vsplat<W>(0.0f);
    for (int64_t i = 0; i < np; i += W) {
      const F ev = vload<W>(e + i);
      a += vsel<W>(ev >= tau, ev, vsplat<W>(0.0f));
    }
    return hsum<W>(a);
  }

  // Residual weights of one padded chunk: w = max(0, p - q), p = kept ? e / S : 0. `one_hot`: q is
  // 1 at that index (relative to the chunk) and 0 elsewhere, so w there is 0.
  // No filter, one-hot or no q: w = e / S, the same bits as the general loop of weights(). Every
  // lane is kept except z = NaN (z >= -inf fails; e >= 0 always holds), and there e = 0, so
  // e / S = +0 as the select would give (S > 0, or the row was decided greedily); e / S >= +0
  // makes the max(0, .) an identity. The logits are read straight from the row (f.m is known, no
  // max to find first): the full vectors in one loop, the tail through load_chunk's padding.
  template <int DT>
  BITPRESS_FORCE_INLINE void plain_weights(const void* row, int64_t c0, int64_t n, float scale,
                                           const Filter& f, float* w) {
    using F = typename Vec<W>::f;
    const int64_t nl = n / W * W;
    for (int64_t i = 0; i < nl; i += W) {
      const F wv = vexp2_neg<W>(load_vec<W, DT>(row, c0 + i, scale) - f.m) / f.S;
      memcpy(w + i, &wv, sizeof(wv));
    }
    if (nl < n) {
      load_chunk_t<W, DT>(row, c0 + nl, n - nl, scale, -kInf, w + nl);
      for (int64_t i = nl; i < padded(n, W); i += W) {
        const F wv = vexp2_neg<W>(vload<W>(w + i) - f.m) / f.S;
        memcpy(w + i, &wv, sizeof(wv));
      }
    }
  }

  BITPRESS_FORCE_INLINE void weights(const void* row, const void* qrow, int64_t c0, int64_t n,
                                     float scale, const Filter& f, int64_t one_hot, float* w) {
    using F = typename Vec<W>::f;
    if (!qrow && f.zthr == -kInf && f.etau == 0.0f) {
      if (p.logits_dtype == DType::kFloat32) {
        plain_weights<int(DType::kFloat32)>(row, c0, n, scale, f, w);
      } else if (p.logits_dtype == DType::kBFloat16) {
        plain_weights<int(DType::kBFloat16)>(row, c0, n, scale, f, w);
      } else {
        plain_weights<int(DType::kFloat16)>(row, c0, n, scale, f, w);
      }
      if (one_hot >= 0 && one_hot < n) w[one_hot] = 0.0f;
      return;
    }
    load_chunk<W>(row, p.logits_dtype, c0, n, scale, -kInf, w);
    const int64_t np = padded(n, W);
    float* q = nullptr;
    if (qrow) {
      q = s.q.data();
      load_chunk<W>(qrow, p.draft_probs_dtype, c0, n, 1.0f, 0.0f, q);
      for (int64_t i = 0; i < n; ++i) {
        if (!q_ok(q[i])) {
          q_bad(cur_b, cur_j, c0 + i);
          break;
        }
      }
    }
    const F zthr = vsplat<W>(f.zthr), etau = vsplat<W>(f.etau), zero = vsplat<W>(0.0f);
    for (int64_t i = 0; i < np; i += W) {
      const F zv = vload<W>(w + i);
      const F ev = vexp2_neg<W>(zv - f.m);
      const F pv = vsel<W>(vge<W>(zv, zthr) & vge<W>(ev, etau), ev / f.S, zero);
      F d = pv;
      if (q) d = pv - vload<W>(q + i);
      const F wv = vsel<W>(d > zero, d, zero);
      memcpy(w + i, &wv, sizeof(wv));
    }
    if (one_hot >= 0 && one_hot < n) w[one_hot] = 0.0f;
  }

  // Inverse CDF over the weights: the first v whose running sum exceeds u * W; the last v with
  // positive weight if rounding leaves the walk short. Returns -1 if every weight is 0.
  BITPRESS_FORCE_INLINE int64_t sample(const void* row, const void* qrow, float scale,
                                       const Filter& f, int64_t one_hot, float u) {
    float* w = s.chunk.data();
    const int64_t nchunks = (p.V + kChunk - 1) / kChunk;
    float total = 0.0f;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t c0 = c * kChunk, n = std::min(kChunk, p.V - c0);
      weights(row, qrow, c0, n, scale, f, one_hot >= 0 ? one_hot - c0 : -1, w);
      s.csum[c] = exp_sum_plain(w, padded(n, W));
      total = spec::add(total, s.csum[c]);
    }
    if (!(total > 0.0f)) return -1;
    const float t = spec::mul(u, total);
    float run = 0.0f;
    int64_t c = 0, last = -1;
    for (; c < nchunks; ++c) {
      if (s.csum[c] > 0.0f) last = c;
      const float next = spec::add(run, s.csum[c]);
      if (next > t) break;
      run = next;
    }
    if (c == nchunks) c = last;  // rounding: the target lies past the last chunk with mass
    const int64_t c0 = c * kChunk, n = std::min(kChunk, p.V - c0);
    weights(row, qrow, c0, n, scale, f, one_hot >= 0 ? one_hot - c0 : -1, w);
    int64_t pick = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (w[i] > 0.0f) {
        pick = i;
        run = spec::add(run, w[i]);
        if (run > t) break;
      }
    }
    return c0 + pick;
  }

  BITPRESS_FORCE_INLINE static float exp_sum_plain(const float* w, int64_t n) {
    using F = typename Vec<W>::f;
    F a = vsplat<W>(0.0f);
    for (int64_t i = 0; i < n; i += W) a += vload<W>(w + i);
    return hsum<W>(a);
  }

  // True when draft x is accepted for certain at this position, decided from a max pass alone (no
  // exp pass): the decision that the exact test `u * qx < e(x) / S` makes, with S bounded above.
  // In chunk c (max cm_c, n_c logits) one term of S is 2^(cm_c - m) and every other is at most
  // 2^(sec_c - m), sec_c >= every logit of the chunk but one occurrence of cm_c (per-lane top two:
  // the second of each lane and the other lanes' maxima). So S <= B = Σ_c 2^(cm_c - m) +
  // (n_c - 1) 2^(sec_c - m). The float S of stats() exceeds the real sum of its float terms, and
  // those terms exceed the real 2^(z - m), by at most (2 roundings of 2^-24 and one exp2_neg
  // error, <= 1.1e-7 measured, per chunk + 160 roundings) ~ 2.4e-7 per chunk + 1e-5 relative: the
  // factor 1.001 + 1e-6 per chunk covers it (V <= 2^26: the first-order bound holds). If e(x) / B
  // >= max(t (1 + 1e-6), 1e-30), t = u * qx as rounded by the exact test, then e(x) / S is at least
  // that, so the rounded px = e(x) / S exceeds t (1e-6 > one ulp of t, 1e-30 > every subnormal t)
  // and the exact test accepts. m is the running max of stats() (the same chunk maxima in the same
  // order), e(x) the same exp2_neg. Anything else (m infinite, NaN t, an uncertain test) returns
  // false and the caller runs the exact statistics. On a target that is peaked at its draft (the
  // worst case of bench_spec_verify, at every draft position) this skips the exp pass: ~6 vector
  // operations per 16 logits instead of ~23.
  template <int DT>
  BITPRESS_FORCE_INLINE bool sure_accept_t(const void* row, float scale, int64_t x, float t) {
    using F = typename Vec<W>::f;
    float* z = s.chunk.data();  // only the tail of the last chunk is written
    const float zx = spec::mul(load_as_float(row, p.logits_dtype, x), scale);
    const double need = std::max(double(t) * (1.0 + 1e-6), 1e-30);  // NaN t: false below
    const double margin = 1.001 + 1e-6 * double(p.V / kChunk);  // roundings grow with the chunks
    float m = -kInf;
    double bound = 0.0;  // Σ over the chunks so far, relative to the running max m
    for (int64_t c0 = 0; c0 < p.V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, p.V - c0), nl = n / W * W;
      F mv1 = vsplat<W>(-kInf), mv2 = vsplat<W>(-kInf);
      for (int64_t i = 0; i < nl; i += W) {
        const F v = load_vec<W, DT>(row, c0 + i, scale);
        vmax_into<W>(mv2, vmin_bound<W>(v, mv1));  // the smaller of v and the lane max so far
        vmax_into<W>(mv1, v);
      }
      const float cm = finish_chunk<W, DT>(mv1, row, c0, nl, n, scale, -kInf, z);
      float sec = -kInf;
      int lmax = -1;
      for (int l = 0; l < W; ++l) {
        if (lmax < 0 && mv1[l] == cm) {
          lmax = l;
        } else {
          sec = std::max(sec, mv1[l]);
        }
        sec = std::max(sec, mv2[l]);
      }
      if (lmax < 0 || nl < n) sec = cm;  // a maximum in the scalar tail: no finer bound
      if (cm > m) {
        bound = m > -kInf ? bound * std::exp2(double(m) - double(cm)) : 0.0;
        m = cm;
      }
      if (cm > -kInf) {
        bound += std::exp2(double(cm) - double(m)) +
                 double(n - 1) * (sec > -kInf ? std::exp2(double(sec) - double(m)) : 0.0);
      }
      // e(x) / B only falls as chunks are added (both relative to m; e(x) is within 1.1e-7 of
      // 2^(zx - m)): once it is below `need` the answer is false, so stop reading. A position
      // the bound cannot decide costs a few chunks of max pass, not a whole one.
      if (std::exp2(double(zx) - double(m)) * 1.01 < bound * margin * need) return false;
    }
    if (!(m > -kInf && m < kInf)) return false;
    const float ex = spec::exp2_neg(spec::sub(zx, m));
    return double(ex) >= bound * margin * need;
  }

  BITPRESS_FORCE_INLINE bool sure_accept(const void* row, float scale, int64_t x, float t) {
    if (p.V > (int64_t(1) << 26)) return false;  // keeps the first-order error bound below 2%
    if (p.logits_dtype == DType::kFloat32) {
      return sure_accept_t<int(DType::kFloat32)>(row, scale, x, t);
    }
    if (p.logits_dtype == DType::kBFloat16) {
      return sure_accept_t<int(DType::kBFloat16)>(row, scale, x, t);
    }
    return sure_accept_t<int(DType::kFloat16)>(row, scale, x, t);
  }

  BITPRESS_FORCE_INLINE void run(int64_t b) {
    const int64_t n = p.num_draft ? p.num_draft[b] : p.K;
    const float temp = p.temperature ? p.temperature[b] : 0.0f;
    const bool greedy_row = !(temp > 0.0f);
    const float scale = greedy_row ? 1.0f : spec::div(spec::kLog2e, temp);  // log2(e) / T
    const int64_t k = p.top_k ? p.top_k[b] : 0;
    const float top_p = p.top_p ? p.top_p[b] : 1.0f;
    const bool filtered = (k > 0 && k < p.V) || (top_p > 0.0f && top_p < 1.0f);
    const int64_t seed = p.seeds ? p.seeds[b] : 0, offset = p.offsets ? p.offsets[b] : 0;
    const int64_t* d = p.draft_tokens + b * p.draft_tokens_stride;
    int64_t* out = p.tokens + b * p.tokens_stride;

    int64_t a = 0, token = -1;
    for (int64_t j = 0; j <= n; ++j) {
      const void* row = logits_row(b, j);
      const bool is_draft = j < n;
      const int64_t x = is_draft ? d[j] : -1;
      Filter f;
      bool greedy = greedy_row;
      if (!greedy && is_draft && !filtered) {
        const float qx = p.draft_probs ? load_as_float(q_row(b, j), p.draft_probs_dtype, x) : 1.0f;
        if (!q_ok(qx)) return q_bad(b, j, x);
        const float t =
            spec::mul(uniform_from_bits(philox_stream(seed, offset, uint32_t(j)).v[0]), qx);
        if (sure_accept(row, scale, x, t)) {
          ++a;
          continue;
        }
      }
      if (!greedy) {
        f = filtered ? filtered_stats(row, scale, k, top_p) : stats(row, scale);
        greedy = !(f.S > 0.0f);  // infinite or all -inf logits: no distribution, decide greedily
      }
      if (greedy) {
        const int64_t am = argmax(row);
        if (is_draft && x == am) {
          ++a;
          continue;
        }
        token = am;
        break;
      }
      const Philox4x32 r = philox_stream(seed, offset, uint32_t(j));
      const void* qrow = is_draft && p.draft_probs ? q_row(b, j) : nullptr;
      if (is_draft) {
        const float zx = spec::mul(load_as_float(row, p.logits_dtype, x), scale);
        const float ex = spec::exp2_neg(spec::sub(zx, f.m));
        const float px = f.kept(zx, ex) ? spec::div(ex, f.S) : 0.0f;
        const float qx = qrow ? load_as_float(qrow, p.draft_probs_dtype, x) : 1.0f;
        if (!q_ok(qx)) return q_bad(b, j, x);
        if (spec::mul(uniform_from_bits(r.v[0]), qx) < px) {
          ++a;
          continue;
        }
      }
      const float u = uniform_from_bits(r.v[1]);
      cur_b = b;
      cur_j = j;
      token = sample(row, qrow, scale, f, is_draft && !qrow ? x : -1, u);
      if (q_failed) return;
      if (token < 0) token = sample(row, nullptr, scale, f, -1, u);  // p <= q everywhere: p
      break;
    }
    for (int64_t j = 0; j < a; ++j) out[j] = d[j];
    out[a] = token;
    for (int64_t j = a + 1; j <= p.K; ++j) out[j] = -1;
    p.num_accepted[b] = a;
    p.num_emitted[b] = a + 1;
  }
};

template <int W>
__attribute__((always_inline)) inline void verify_rows(const SpecVerifyParams& p, int64_t b0,
                                                       int64_t b1, std::atomic<int64_t>* bad_q) {
  Scratch s;
  s.chunk.resize(kChunk);
  s.chunk2.resize(kChunk);
  s.q.resize(kChunk);
  s.csum.resize((p.V + kChunk - 1) / kChunk);
  const bool any_filter = p.top_k || p.top_p;
  if (any_filter) {
    s.row.resize(padded(p.V, 16));
    s.e.resize(padded(p.V, 16));
    s.keys.resize(p.V);
  }
  RowKernel<W> k{p, s, *bad_q};
  for (int64_t b = b0; b < b1; ++b) {
    k.q_failed = false;
    k.run(b);
  }
}

using RowsFn = void (*)(const SpecVerifyParams&, int64_t, int64_t, std::atomic<int64_t>*);

void rows_scalar(const SpecVerifyParams& p, int64_t b0, int64_t b1, std::atomic<int64_t>* bq) {
  verify_rows<4>(p, b0, b1, bq);
}
#if defined(__x86_64__)
BITPRESS_TARGET_AVX2 void rows_avx2(const SpecVerifyParams& p, int64_t b0, int64_t b1,
                                    std::atomic<int64_t>* bq) {
  verify_rows<8>(p, b0, b1, bq);
}
BITPRESS_TARGET_AVX512 void rows_avx512(const SpecVerifyParams& p, int64_t b0, int64_t b1,
                                        std::atomic<int64_t>* bq) {
  verify_rows<16>(p, b0, b1, bq);
}
#endif

RowsFn pick(CpuIsa isa) {
#if defined(__x86_64__)
  if (isa >= CpuIsa::kAvx512) return rows_avx512;  // kAmx: the AVX-512 code
  if (isa == CpuIsa::kAvx2) return rows_avx2;
#endif
  (void)isa;
  return rows_scalar;
}

}  // namespace

Status spec_verify_check(const SpecVerifyParams& p) {
  if (p.B < 0 || p.K < 0 || p.V <= 0 || p.V > (int64_t(1) << 31) - 1) {
    return Status::kInvalidArgument;
  }
  if (!dtype_valid(p.logits_dtype) || (p.draft_probs && !dtype_valid(p.draft_probs_dtype))) {
    return Status::kInvalidArgument;
  }
  if (p.B == 0) return Status::kSuccess;
  if (!p.logits || !p.tokens || !p.num_accepted || !p.num_emitted) return Status::kInvalidArgument;
  if (p.K > 0 && !p.draft_tokens) return Status::kInvalidArgument;
  // Inputs may overlap (expanded views read the same logits twice); the output may not.
  if (p.logits_stride_b < 0 || p.logits_stride_k < 0) return Status::kInvalidArgument;
  if (p.K > 0 && p.draft_tokens_stride < 0) return Status::kInvalidArgument;
  if (p.draft_probs && (p.draft_probs_stride_b < 0 || p.draft_probs_stride_k < 0)) {
    return Status::kInvalidArgument;
  }
  if (p.tokens_stride < p.K + 1) return Status::kInvalidArgument;
  return Status::kSuccess;
}

Status spec_verify_cpu(const SpecVerifyParams& p, const CpuThreadPool* pool) {
  const Status st = spec_verify_check(p);
  if (st != Status::kSuccess || p.B == 0) return st;
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t n = p.num_draft ? p.num_draft[b] : p.K;
    if (n < 0 || n > p.K) return Status::kInvalidArgument;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t x = p.draft_tokens[b * p.draft_tokens_stride + j];
      if (x < 0 || x >= p.V) return Status::kInvalidArgument;
    }
    if (p.temperature && !(p.temperature[b] >= 0.0f)) return Status::kInvalidArgument;
  }
  const RowsFn fn = pick(active_cpu_isa());
  std::atomic<int64_t> bad_q{INT64_MAX};
  parallel_for(pool, 0, p.B, 1, [&](int64_t b0, int64_t b1) { fn(p, b0, b1, &bad_q); });
  if (bad_q.load() != INT64_MAX) {
    if (p.bad_q) *p.bad_q = bad_q.load();
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

}  // namespace bitpress
