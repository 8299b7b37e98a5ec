// FP8 E4M3 helpers (bitpress/fp8/fp8.h) and the CPU kernels of fp8_quantize, fp8_gemm and
// fp8_weight_gemm.
//
// * decode: all 256 codes against the definition (sign, exponent bias 7, subnormals m * 2^-9,
//   NaN for S.1111.111), into bf16, float32 and the scaled fp16 bits of the vector decoders;
// * encode: torch's semantics, x.clamp(-448, 448).to(float8_e4m3fn), reproduced here by a
//   nearest-value search over the 127 magnitudes with ties to the even code: every bf16 and
//   fp16 bit pattern, every midpoint and its float32 neighbours, a million random float32;
// * the kernels with every microkernel variant this CPU runs (AMX, AVX512-BF16, AVX2) and the
//   emulations (everywhere), both decoders (table, AVX-512), the dot-product path with each ISA,
//   against a double reference on odd shapes, every x dtype and scale layout; fp8_quantize against
//   the definition.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/fp8/fp8.h"
#include "bitpress/fp8/fp8_gemm.h"
#include "bitpress/fp8/fp8_quantize.h"
#include "check.h"

using namespace bitpress;

namespace {

// The value of a code by the definition (NaN for the NaN codes).
double e4m3_value(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return NAN;
  const double mag = e == 0 ? m / 8.0 * ldexp(1.0, -6) : (1 + m / 8.0) * ldexp(1.0, e - 7);
  return s ? -mag : mag;
}

bool same_float(float a, float b) {
  return (isnan(a) && isnan(b)) || (a == b && signbit(a) == signbit(b));
}

// torch's rule: NaN -> NaN (sign kept); clamp to +-448; nearest magnitude, ties to the even code.
uint8_t encode_ref(float f) {
  const uint8_t sign = signbit(f) ? 0x80 : 0;
  if (isnan(f)) return uint8_t(sign | 0x7F);
  const double a = std::min(fabs(double(f)), 448.0);
  int best = 0;
  double best_d = INFINITY;
  for (int c = 0; c <= 0x7E; ++c) {
    const double d = fabs(e4m3_value(c) - a);
    if (d < best_d || (d == best_d && (c & 1) == 0)) {
      best = c;
      best_d = d;
    }
  }
  return uint8_t(sign | best);
}

void test_decode() {
  for (int c = 0; c < 256; ++c) {
    const double v = e4m3_value(c);
    const float f = e4m3_to_float(uint8_t(c));
    const float b = bf16_bits_to_float(e4m3_to_bf16_bits(uint8_t(c)));
    CHECK(same_float(f, float(v)) || (v == 0 && f == 0 && signbit(f) == bool(c & 0x80)),
          "code 0x%02x: %g vs %g", c, f, v);
    CHECK(same_float(b, f), "code 0x%02x: bf16 %g vs float %g", c, b, f);
    CHECK(e4m3_is_nan(uint8_t(c)) == bool(isnan(v)), "code 0x%02x nan", c);
    if (!isnan(v)) {
      const float h = half_bits_to_float(e4m3_to_half_bits_scaled(uint8_t(c))) * 256.f;
      CHECK(same_float(h, f), "code 0x%02x: scaled fp16 %g vs %g", c, h, f);
      // Round trip: every finite code encodes back to itself (+0 / -0 included).
      CHECK(float_to_e4m3(f) == c, "code 0x%02x round trip: 0x%02x", c, float_to_e4m3(f));
    }
  }
  CHECK(e4m3_to_float(kE4M3MaxCode) == 448.f, "max");
}

void check_encode(float f) {
  const uint8_t got = float_to_e4m3(f), want = encode_ref(f);
  // NaN codes: 0x7F / 0xFF by sign, as torch's cast.
  CHECK(got == want, "encode(%.9g) = 0x%02x, want 0x%02x", f, got, want);
}

void test_encode() {
  for (uint32_t h = 0; h < 65536; ++h) {
    check_encode(bf16_bits_to_float(uint16_t(h)));
    check_encode(half_bits_to_float(uint16_t(h)));
  }
  std::vector<float> vals;
  for (int c = 0; c < 0x7F; ++c) vals.push_back(float(e4m3_value(c)));
  for (size_t i = 0; i + 1 < vals.size(); ++i) {
    const float mid = float((double(vals[i]) + vals[i + 1]) / 2);
    for (float f : {mid, nextafterf(mid, 0.f), nextafterf(mid, 1e9f)}) {
      check_encode(f);
      check_encode(-f);
    }
  }
  for (float f : {448.f, 449.f, 463.99f, 464.f, 464.01f, 470.f, 479.9f, 480.f, 1e6f, 3.4e38f,
                  INFINITY, -INFINITY, 1e-45f, 1e-40f, 0.f, -0.f, NAN, -NAN}) {
    check_encode(f);
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t u = bits(rng);
    // Spread over the exponents that matter (2^-12 .. 2^10), and raw patterns.
    const float f =
        i % 2 ? bits_float((u & 0x807FFFFFu) | ((115u + u % 23u) << 23)) : bits_float(u);
    check_encode(f);
  }
}

// ------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------

std::vector<uint8_t> random_codes(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 100.f);
  std::vector<uint8_t> v(n);
  for (auto& c : v) c = float_to_e4m3(nd(rng));
  return v;
}

