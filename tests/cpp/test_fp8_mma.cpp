// Host tests of the CUDA fp8_weight_gemm's __host__ __device__ helpers
// (bitpress/fp8/fp8_mma_dequant.h):
//   1. the E4M3 -> fp16x2 / bf16x2 decode: all 256 codes in every byte position of a word, both
//      output types, against the E4M3 definition (exact values, signed zeros, NaN for NaN codes);
//   2. the shared-memory index math: both swizzles are permutations of a row's chunks and the
//      warp's loads are bank-conflict-free (LDS.64 of W per half warp, LDS.128 of x per quarter
//      warp); the k permutation covers a 32-k slice once;
//   3. the whole GEMM kernel emulated on the CPU, block by block, stage by stage, warp by warp:
//      the cp.async loaders (zero fill past M, N, K) through the kernel's helpers into an
//      emulated shared memory, the lanes' LDS.128 / LDS.64 at the helpers' offsets, the decode,
//      mma.m16n8k16 emulated from the PTX ISA fragment tables (written out here independently of
//      the helpers), per-stage block scales, the k-warp sum, the epilogue scale, split-K partials
//      and the C fragment -> (m, n) stores; compared with sum_k x W s in double. Ragged M, N, K;
//      tensor, channel and 128 x 128 block scales; NaN codes;
//   4. the split heuristic and workspace size.
#include <bitpress/bitpress.h>
#include <bitpress/fp8/fp8_mma_dequant.h>
#include <bitpress/fp8/fp8_weight_gemm_cuda.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"

using namespace bitpress;

