// The CPU GEMM microkernel (bitpress/cpu/gemm_microkernel.h): every variant this CPU runs (AMX,
// AVX512-BF16, AVX2), and the host emulations of AMX and AVX512-BF16 (always), against a float64
// reference on odd shapes, with and without accumulation into C, and padded strides; on a CPU with
// AMX (AVX512-BF16), the real variant against its emulation.
//
// Bound. Every product a*b of two bf16 is exact in float32, so a variant computes C0 + sum of K
// exact terms with float32 additions in some order; whatever the order (pairs, tiles, lanes),
// recursive summation of n = K + 1 terms has |error| <= gamma_K * sum |terms|, gamma_K = K u /
// (1 - K u), u = 2^-24 (Higham, Accuracy and Stability, 4.2). The reference sums the exact terms in
// float64 (error ~K 2^-53 relative: negligible). Two variants thus differ by at most twice that.
// FTZ/DAZ of the AMX and BF16 instructions cannot matter here: the data has no denormal inputs and
// the bound's terms are >= 2^-30 or zero. Real AMX hardware may add the two products of a pair in
// another order or with one rounding (the SDM's pseudo-code adds the even then the odd product);
// this test prints how many outputs match the emulation bit for bit but asserts only the bound.
#include <bitpress/common/cpu.h>
#include <bitpress/cpu/gemm_microkernel.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"

using namespace bitpress;
using namespace bitpress::cpu;

namespace {

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even (no NaNs here)
  return uint16_t(u >> 16);
}
double from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Problem {
  int64_t M, N, K, lda, ldb, ldc;
  std::vector<uint16_t> a;  // [M, lda]
  std::vector<uint32_t> b;  // [K/2, ldb]
  std::vector<float> c0;    // [M, ldc]
  std::vector<double> ref, mag;

  Problem(int64_t M_, int64_t N_, int64_t K_, std::mt19937& rng) : M(M_), N(N_), K(K_) {
    lda = K + 8;  // padded strides: a kernel that ignores them reads the wrong elements
    ldb = N + 16;
    ldc = N + 4;
    std::normal_distribution<float> normal(0.f, 1.f);
    a.assign(M * lda, to_bf16(NAN));  // padding NaN: reading it poisons the result
    b.assign(K / 2 * ldb, 0x7fc07fc0u);
    c0.assign(M * ldc, NAN);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) a[m * lda + k] = to_bf16(normal(rng));
    for (int64_t p = 0; p < K / 2; ++p)
      for (int64_t n = 0; n < N; ++n)
        b[p * ldb + n] = uint32_t(to_bf16(normal(rng))) | uint32_t(to_bf16(normal(rng))) << 16;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) c0[m * ldc + n] = normal(rng);
    ref.assign(M * N, 0.);
    mag.assign(M * N, 0.);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double s = 0., t = 0.;
        for (int64_t k = 0; k < K; ++k) {
          const uint32_t pr = b[k / 2 * ldb + n];
          const double prod = from_bf16(a[m * lda + k]) * from_bf16(uint16_t(pr >> (16 * (k & 1))));
          s += prod;
          t += std::fabs(prod);
        }
        ref[m * N + n] = s;
        mag[m * N + n] = t;
      }
    }
  }

  // C after the variant, with C0 (accumulate) or without.
  std::vector<float> run(GemmKernel k, bool accumulate, Status* st) const {
    std::vector<float> c = c0;
    if (!accumulate) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) c[m * ldc + n] = NAN;  // must be overwritten, not read
    }
    GemmBf16Args g;
    g.a = a.data();
    g.lda = lda;
    g.b = b.data();
    g.ldb = ldb;
    g.c = c.data();
    g.ldc = ldc;
    g.M = M;
    g.N = N;
    g.K = K;
    g.accumulate = accumulate;
    *st = gemm_bf16(k, g);
    return c;
  }

  double bound(int64_t m, int64_t n, bool accumulate) const {
    const double u = std::ldexp(1.0, -24), nk = double(K + 1);
    const double terms = mag[m * N + n] + (accumulate ? std::fabs(c0[m * ldc + n]) : 0.);
    return nk * u / (1 - nk * u) * terms;
  }
};

}  // namespace

