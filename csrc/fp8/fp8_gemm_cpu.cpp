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
#include "fp8_gemm_engine.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress {
namespace fp8_cpu {
namespace {

thread_local ThreadBuffer t_panel;  // a task's decoded weight rows [NT, Kp] bf16
thread_local ThreadBuffer t_c;      // its float32 yᵀ block [NT, kColChunk]
thread_local ThreadBuffer t_cb;     // one 128-long K block's product (block scales)
thread_local ThreadBuffer t_xp;     // the caller's xᵀ pairs (fp8_gemm)

// Columns of xᵀ per microkernel call: a multiple of 16 (the microkernel's column step) and of 1,
// 2, 3 (the terms of a row stay in one chunk); 96 columns of Kp/2 pairs stay in L2 beside the
// panel for K up to ~4K (the microkernel reads its B once per 32 rows of A).
constexpr int64_t kColChunk = 96;

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
    _mm_prefetch(reinterpret_cast<const char*>(src + i) + 1024, _MM_HINT_T0);
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

bool vector_decode_available() {
#if defined(__x86_64__)
  const CpuFeatures& f = cpu_features();
  return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx2 && f.fma && f.f16c;
#else
  return false;
#endif
}

void decode_bf16(const uint8_t* src, uint16_t* dst, int64_t n, bool vector_decode) {
#if defined(__x86_64__)
  if (vector_decode) return decode_bf16_avx512(src, dst, n);
#endif
  (void)vector_decode;
  decode_bf16_table(src, dst, n);
}

Status run_engine(const EngineArgs& e, const CpuThreadPool* pool, const Fp8CpuOptions& o) {
  if (!cpu::gemm_kernel_available(o.kernel)) return Status::kUnsupported;
  if (o.vector_decode && !vector_decode_available()) return Status::kUnsupported;
  const int64_t M = e.M, N = e.N, K = e.K, Kp = e.Kp, T = e.terms, ldx = e.ldx;
  if (M == 0 || N == 0) return Status::kSuccess;
  const bool block = e.w_scale.layout == Fp8ScaleLayout::kBlock;
  // Rows of W per task: the decoded panel [NT, Kp] bf16 stays within ~1 MiB (L2); at least 8
  // tasks where N allows, so that the pool has work to balance.
  int64_t NT = Kp <= 8192 ? 64 : Kp <= 16384 ? 32 : 16;
  while (NT > 16 && (N + NT - 1) / NT < 8) NT /= 2;
  const int64_t n_tiles = (N + NT - 1) / NT;
  const int64_t Kb = (K + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
  Status status = Status::kSuccess;

  parallel_for(pool, 0, n_tiles, 1, [&](int64_t tb, int64_t te) {
    uint16_t* panel = static_cast<uint16_t*>(t_panel.get(size_t(NT * Kp) * 2 + 64));
    float* c = static_cast<float*>(t_c.get(size_t(NT * kColChunk) * 4 + 64));
    float* cb = block ? static_cast<float*>(t_cb.get(size_t(NT * kColChunk) * 4 + 64)) : nullptr;
    if (!panel || !c || (block && !cb)) {
      status = Status::kOutOfMemory;
      return;
    }
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t n0 = tile * NT, nt = std::min(NT, N - n0);
      for (int64_t r = 0; r < nt; ++r) {
        uint16_t* dst = panel + r * Kp;
        decode_bf16(e.w + (n0 + r) * e.ldw, dst, K, o.vector_decode);
        memset(dst + K, 0, size_t(Kp - K) * 2);
      }
      for (int64_t c0 = 0; c0 < ldx; c0 += kColChunk) {
        const int64_t cc = std::min(kColChunk, ldx - c0);
        cpu::GemmBf16Args g;
        g.a = panel;
        g.lda = Kp;
        g.ldb = ldx;
        g.ldc = kColChunk;
        g.M = nt;
        g.N = cc;
        if (!block) {
          g.b = e.xp + c0;
          g.c = c;
          g.K = Kp;
          g.accumulate = false;
          const Status st = cpu::gemm_bf16(o.kernel, g);
          if (st != Status::kSuccess) {
            status = st;
            return;
          }
        } else {
          for (int64_t r = 0; r < nt; ++r) memset(c + r * kColChunk, 0, size_t(cc) * 4);
          for (int64_t kb = 0; kb < Kb; ++kb) {
            const int64_t k0 = kb * kFp8ScaleBlock;
            g.a = panel + k0;
            g.b = e.xp + (k0 / 2) * ldx + c0;
            g.c = cb;
            g.K = std::min(kFp8ScaleBlock, Kp - k0);
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
              float* cr = c + r * kColChunk;
              const float* br = cb + r * kColChunk;
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
        // Epilogue: y[m, n] = (sum of m's terms) * scales + bias, rounded once to the output.
        const int64_t m0 = c0 / T, m1 = std::min(M, (c0 + cc) / T);
        for (int64_t m = m0; m < m1; ++m) {
          const float sx = (!block && e.x_scale.data) ? scale_at(e.x_scale, m) : 1.f;
          const float* cm = c + (m * T - c0);
          for (int64_t r = 0; r < nt; ++r) {
            const int64_t n = n0 + r;
            const float* cr = cm + r * kColChunk;
            float v = cr[0];
            for (int64_t t = 1; t < T; ++t) v += cr[t];
            if (!block) v = v * sx * scale_at(e.w_scale, n);
            if (e.bias) v += load_as_float(e.bias, e.bias_dtype, n);
            store(e.out, e.out_dtype, m * e.ldo + n, v);
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
  o.vector_decode = isa >= CpuIsa::kAvx512 && fp8_cpu::vector_decode_available();
  o.dot_isa = isa >= CpuIsa::kAvx512 ? CpuIsa::kAvx512
              : isa >= CpuIsa::kAvx2 ? CpuIsa::kAvx2
                                     : CpuIsa::kScalar;
  // The float32 dot-product path wins over the microkernel where the microkernel's 16-column
  // step is mostly padding and no AMX does the products (AMX takes M = 1..16 at one price).
  o.dot_max_rows = o.kernel == cpu::GemmKernel::kAmx ? 0 : 4;
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
        decode_bf16(p.a + (m0 + i) * p.lda, dst, p.K, options.vector_decode);
        memset(dst + p.K, 0, size_t(e.Kp - p.K) * 2);
      } else {
        memset(dst, 0, size_t(e.Kp) * 2);
      }
    }
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