namespace {

template <DType T>
const char* tname() {
  return T == DType::kFloat16 ? "fp16" : "bf16";
}

template <DType T>
double half_value(uint32_t h) {
  return double(fp8_mma_half_to_float<T>(h & 0xFFFFu));
}

// ----- 1. decode -----

template <DType T>
void test_decode_all_codes() {
  for (uint32_t c = 0; c < 256; ++c) {
    for (int pos = 0; pos < 4; ++pos) {
      // The code at byte `pos`, its neighbours other codes (catches bleeding between lanes).
      uint32_t bytes[4] = {(c * 7 + 1) & 0xFF, (c * 13 + 5) & 0xFF, (c * 29 + 3) & 0xFF,
                           (c * 31 + 9) & 0xFF};
      bytes[pos] = c;
      const uint32_t w = bytes[0] | bytes[1] << 8 | bytes[2] << 16 | bytes[3] << 24;
      uint32_t out[2];
      fp8_mma_decode4<T>(w, out);
      for (int b = 0; b < 4; ++b) {
        const uint32_t h = (out[b >> 1] >> (16 * (b & 1))) & 0xFFFFu;
        const double want = fp8_e4m3_value(bytes[b]);
        const double got = half_value<T>(h);
        if (std::isnan(want)) {
          CHECK(std::isnan(got), "%s code 0x%02x byte %d: got %g, want NaN", tname<T>(), bytes[b],
                b, got);
        } else {
          CHECK(got == want && std::signbit(got) == std::signbit(want),
                "%s code 0x%02x byte %d: got %.9g (0x%04x), want %.9g", tname<T>(), bytes[b], b,
                got, h, want);
        }
      }
    }
  }
}

void test_e4m3_definition() {
  // Spot values of the OCP E4M3 table: max 448, min normal 2^-6, min subnormal 2^-9.
  CHECK(fp8_e4m3_value(0x7E) == 448.0, "max");
  CHECK(fp8_e4m3_value(0xFE) == -448.0, "-max");
  CHECK(fp8_e4m3_value(0x08) == std::ldexp(1.0, -6), "min normal");
  CHECK(fp8_e4m3_value(0x01) == std::ldexp(1.0, -9), "min subnormal");
  CHECK(fp8_e4m3_value(0x38) == 1.0, "one");
  CHECK(std::isnan(fp8_e4m3_value(0x7F)) && std::isnan(fp8_e4m3_value(0xFF)), "NaN");
  CHECK(fp8_mma_nan_bytes(0x7F00FF7Eu) == 0x80008000u, "nan bytes %08x",
        fp8_mma_nan_bytes(0x7F00FF7Eu));
}

// The dense dequantization: every code in every byte position, a few scales (normal, tiny,
// huge), against float(value * s) (one rounding of the exact product).
void test_dequant_float() {
  const float scales[] = {1.0f, 0.0123f, 3.0e-30f, 7.5e30f, -2.0f};
  for (float s : scales)
    for (uint32_t c = 0; c < 256; ++c)
      for (int pos = 0; pos < 4; ++pos) {
        const uint32_t w = (0x3A2B1C0Du & ~(0xFFu << (8 * pos))) | (c << (8 * pos));
        float f[4];
        fp8_dequant4_float(w, s, f);
        for (int b = 0; b < 4; ++b) {
          const double v = fp8_e4m3_value((w >> (8 * b)) & 0xFF);
          const float want = float(v * double(s));
          CHECK(std::isnan(v) ? std::isnan(f[b]) : f[b] == want,
                "dequant code 0x%02x s %g: got %g want %g", (w >> (8 * b)) & 0xFF, s, f[b], want);
        }
      }
}

// ----- 2. index math -----

void test_swizzles_and_banks() {
  for (int row = 0; row < 128; ++row) {
    std::vector<int> seen(8, 0);
    for (int ch = 0; ch < 8; ++ch) {
      const int p = fp8_gemm_b_smem_chunk(row, ch);
      CHECK(p / 8 == row, "B chunk leaves its row");
      seen[p % 8]++;
    }
    for (int v : seen) CHECK(v == 1, "B swizzle is not a permutation, row %d", row);
  }
  for (int row = 0; row < 64; ++row) {
    std::vector<int> seen(16, 0);
    for (int ch = 0; ch < 16; ++ch) {
      const int p = fp8_gemm_a_smem_chunk(row, ch);
      CHECK(p / 16 == row, "A chunk leaves its row");
      seen[p % 16]++;
    }
    for (int v : seen) CHECK(v == 1, "A swizzle is not a permutation, row %d", row);
  }
  // LDS.64: a half warp (16 lanes x 8 bytes) is one wavefront when its 32 words hit 32 banks.
  for (int wn = 0; wn < 2; ++wn)
    for (int wk = 0; wk < 4; ++wk)
      for (int j = 0; j < 8; ++j)
        for (int half = 0; half < 2; ++half) {
          std::vector<int> bank(32, 0);
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int off = fp8_gemm_b_lane_offset(wn, wk, j, l);
            CHECK(off % 8 == 0, "LDS.64 misaligned");
            bank[(off / 4) % 32]++;
            bank[(off / 4 + 1) % 32]++;
          }
          for (int b : bank) CHECK(b == 1, "W LDS.64 bank conflict wn %d wk %d j %d", wn, wk, j);
        }
  // LDS.128: a quarter warp (8 lanes x 16 bytes).
  for (int wk = 0; wk < 4; ++wk)
    for (int mi = 0; mi < 4; ++mi)
      for (int hi = 0; hi < 2; ++hi)
        for (int q = 0; q < 4; ++q) {
          std::vector<int> bank(32, 0);
          for (int l = 8 * q; l < 8 * q + 8; ++l) {
            const int row = 16 * mi + (l >> 2) + 8 * hi;
            const int off = fp8_gemm_a_smem_chunk(row, fp8_gemm_a_lane_chunk(wk, l)) * 16;
            for (int w = 0; w < 4; ++w) bank[(off / 4 + w) % 32]++;
          }
          for (int b : bank) CHECK(b == 1, "x LDS.128 bank conflict wk %d mi %d", wk, mi);
        }
  // The k permutation: for each t, rows r with (r % 8) / 2 == t over both steps cover that lane's
  // bytes 8t .. 8t+7 once; over all rows and steps, k 0..31 once.
  std::vector<int> seen(32, 0);
  for (int s = 0; s < 2; ++s)
    for (int r = 0; r < 16; ++r) {
      const int k = fp8_gemm_k_of_mma_row(s, r);
      CHECK(k >= 0 && k < 32 && k / 8 == (r & 7) / 2, "k of row %d step %d = %d", r, s, k);
      if (k >= 0 && k < 32) seen[k]++;
    }
  for (int v : seen) CHECK(v == 1, "k permutation not a bijection");
}

// ----- 3. kernel emulation -----

// PTX ISA fragment tables of mma.m16n8k16 (.f16/.bf16 inputs, .f32 accumulators), for lane l
// (g = l / 4, t = l % 4): A element i (0..7) of the 4 registers, B element i (0..3), C element i.
void a_elem(int l, int i, int* row, int* col) {
  const int g = l >> 2, t = l & 3;
  *row = g + ((i >> 1) & 1) * 8;
  *col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
}
void b_elem(int l, int i, int* row, int* col) {
  const int g = l >> 2, t = l & 3;
  *row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
  *col = g;
}
void c_elem(int l, int i, int* row, int* col) {
  const int g = l >> 2, t = l & 3;
  *row = g + (i >= 2 ? 8 : 0);
  *col = 2 * t + (i & 1);
}