struct Scales {
  std::vector<float> v;
  Fp8Scale s;
};

Scales make_scales(Fp8ScaleLayout layout, int64_t rows, int64_t K, bool weight, std::mt19937& rng) {
  std::uniform_real_distribution<float> us(0.001f, 0.011f);
  Scales r;
  const int64_t Kb = (K + 127) / 128;
  int64_t n = 1, stride = 0;
  if (layout == Fp8ScaleLayout::kRow) n = rows, stride = 1;
  if (layout == Fp8ScaleLayout::kBlock) {
    n = (weight ? (rows + 127) / 128 : rows) * Kb;
    stride = Kb;
  }
  r.v.resize(size_t(std::max<int64_t>(n, 1)));
  for (auto& x : r.v) x = us(rng);
  r.s.data = r.v.data();
  r.s.layout = layout;
  r.s.row_stride = stride;
  return r;
}

double scale_ref(const Fp8Scale& s, int64_t row, int64_t k, bool weight) {
  switch (s.layout) {
    case Fp8ScaleLayout::kTensor:
      return s.data[0];
    case Fp8ScaleLayout::kRow:
      return s.data[row * s.row_stride];
    default:
      return s.data[(weight ? row / 128 : row) * s.row_stride + k / 128];
  }
}

float out_value(const std::vector<uint16_t>& o16, const std::vector<float>& o32, DType t,
                size_t i) {
  return t == DType::kFloat32   ? o32[i]
         : t == DType::kFloat16 ? half_bits_to_float(o16[i])
                                : bf16_bits_to_float(o16[i]);
}