int main() {
  const GemmKernel kernels[] = {GemmKernel::kAmx, GemmKernel::kAvx512Bf16, GemmKernel::kAvx2,
                                GemmKernel::kAmxEmulated, GemmKernel::kAvx512Bf16Emulated};
  for (GemmKernel k : kernels) {
    std::printf("%-22s %s\n", gemm_kernel_name(k),
                gemm_kernel_available(k) ? "runs (tested)" : "not on this CPU (its emulation is)");
  }
  std::mt19937 rng(11);
  int64_t amx_same = 0, amx_total = 0, bf16_same = 0, bf16_total = 0;
  double worst = 0.;  // largest |error| / bound seen
  for (int64_t M : {1, 7, 16, 33}) {
    for (int64_t K : {32, 96, 4096}) {
      for (int64_t N : {16, 48, 64, 96}) {
        const Problem pb(M, N, K, rng);
        for (bool acc : {true, false}) {
          std::vector<float> out[5];
          for (int i = 0; i < 5; ++i) {
            if (!gemm_kernel_available(kernels[i])) continue;
            Status st;
            out[i] = pb.run(kernels[i], acc, &st);
            CHECK(st == Status::kSuccess, "%s M=%ld K=%ld N=%ld: status %d",
                  gemm_kernel_name(kernels[i]), long(M), long(K), long(N), int(st));
            int bad = 0;
            for (int64_t m = 0; m < M; ++m) {
              for (int64_t n = 0; n < N; ++n) {
                const double want = pb.ref[m * N + n] + (acc ? pb.c0[m * pb.ldc + n] : 0.);
                const double err = std::fabs(double(out[i][m * pb.ldc + n]) - want);
                const double bnd = pb.bound(m, n, acc);
                if (!(err <= bnd)) ++bad;
                if (bnd > 0 && err / bnd > worst) worst = err / bnd;
              }
              // Columns past N and C's padding are not written.
              for (int64_t n = N; n < pb.ldc; ++n) {
                CHECK(std::memcmp(&out[i][m * pb.ldc + n], &pb.c0[m * pb.ldc + n], 4) == 0 ||
                          (std::isnan(out[i][m * pb.ldc + n]) && std::isnan(pb.c0[m * pb.ldc + n])),
                      "%s wrote column %ld of row %ld", gemm_kernel_name(kernels[i]), long(n),
                      long(m));
              }
            }
            CHECK(bad == 0, "%s M=%ld K=%ld N=%ld acc=%d: %d outputs outside the bound",
                  gemm_kernel_name(kernels[i]), long(M), long(K), long(N), int(acc), bad);
          }
          // Real against emulated, where both ran.
          auto cmp = [&](int r, int e, int64_t* same, int64_t* total) {
            if (out[r].empty()) return;
            for (int64_t m = 0; m < M; ++m) {
              for (int64_t n = 0; n < N; ++n) {
                const float x = out[r][m * pb.ldc + n], y = out[e][m * pb.ldc + n];
                *same += std::memcmp(&x, &y, 4) == 0;
                ++*total;
                CHECK(std::fabs(double(x) - double(y)) <= 2 * pb.bound(m, n, acc),
                      "%s vs emulation M=%ld K=%ld N=%ld (%ld, %ld): %.9g vs %.9g",
                      gemm_kernel_name(kernels[r]), long(M), long(K), long(N), long(m), long(n),
                      double(x), double(y));
              }
            }
          };
          cmp(0, 3, &amx_same, &amx_total);
          cmp(1, 4, &bf16_same, &bf16_total);
        }
      }
    }
  }
  std::printf("largest |error| / bound: %.3g\n", worst);
  if (amx_total) {
    std::printf("amx real vs emulation: %ld of %ld outputs bit for bit\n", long(amx_same),
                long(amx_total));
  }
  if (bf16_total) {
    std::printf("avx512_bf16 real vs emulation: %ld of %ld outputs bit for bit\n", long(bf16_same),
                long(bf16_total));
  }

  // Shape rules.
  {
    GemmBf16Args g;
    float c[16];
    uint16_t a[32] = {};
    uint32_t b[16 * 16] = {};
    g.a = a;
    g.b = b;
    g.c = c;
    g.lda = 32;
    g.ldb = 16;
    g.ldc = 16;
    g.M = 1;
    g.N = 16;
    g.K = 16;
    CHECK(gemm_bf16_check(GemmKernel::kAmxEmulated, g) == Status::kInvalidArgument, "K %% 32");
    CHECK(gemm_bf16_check(GemmKernel::kAvx512Bf16Emulated, g) == Status::kSuccess, "K %% 2");
    g.N = 8;
    CHECK(gemm_bf16_check(GemmKernel::kAvx2, g) == Status::kInvalidArgument, "N %% 16");
  }
  return check_result("test_gemm_microkernel");
}