// One warp's mma: d[l][i] += sum_kappa A[row][kappa] B[kappa][col], in double.
template <DType T>
void mma_emulate(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], double (&d)[32][4]) {
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) {
      int r, c;
      a_elem(l, i, &r, &c);
      A[r][c] = half_value<T>(a[l][i >> 1] >> (16 * (i & 1)));
    }
    for (int i = 0; i < 4; ++i) {
      int r, c;
      b_elem(l, i, &r, &c);
      B[r][c] = half_value<T>(b[l][i >> 1] >> (16 * (i & 1)));
    }
  }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      int r, c;
      c_elem(l, i, &r, &c);
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][c];
      d[l][i] += s;
    }
}

struct Problem {
  int64_t M, N, K;
  Fp8ScaleLayout kind;
  std::vector<uint16_t> x;  // [M, K] half bits
  std::vector<uint8_t> w;   // [N, K]
  std::vector<float> scale;
  std::vector<float> bias;  // [N] or empty
};

double w_scale_of(const Problem& p, int64_t n, int64_t k) {
  switch (p.kind) {
    case Fp8ScaleLayout::kTensor:
      return p.scale[0];
    case Fp8ScaleLayout::kRow:
      return p.scale[n];
    default:
      return p.scale[(n / 128) * ((p.K + 127) / 128) + k / 128];
  }
}

// Emulates fp8_weight_gemm_cuda: returns the pre-rounding fp32-path values (in double) and the
// rounded outputs.
template <DType T>
void emulate(const Problem& p, int num_sms, std::vector<double>* pre, std::vector<uint16_t>* out) {
  const int MT = fp8_weight_gemm_cuda_m_tiles(p.M);
  const int S = fp8_weight_gemm_cuda_splits(p.M, p.K, p.N, num_sms);
  const int64_t stages = (p.K + 127) / 128;
  const int64_t nbs = (p.N + 127) / 128, mbs = (p.M + 16 * MT - 1) / (16 * MT);
  std::vector<double> partial(size_t(S) * p.M * p.N, 0.0);
  std::vector<uint8_t> sB(128 * 128);
  std::vector<uint8_t> sA(16 * MT * 256);
  for (int64_t nb = 0; nb < nbs; ++nb)
    for (int64_t mb = 0; mb < mbs; ++mb)
      for (int split = 0; split < S; ++split) {
        int64_t st0, st1;
        fp8_gemm_split_range(stages, S, split, &st0, &st1);
        const int64_t n0 = nb * 128, m0 = mb * 16 * MT;
        // acc[warp][lane][mi][j][i]
        std::vector<double> acc(size_t(8) * 32 * MT * 8 * 4, 0.0);
        auto A_ = [&](int warp, int l, int mi, int j, int i) -> double& {
          return acc[(((size_t(warp) * 32 + l) * MT + mi) * 8 + j) * 4 + i];
        };
        for (int64_t st = st0; st < st1; ++st) {
          const int64_t k0 = st * 128;
          std::fill(sB.begin(), sB.end(), 0xCD);  // poison: every byte read must be written
          std::fill(sA.begin(), sA.end(), 0xCD);
          for (int tid = 0; tid < 256; ++tid) {
            for (int jj = 0; jj < 4; ++jj) {
              int row, ch;
              fp8_gemm_b_load_coords(tid + 256 * jj, &row, &ch);
              const int64_t n = n0 + row, k = k0 + 16 * ch;
              const bool valid = n < p.N && k < p.K;
              uint8_t* dst = sB.data() + fp8_gemm_b_smem_chunk(row, ch) * 16;
              for (int b = 0; b < 16; ++b) dst[b] = valid ? p.w[n * p.K + k + b] : 0;
            }
            for (int jj = 0; jj < MT; ++jj) {
              int row, ch;
              fp8_gemm_a_load_coords(tid + 256 * jj, &row, &ch);
              const int64_t m = m0 + row, k = k0 + 8 * ch;
              const bool valid = m < p.M && k < p.K;
              uint8_t* dst = sA.data() + fp8_gemm_a_smem_chunk(row, ch) * 16;
              if (valid) {
                std::memcpy(dst, &p.x[m * p.K + k], 16);
              } else {
                std::memset(dst, 0, 16);
              }
            }
          }
          for (int warp = 0; warp < 8; ++warp) {
            const int wn = warp & 1, wk = warp >> 1;
            if (n0 + 64 * wn >= p.N || k0 + 32 * wk >= p.K) continue;
            const double bscale =
                p.kind == Fp8ScaleLayout::kBlock ? p.scale[nb * ((p.K + 127) / 128) + st] : 1.0;
            uint32_t af[4][2][32][4];
            for (int l = 0; l < 32; ++l)
              for (int mi = 0; mi < MT; ++mi) {
                uint32_t lo[4], hi[4];
                const int ch = fp8_gemm_a_lane_chunk(wk, l);
                std::memcpy(lo, sA.data() + fp8_gemm_a_smem_chunk(16 * mi + (l >> 2), ch) * 16, 16);
                std::memcpy(hi, sA.data() + fp8_gemm_a_smem_chunk(16 * mi + (l >> 2) + 8, ch) * 16,
                            16);
                for (int s = 0; s < 2; ++s) {
                  af[mi][s][l][0] = lo[2 * s];
                  af[mi][s][l][1] = hi[2 * s];
                  af[mi][s][l][2] = lo[2 * s + 1];
                  af[mi][s][l][3] = hi[2 * s + 1];
                }
              }
            for (int j = 0; j < 8; ++j) {
              uint32_t bf[2][32][2];
              for (int l = 0; l < 32; ++l) {
                uint32_t wv[2];
                std::memcpy(wv, sB.data() + fp8_gemm_b_lane_offset(wn, wk, j, l), 8);
                fp8_mma_decode4<T>(wv[0], bf[0][l]);
                fp8_mma_decode4<T>(wv[1], bf[1][l]);
              }
              for (int mi = 0; mi < MT; ++mi) {
                double d[32][4] = {};
                for (int s = 0; s < 2; ++s) mma_emulate<T>(af[mi][s], bf[s], d);
                for (int l = 0; l < 32; ++l)
                  for (int i = 0; i < 4; ++i) A_(warp, l, mi, j, i) += bscale * d[l][i];
              }
            }
          }
        }
        // k-warp sum, epilogue scale, stores.
        for (int wn = 0; wn < 2; ++wn)
          for (int l = 0; l < 32; ++l)
            for (int j = 0; j < 8; ++j)
              for (int i = 0; i < 4; ++i) {
                int row, col;
                fp8_gemm_c_coords(l, j, i, &row, &col);
                const int64_t n = n0 + 64 * wn + col;
                if (n >= p.N) continue;
                for (int mi = 0; mi < MT; ++mi) {
                  const int64_t m = m0 + 16 * mi + row;
                  if (m >= p.M) continue;
                  double v = 0;
                  for (int wk = 0; wk < 4; ++wk) v += A_(wk * 2 + wn, l, mi, j, i);
                  if (p.kind != Fp8ScaleLayout::kBlock) v *= w_scale_of(p, n, 0);
                  partial[(size_t(split) * p.M + m) * p.N + n] = v;
                }
              }
      }
  pre->assign(size_t(p.M) * p.N, 0.0);
  out->assign(size_t(p.M) * p.N, 0);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = 0; n < p.N; ++n) {
      double v = 0;
      for (int s = 0; s < S; ++s) v += partial[(size_t(s) * p.M + m) * p.N + n];
      (*pre)[m * p.N + n] = v;
      (*out)[m * p.N + n] = fp8_gemm_epilogue<T>(float(v), p.bias.empty() ? nullptr : p.bias.data(),
                                                 DType::kFloat32, n);
    }
}