std::vector<Fp8CpuOptions> engine_options() {
  std::vector<Fp8CpuOptions> all;
  for (cpu::GemmKernel k :
       {cpu::GemmKernel::kAmx, cpu::GemmKernel::kAvx512Bf16, cpu::GemmKernel::kAvx2,
        cpu::GemmKernel::kAmxEmulated, cpu::GemmKernel::kAvx512Bf16Emulated}) {
    if (!cpu::gemm_kernel_available(k)) continue;
    using D = Fp8CpuOptions::Decode;
    for (D d : {D::kTable, D::kAvx512, D::kAvx512Vbmi}) {
      Fp8CpuOptions o;
      o.kernel = k;
      o.decode = d;
      // Probe: an unsupported decode reports kUnsupported (a 0 x 0 call succeeds regardless).
      {
        Fp8GemmParams p;
        uint8_t a = 0x38, b = 0x38;
        float s = 1.f, out = 0.f;
        p.a = &a;
        p.b = &b;
        p.lda = p.ldb = 1;
        p.scale_a.data = p.scale_b.data = &s;
        p.out = &out;
        p.out_dtype = DType::kFloat32;
        p.ldo = 1;
        p.M = p.N = p.K = 1;
        if (fp8_gemm_cpu_with(p, nullptr, o) != Status::kSuccess) continue;
      }
      o.dot_max_rows = 0;
      all.push_back(o);
      // The panel engine where the strip kernel would take the small-M calls (AMX + VBMI).
      if (k == cpu::GemmKernel::kAmx && d == D::kAvx512Vbmi) {
        o.strip = false;
        all.push_back(o);
      }
      // K walked in panels of 256 (K = 300, 520, 1000: two to four, the last one ragged).
      o.strip = false;
      o.panel_k = 256;
      all.push_back(o);
    }
  }
  return all;
}

std::vector<Fp8CpuOptions> dot_options() {
  std::vector<Fp8CpuOptions> all;
  const CpuFeatures& f = cpu_features();
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (isa == CpuIsa::kAvx2 && !(f.avx2 && f.fma && f.f16c)) continue;
    if (isa == CpuIsa::kAvx512 && !(f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq)) continue;
    Fp8CpuOptions o;
    o.dot_max_rows = 4;
    o.dot_isa = isa;
    all.push_back(o);  // M = 1: 4 rows read at once (the default)
    o.dot_streams = 1;
    all.push_back(o);  // M = 1: one row after the other
  }
  return all;
}

const char* opt_name(const Fp8CpuOptions& o, char* buf) {
  if (o.dot_max_rows) {
    snprintf(buf, 64, "dot-%s-s%d", cpu_isa_name(o.dot_isa), o.dot_streams);
  } else {
    const int d = int(o.decode);
    snprintf(buf, 64, "%s%s%s%s", cpu::gemm_kernel_name(o.kernel),
             d == 0   ? ""
             : d == 1 ? "+avx512dec"
                      : "+vbmidec",
             o.strip ? "" : "-nostrip", o.panel_k == 4096 ? "" : "-pk256");
  }
  return buf;
}

