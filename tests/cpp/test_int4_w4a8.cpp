// W4A8 int4_gemm (int4_gemm_w4a8_cpu): every variant this CPU runs (AMX-INT8, AVX512-VNNI), the
// scalar one and the emulation of AMX-INT8 (on every machine) against a double-precision reference
// of the formula in bitpress/int4/int4_gemm.h, and against each other bit for bit.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cstdio>
#include <random>
#include <vector>

#include "bitpress/common/cpu.h"
#include "bitpress/int4/int4_gemm.h"
#include "check.h"

using namespace bitpress;

namespace {

constexpr int kQuadPos[8] = {0, 2, 4, 6, 1, 3, 5, 7};
constexpr int kNibbleOfRow[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // inverse of (0,2,4,6,1,3,5,7)

struct Case {
  int64_t M, K, N, gs;
  bool zeros;
};

void run_case(const Case& c, std::mt19937& rng) {
  const int64_t Nt = (c.N + 63) / 64, K8 = c.K / 8, G = c.K / c.gs;
  std::vector<uint8_t> q(size_t(c.K * Nt * 64));
  std::vector<int32_t> qw(size_t(Nt * K8 * 64), 0);
  std::uniform_int_distribution<int> nib(0, 15);
  for (int64_t t = 0; t < Nt; ++t)
    for (int64_t k = 0; k < c.K; ++k)
      for (int cc = 0; cc < 64; ++cc) {
        const int v = nib(rng);
        q[(k * Nt + t) * 64 + cc] = uint8_t(v);
        qw[(t * K8 + k / 8) * 64 + cc] |= int32_t(uint32_t(v) << (4 * kNibbleOfRow[k % 8]));
      }
  std::uniform_real_distribution<float> us(0.001f, 0.02f);
  std::vector<float> sc(size_t(Nt * G * 64));
  std::vector<uint8_t> zr(size_t(Nt * G * 64));
  for (auto& s : sc) s = us(rng);
  for (auto& z : zr) z = uint8_t(nib(rng));
  std::vector<int32_t> gst(size_t(G + 1));
  for (int64_t g = 0; g <= G; ++g) gst[g] = int32_t(g * c.gs / 8);
  std::normal_distribution<float> nx(0.f, 1.f);
  std::vector<float> x(size_t(c.M * c.K));
  for (auto& v : x) v = nx(rng);
  for (int64_t k = 0; k < c.K; ++k) x[k] = 0.f;  // an all-zero row: sx = 1

  Int4GemmParams p;
  p.x = x.data();
  p.x_dtype = DType::kFloat32;
  p.x_row_stride = c.K;
  p.M = c.M;
  p.K = p.Kp = c.K;
  p.N = c.N;
  p.G = G;
  p.qweight = qw.data();
  p.scales = sc.data();
  p.zeros = c.zeros ? zr.data() : nullptr;
  p.group_starts = gst.data();
  p.out_dtype = DType::kFloat32;
  p.out_row_stride = c.N;

  // Reference: quantization in float32 as specified, sums in double.
  std::vector<double> ref(size_t(c.M * c.N));
  for (int64_t m = 0; m < c.M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < c.K; ++k) amax = fmaxf(amax, fabsf(x[m * c.K + k]));
    const float sx = amax > 0.f ? amax / 127.f : 1.f;
    std::vector<double> xq(size_t(c.K));
    for (int64_t k = 0; k < c.K; ++k) {
      float r = nearbyintf(x[m * c.K + k] / sx);
      xq[k] = fminf(fmaxf(r, -127.f), 127.f);
    }
    for (int64_t n = 0; n < c.N; ++n) {
      const int64_t t = n / 64, cc = n % 64;
      double acc = 0;
      for (int64_t k = 0; k < c.K; ++k) {
        const int64_t g = k / c.gs;
        const double z = c.zeros ? zr[(t * G + g) * 64 + cc] : 8;
        acc += xq[k] * (q[(k * Nt + t) * 64 + cc] - z) * sc[(t * G + g) * 64 + cc];
      }
      ref[m * c.N + n] = acc * sx;
    }
  }

  const Int4W4A8Kernel kernels[] = {Int4W4A8Kernel::kScalar, Int4W4A8Kernel::kAmxEmulated,
                                    Int4W4A8Kernel::kVnni, Int4W4A8Kernel::kAmx};
  std::vector<float> first;
  for (Int4W4A8Kernel k : kernels) {
    const bool amx = k == Int4W4A8Kernel::kAmx || k == Int4W4A8Kernel::kAmxEmulated;
    if (amx && c.gs % 64) continue;  // checked below: whole 64-row steps per group only
    if (!int4_w4a8_kernel_available(k)) {
      std::printf("  %s: not on this CPU (its emulation runs instead)\n", int4_w4a8_kernel_name(k));
      continue;
    }
    std::vector<float> out(size_t(c.M * c.N), -1.f);
    p.out = out.data();
    const Status st = int4_gemm_w4a8_cpu(p, nullptr, k);
    CHECK(st == Status::kSuccess, "%s status %d", int4_w4a8_kernel_name(k), int(st));
    double num = 0, den = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      num += (out[i] - ref[i]) * (out[i] - ref[i]);
      den += ref[i] * ref[i];
    }
    const double rel = sqrt(num / (den > 0 ? den : 1));
    CHECK(rel < 1e-5, "%s M=%lld K=%lld N=%lld gs=%lld rel %g", int4_w4a8_kernel_name(k),
          (long long)c.M, (long long)c.K, (long long)c.N, (long long)c.gs, rel);
    for (int64_t n = 0; n < c.N; ++n) CHECK(out[n] == 0.f, "zero row, column %lld", (long long)n);
    if (first.empty()) {
      first = out;
    } else {
      CHECK(memcmp(first.data(), out.data(), out.size() * 4) == 0, "%s differs from scalar",
            int4_w4a8_kernel_name(k));
    }
  }
  // AMX needs whole 64-row steps per group.
  if (c.gs % 64) {
    std::vector<float> out(size_t(c.M * c.N));
    p.out = out.data();
    CHECK(int4_gemm_w4a8_cpu(p, nullptr, Int4W4A8Kernel::kAmxEmulated) == Status::kInvalidArgument,
          "gs %lld on AMX", (long long)c.gs);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  std::printf("W4A8 auto kernel for M = 16, g128: %s\n", [] {
    static int32_t gs[2] = {0, 16};
    Int4GemmParams p;
    p.M = 16;
    p.G = 1;
    p.Kp = 128;
    p.group_starts = gs;
    return int4_w4a8_kernel_name(int4_w4a8_kernel_for(p));
  }());
  const Case cases[] = {{1, 128, 64, 128, false},  {3, 256, 70, 128, true},
                        {16, 384, 130, 64, true},  {17, 256, 64, 32, true},
                        {33, 512, 65, 128, false}, {40, 192, 128, 64, true}};
  for (const Case& c : cases) run_case(c, rng);
  (void)kQuadPos;
  return check_result("test_int4_w4a8");
}