template <DType T>
void test_kernel_emulation(int64_t M, int64_t N, int64_t K, Fp8ScaleLayout kind, int num_sms,
                           bool with_nan, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  Problem p{M, N, K, kind, {}, {}, {}, {}};
  p.x.resize(M * K);
  for (auto& v : p.x) v = uint16_t(fp8_mma_float_to_half<T>(nd(rng)));
  p.w.resize(N * K);
  for (auto& v : p.w) {
    v = uint8_t(rng() & 0xFF);
    if ((v & 0x7F) == 0x7F) v ^= 0x01;  // no NaN codes unless asked
  }
  int64_t nan_n = -1;
  if (with_nan && N > 0 && K > 0) {
    nan_n = N / 2;
    p.w[nan_n * K + K - 1] = 0xFF;
  }
  const int64_t ns = kind == Fp8ScaleLayout::kTensor ? 1
                     : kind == Fp8ScaleLayout::kRow  ? N
                                                     : ((N + 127) / 128) * ((K + 127) / 128);
  for (int64_t i = 0; i < ns; ++i) p.scale.push_back(std::ldexp(1.f + 0.1f * (i % 7), -6));
  p.bias.resize(N);
  for (auto& b : p.bias) b = nd(rng);

  std::vector<double> pre;
  std::vector<uint16_t> out;
  emulate<T>(p, num_sms, &pre, &out);
  double err = 0, norm = 0;
  int bad = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double t =
            half_value<T>(p.x[m * K + k]) * fp8_e4m3_value(p.w[n * K + k]) * w_scale_of(p, n, k);
        ref += t;
        mag += std::fabs(t);
      }
      const double got = pre[m * N + n];
      if (n == nan_n) {
        if (!std::isnan(got) || !std::isnan(half_value<T>(out[m * N + n]))) ++bad;
        continue;
      }
      // Double sums in another order: equal to ~1e-15 of the sum of magnitudes.
      if (!(std::fabs(got - ref) <= 1e-12 * (mag + 1e-30))) {
        if (++bad <= 3)
          std::printf("  m %lld n %lld: got %.17g want %.17g\n", (long long)m, (long long)n, got,
                      ref);
      }
      const double y = half_value<T>(out[m * N + n]);
      err += (y - ref - p.bias[n]) * (y - ref - p.bias[n]);
      norm += (ref + p.bias[n]) * (ref + p.bias[n]);
    }
  CHECK(bad == 0, "%s M %lld N %lld K %lld kind %d sms %d: %d wrong", tname<T>(), (long long)M,
        (long long)N, (long long)K, int(kind), num_sms, bad);
  const double rel = norm > 0 ? std::sqrt(err / norm) : 0;
  CHECK(rel < (T == DType::kFloat16 ? 1e-3 : 8e-3), "%s rounded output rel err %g", tname<T>(),
        rel);
}