void test_weight_gemm(std::mt19937& rng) {
  // (16, 200, 150) and (29, 130, 70): the strip kernel's 64- and 32-row strips with a ragged last
  // strip and a ragged last 64 of K.
  const int64_t shapes[][3] = {{1, 256, 64},   {3, 300, 77}, {5, 1000, 129}, {17, 40, 33},
                               {33, 520, 130}, {2, 128, 1},  {16, 200, 150}, {29, 130, 70}};
  const Fp8ScaleLayout layouts[] = {Fp8ScaleLayout::kTensor, Fp8ScaleLayout::kRow,
                                    Fp8ScaleLayout::kBlock};
  std::vector<Fp8CpuOptions> opts = engine_options();
  for (auto& o : dot_options()) opts.push_back(o);
  std::normal_distribution<float> nx(0.f, 1.f);
  for (auto& sh : shapes) {
    const int64_t M = sh[0], K = sh[1], N = sh[2];
    std::vector<uint8_t> w = random_codes(size_t(N * K), rng);
    std::vector<float> xf(size_t(M * K));
    for (auto& v : xf) v = nx(rng);
    std::vector<float> bias(static_cast<size_t>(N));
    for (auto& v : bias) v = nx(rng);
    for (DType xt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      // x in its dtype, and the values it holds (for the reference).
      std::vector<uint16_t> x16(xf.size());
      std::vector<double> xv(xf.size());
      for (size_t i = 0; i < xf.size(); ++i) {
        x16[i] = xt == DType::kFloat16 ? float_to_half_bits(xf[i]) : float_to_bf16_bits(xf[i]);
        xv[i] = xt == DType::kFloat32   ? xf[i]
                : xt == DType::kFloat16 ? half_bits_to_float(x16[i])
                                        : bf16_bits_to_float(x16[i]);
      }
      for (Fp8ScaleLayout layout : layouts) {
        Scales ws = make_scales(layout, N, K, true, rng);
        std::vector<double> ref(size_t(M * N));
        double ref_norm = 0;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double acc = bias[n];
            for (int64_t k = 0; k < K; ++k) {
              acc += xv[m * K + k] * e4m3_value(w[n * K + k]) * scale_ref(ws.s, n, k, true);
            }
            ref[m * N + n] = acc;
            ref_norm += acc * acc;
          }
        for (const Fp8CpuOptions& o : opts) {
          if (o.dot_max_rows && M > o.dot_max_rows) continue;
          std::vector<float> o32(size_t(M * N), NAN);
          std::vector<uint16_t> o16(size_t(M * N), 0x7FC0);
          Fp8WeightGemmParams p;
          p.x = xt == DType::kFloat32 ? static_cast<const void*>(xf.data()) : x16.data();
          p.x_dtype = xt;
          p.ldx = K;
          p.w = w.data();
          p.ldw = K;
          p.w_scale = ws.s;
          p.bias = bias.data();
          p.bias_dtype = DType::kFloat32;
          p.out = xt == DType::kFloat32 ? static_cast<void*>(o32.data()) : o16.data();
          p.ldo = N;
          p.M = M;
          p.N = N;
          p.K = K;
          const Status st = fp8_weight_gemm_cpu_with(p, nullptr, o);
          char buf[64];
          CHECK(st == Status::kSuccess, "%s: status %d", opt_name(o, buf), int(st));
          double err = 0;
          for (size_t i = 0; i < ref.size(); ++i) {
            const double d = out_value(o16, o32, xt, i) - ref[i];
            err += d * d;
          }
          const double rel = sqrt(err / std::max(ref_norm, 1e-30));
          const double tol = xt == DType::kFloat32 ? 2e-6 : xt == DType::kFloat16 ? 1e-3 : 5e-3;
          CHECK(rel < tol, "weight_gemm %s M=%lld K=%lld N=%lld x=%s layout=%d: rel err %g",
                opt_name(o, buf), (long long)M, (long long)K, (long long)N, dtype_name(xt),
                int(layout), rel);
        }
      }
    }
  }
}