// ----- 4. splits -----

void test_splits() {
  // Decode on an A100 (108 SMs), Llama-3-8B K x N = 4096 x 4096: 32 tiles -> 3 splits.
  CHECK(fp8_weight_gemm_cuda_splits(1, 4096, 4096, 108) == 3, "splits %d",
        fp8_weight_gemm_cuda_splits(1, 4096, 4096, 108));
  // 4096 x 14336: 112 tiles >= 108 SMs: no split.
  CHECK(fp8_weight_gemm_cuda_splits(16, 4096, 14336, 108) == 1, "no split");
  // Few stages: at most stages / 2 splits.
  CHECK(fp8_weight_gemm_cuda_splits(1, 512, 64, 132) == 2, "stage cap");
  CHECK(fp8_weight_gemm_cuda_splits(1, 384, 64, 132) == 1, "< 4 stages");
  CHECK(fp8_weight_gemm_cuda_splits(1, 1 << 20, 1, 132) == 64, "cap 64");
  for (int64_t M : {1, 16, 17, 33, 64, 200})
    for (int64_t N : {1, 128, 1000, 4096})
      for (int64_t K : {16, 4096, 14336}) {
        const int S = fp8_weight_gemm_cuda_splits(M, K, N, 108);
        const int64_t stages = (K + 127) / 128;
        CHECK(S >= 1 && S <= 64 && (S == 1 || S <= stages / 2), "S %d", S);
        Fp8WeightGemmCudaParams p;
        p.M = M;
        p.N = N;
        p.K = K;
        p.num_sms = 108;
        CHECK(fp8_weight_gemm_cuda_workspace_size(p) == (S > 1 ? size_t(S) * M * N * 4 : 0),
              "workspace");
      }
}

}  // namespace

int main() {
  test_e4m3_definition();
  test_decode_all_codes<DType::kFloat16>();
  test_decode_all_codes<DType::kBFloat16>();
  test_dequant_float();
  test_swizzles_and_banks();
  test_splits();
  struct Case {
    int64_t M, N, K;
    Fp8ScaleLayout kind;
    int sms;
    bool nan;
  };
  const Case cases[] = {
      {1, 130, 272, Fp8ScaleLayout::kRow, 1, false},       // partial stage (K % 128 = 16)
      {5, 64, 1024, Fp8ScaleLayout::kTensor, 108, false},  // split-K (8 stages, 1 tile -> 4)
      {17, 200, 400, Fp8ScaleLayout::kBlock, 108, false},  // MT = 2, split, blocks
      {33, 136, 656, Fp8ScaleLayout::kBlock, 1, true},     // MT = 4, NaN code
      {7, 1, 16, Fp8ScaleLayout::kRow, 108, false},        // one k16 slice, N = 1
      {64, 257, 528, Fp8ScaleLayout::kRow, 108, true},     // MT = 4 full
  };
  uint32_t seed = 1;
  for (const Case& c : cases) {
    if (c.K % 16 != 0) continue;
    test_kernel_emulation<DType::kFloat16>(c.M, c.N, c.K, c.kind, c.sms, c.nan, seed++);
    test_kernel_emulation<DType::kBFloat16>(c.M, c.N, c.K, c.kind, c.sms, c.nan, seed++);
  }
  return check_result("test_fp8_mma");
}