// M = 1 on the dot-product path, 1..4 weight rows read at once: every row count of a task (N
// up to 9, and 64 + 1..8 for a full task then a ragged one) with every remainder of the stream
// count; K = 203: a ragged tail after the AVX-512 (32) and AVX2 (8) steps and, with block
// scales, a second K block. A NaN code in one row must make that row's output NaN and no other.
void test_dot_streams(std::mt19937& rng) {
  const int64_t K = 203;
  std::normal_distribution<float> nx(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(K));
  for (auto& v : x) v = nx(rng);
  std::vector<int64_t> Ns;
  for (int64_t n = 1; n <= 9; ++n) Ns.push_back(n);
  for (int64_t n = 65; n <= 72; ++n) Ns.push_back(n);
  for (Fp8ScaleLayout layout : {Fp8ScaleLayout::kRow, Fp8ScaleLayout::kBlock}) {
    for (int64_t N : Ns) {
      std::vector<uint8_t> w = random_codes(size_t(N * K), rng);
      for (auto& c : w) c = (c & 0x7F) == 0x7F ? 0x38 : c;  // no NaN but the one below
      const int64_t nan_row = N > 2 ? N - 2 : -1;           // a row of the last run(s)
      if (nan_row >= 0) w[nan_row * K + K / 2] = 0x7F;
      Scales ws = make_scales(layout, N, K, true, rng);
      for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
        for (int streams = 1; streams <= 4; ++streams) {
          Fp8CpuOptions o;
          o.dot_max_rows = 1;
          o.dot_isa = isa;
          o.dot_streams = streams;
          std::vector<float> out(static_cast<size_t>(N), -12345.f);
          Fp8WeightGemmParams p;
          p.x = x.data();
          p.x_dtype = DType::kFloat32;
          p.ldx = K;
          p.w = w.data();
          p.ldw = K;
          p.w_scale = ws.s;
          p.out = out.data();
          p.ldo = N;
          p.M = 1;
          p.N = N;
          p.K = K;
          const Status st = fp8_weight_gemm_cpu_with(p, nullptr, o);
          if (st == Status::kUnsupported) continue;
          CHECK(st == Status::kSuccess, "dot streams %s/%d: status %d", cpu_isa_name(isa), streams,
                int(st));
          for (int64_t n = 0; n < N; ++n) {
            if (n == nan_row) {
              CHECK(isnan(out[n]), "dot streams %s/%d N=%lld: row %lld not NaN", cpu_isa_name(isa),
                    streams, (long long)N, (long long)n);
              continue;
            }
            double ref = 0, mag = 0;
            for (int64_t k = 0; k < K; ++k) {
              const double t = x[k] * e4m3_value(w[n * K + k]) * scale_ref(ws.s, n, k, true);
              ref += t;
              mag += fabs(t);
            }
            CHECK(fabs(out[n] - ref) <= (K + 8) * 0x1p-24 * mag + 1e-30,  // float32 sums
                  "dot streams %s/%d N=%lld layout=%d row %lld: %g vs %g", cpu_isa_name(isa),
                  streams, (long long)N, int(layout), (long long)n, out[n], ref);
          }
        }
      }
    }
  }
}

void test_gemm(std::mt19937& rng) {
  const int64_t shapes[][3] = {{1, 256, 64}, {7, 1000, 129}, {33, 520, 130}, {16, 40, 1}};
  const Fp8ScaleLayout pairs[][2] = {{Fp8ScaleLayout::kTensor, Fp8ScaleLayout::kTensor},
                                     {Fp8ScaleLayout::kRow, Fp8ScaleLayout::kRow},
                                     {Fp8ScaleLayout::kRow, Fp8ScaleLayout::kTensor},
                                     {Fp8ScaleLayout::kBlock, Fp8ScaleLayout::kBlock}};
  for (auto& sh : shapes) {
    const int64_t M = sh[0], K = sh[1], N = sh[2];
    std::vector<uint8_t> a = random_codes(size_t(M * K), rng), b = random_codes(size_t(N * K), rng);
    for (auto& pr : pairs) {
      Scales sa = make_scales(pr[0], M, K, false, rng), sb = make_scales(pr[1], N, K, true, rng);
      std::vector<double> ref(size_t(M * N));
      double ref_norm = 0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double acc = 0;
          for (int64_t k = 0; k < K; ++k) {
            acc += e4m3_value(a[m * K + k]) * scale_ref(sa.s, m, k, false) *
                   e4m3_value(b[n * K + k]) * scale_ref(sb.s, n, k, true);
          }
          ref[m * N + n] = acc;
          ref_norm += acc * acc;
        }
      for (const Fp8CpuOptions& o : engine_options()) {
        std::vector<float> out(size_t(M * N), NAN);
        Fp8GemmParams p;
        p.a = a.data();
        p.lda = K;
        p.b = b.data();
        p.ldb = K;
        p.scale_a = sa.s;
        p.scale_b = sb.s;
        p.out = out.data();
        p.out_dtype = DType::kFloat32;
        p.ldo = N;
        p.M = M;
        p.N = N;
        p.K = K;
        const Status st = fp8_gemm_cpu_with(p, nullptr, o);
        char buf[64];
        CHECK(st == Status::kSuccess, "%s: status %d", opt_name(o, buf), int(st));
        double err = 0;
        for (size_t i = 0; i < ref.size(); ++i) err += (out[i] - ref[i]) * (out[i] - ref[i]);
        const double rel = sqrt(err / std::max(ref_norm, 1e-30));
        CHECK(rel < 2e-6, "gemm %s M=%lld K=%lld N=%lld: rel err %g", opt_name(o, buf),
              (long long)M, (long long)K, (long long)N, rel);
      }
    }
  }
}

void test_quantize(std::mt19937& rng) {
  const int64_t R = 37, K = 300;
  std::normal_distribution<float> nx(0.f, 20.f);
  std::vector<float> x(size_t(R * K));
  for (auto& v : x) v = nx(rng);
  for (int64_t k = 0; k < K; ++k) x[5 * K + k] = 0.f;  // an all-zero row
  struct G {
    Fp8Granularity g;
    int64_t bm, bk;
  };
  for (G g : {G{Fp8Granularity::kTensor, 1, 1}, G{Fp8Granularity::kRow, 1, 1},
              G{Fp8Granularity::kBlock, 1, 128}, G{Fp8Granularity::kBlock, 128, 128},
              G{Fp8Granularity::kBlock, 3, 7}}) {
    const int64_t srows = g.g == Fp8Granularity::kBlock ? (R + g.bm - 1) / g.bm : R;
    const int64_t scols = g.g == Fp8Granularity::kBlock ? (K + g.bk - 1) / g.bk : 1;
    std::vector<float> s(size_t(srows * scols), NAN);
    std::vector<uint8_t> q(size_t(R * K), 0xAA);
    Fp8QuantizeParams p;
    p.x = x.data();
    p.x_dtype = DType::kFloat32;
    p.x_row_stride = K;
    p.q = q.data();
    p.q_row_stride = K;
    p.scale = s.data();
    p.scale_row_stride = scols;
    p.granularity = g.g;
    p.block_rows = g.bm;
    p.block_cols = g.bk;
    p.R = R;
    p.K = K;
    CHECK(fp8_quantize_cpu(p, nullptr) == Status::kSuccess, "quantize status");
    // The scale of each element's set, by the definition.
    auto set_scale = [&](int64_t r, int64_t k) {
      int64_t r0 = 0, r1 = R, k0 = 0, k1 = K;
      if (g.g == Fp8Granularity::kRow) r0 = r, r1 = r + 1;
      if (g.g == Fp8Granularity::kBlock) {
        r0 = r / g.bm * g.bm, r1 = std::min(R, r0 + g.bm);
        k0 = k / g.bk * g.bk, k1 = std::min(K, k0 + g.bk);
      }
      float amax = 0;
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = k0; j < k1; ++j) amax = std::max(amax, fabsf(x[i * K + j]));
      const float sc = amax / 448.f;
      return sc < kFp8MinScale ? kFp8MinScale : sc;
    };
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const float sc = set_scale(r, k);
        const int64_t si = g.g == Fp8Granularity::kTensor ? 0
                           : g.g == Fp8Granularity::kRow  ? r
                                                          : (r / g.bm) * scols + k / g.bk;
        CHECK(s[si] == sc, "scale (%lld, %lld): %g vs %g", (long long)r, (long long)k, s[si], sc);
        const uint8_t want = encode_ref(x[r * K + k] / sc);
        CHECK(q[r * K + k] == want, "q (%lld, %lld) g=%d: 0x%02x vs 0x%02x", (long long)r,
              (long long)k, int(g.g), q[r * K + k], want);
      }
  }
}

}  // namespace

int main() {
  test_decode();
  test_encode();
  std::mt19937 rng(123);
  test_quantize(rng);
  test_weight_gemm(rng);
  test_dot_streams(rng);
  test_gemm(rng);
  std::printf("engine variants here:");
  char buf[64];
  for (auto& o : engine_options()) std::printf(" %s", opt_name(o, buf));
  for (auto& o : dot_options()) std::printf(" %s", opt_name(o, buf));
  std::printf("\n");
  return check_result("test_fp8_cpu");
}
