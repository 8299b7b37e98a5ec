// int4_dequantize_cpu through the torch-free API: every ISA path, every dtype pair, act-order,
// a host thread pool through the hook, and the argument checks.
#include <bitpress/bitpress.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "check.h"

using namespace bitpress;

namespace {

// A pool that runs each half of the range on its own std::thread: proves the hook is honoured.
void two_thread_pool(void*, int64_t begin, int64_t end, int64_t, ParallelBody body, void* ctx) {
  const int64_t mid = begin + (end - begin) / 2;
  std::thread t([&] { body(ctx, begin, mid); });
  body(ctx, mid, end);
  t.join();
}

struct Case {
  int64_t K, N, group_size;
  bool zeros, act_order;
};

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const Case cases[] = {{8, 1, 8, false, false},
                        {64, 33, 16, true, false},
                        {136, 17, 32, true, true},
                        {256, 40, -1, true, false},
                        {128, 129, 128, false, true}};
  const CpuThreadPool pool{two_thread_pool, nullptr};
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const CpuIsa best = best_cpu_isa();

  for (const Case& c : cases) {
    const int64_t gs = c.group_size == -1 ? c.K : c.group_size;
    const int64_t G = c.act_order ? 5 : (c.K + gs - 1) / gs;
    const int64_t NZ = (c.N + 7) / 8;
    std::vector<int32_t> q(c.K * c.N), z(G * NZ * 8, 0), g_idx(c.K);
    for (auto& v : q) v = int32_t(rng() % 16);
    for (auto& v : z) v = int32_t(rng() % 16);
    for (int64_t k = 0; k < c.K; ++k) g_idx[k] = c.act_order ? int32_t(rng() % G) : int32_t(k / gs);
    std::vector<int32_t> qweight(c.K / 8 * c.N, 0), qzeros(G * NZ, 0);
    for (int64_t k = 0; k < c.K; ++k)
      for (int64_t n = 0; n < c.N; ++n)
        qweight[k / 8 * c.N + n] |= int32_t(uint32_t(q[k * c.N + n]) << (4 * (k % 8)));
    for (int64_t g = 0; g < G; ++g)
      for (int64_t n = 0; n < c.N; ++n)
        qzeros[g * NZ + n / 8] |= int32_t(uint32_t(z[g * NZ * 8 + n]) << (4 * (n % 8)));
    std::vector<float> scales32(G * c.N);
    std::normal_distribution<float> normal(0.f, 0.02f);
    for (auto& s : scales32) s = normal(rng);

    for (DType sd : dtypes) {
      // Scales stored in sd; the expected value uses the same rounded scale.
      std::vector<uint16_t> scales16(G * c.N);
      for (int64_t i = 0; i < G * c.N; ++i)
        scales16[i] = sd == DType::kFloat16 ? float_to_half_bits(scales32[i])
                                            : float_to_bf16_bits(scales32[i]);
      const void* sptr = sd == DType::kFloat32 ? static_cast<const void*>(scales32.data())
                                               : static_cast<const void*>(scales16.data());
      for (DType od : dtypes) {
        for (int isa = 0; isa <= int(best); ++isa) {
          CHECK(set_cpu_isa(CpuIsa(isa)) == Status::kSuccess, "set isa %d", isa);
          std::vector<uint8_t> out(c.K * c.N * 4, 0xff);  // poisoned: all-ones is NaN
          Int4DequantizeParams p;
          p.qweight = qweight.data();
          p.qweight_row_stride = c.N;
          p.scales = sptr;
          p.scales_dtype = sd;
          p.scales_row_stride = c.N;
          p.qzeros = c.zeros ? qzeros.data() : nullptr;
          p.qzeros_row_stride = NZ;
          p.g_idx = c.act_order ? g_idx.data() : nullptr;
          p.out = out.data();
          p.out_dtype = od;
          p.out_row_stride = c.N;
          p.K = c.K;
          p.N = c.N;
          p.num_groups = G;
          p.group_size = gs;
          CHECK(int4_dequantize_cpu(p, &pool) == Status::kSuccess, "status");
          for (int64_t k = 0; k < c.K; ++k) {
            for (int64_t n = 0; n < c.N; ++n) {
              const int64_t g = g_idx[k];
              const int zero = c.zeros ? z[g * NZ * 8 + n] : 8;
              const float s = load_as_float(sptr, sd, g * c.N + n);
              const float want = float(q[k * c.N + n] - zero) * s;
              const float got = load_as_float(out.data(), od, k * c.N + n);
              const float want_r = od == DType::kFloat32 ? want
                                   : od == DType::kFloat16
                                       ? half_bits_to_float(float_to_half_bits(want))
                                       : bf16_bits_to_float(float_to_bf16_bits(want));
              CHECK(std::memcmp(&got, &want_r, 4) == 0,
                    "K=%lld N=%lld isa=%d sd=%d od=%d at (%lld,%lld): %g vs %g", (long long)c.K,
                    (long long)c.N, isa, int(sd), int(od), (long long)k, (long long)n, got, want_r);
            }
          }
        }
        reset_cpu_isa();
      }
    }
  }

  // Argument checks.
  int32_t w = 0;
  float s = 1.f, o = 0.f;
  Int4DequantizeParams p;
  p.qweight = &w;
  p.qweight_row_stride = 1;
  p.scales = &s;
  p.scales_dtype = DType::kFloat32;
  p.scales_row_stride = 1;
  p.out = &o;
  p.out_dtype = DType::kFloat32;
  p.out_row_stride = 1;
  p.K = 8;
  p.N = 1;
  p.num_groups = 1;
  p.group_size = 8;
  CHECK(int4_dequantize_cpu(p) == Status::kSuccess, "valid");
  Int4DequantizeParams bad = p;
  bad.K = 7;
  CHECK(int4_dequantize_cpu(bad) == Status::kInvalidArgument, "K not a multiple of 8");
  bad = p;
  bad.num_groups = 2;
  CHECK(int4_dequantize_cpu(bad) == Status::kInvalidArgument, "G != ceil(K/group_size)");
  bad = p;
  bad.qweight = nullptr;
  CHECK(int4_dequantize_cpu(bad) == Status::kInvalidArgument, "null qweight");
  bad = p;
  bad.out_dtype = DType(9);
  CHECK(int4_dequantize_cpu(bad) == Status::kInvalidArgument, "bad dtype");
  const int32_t g_bad[8] = {0, 0, 0, 0, 0, 0, 0, 1};
  bad = p;
  bad.g_idx = g_bad;
  CHECK(int4_dequantize_cpu(bad) == Status::kInvalidArgument, "g_idx out of range");

  return check_result("test_int4_dequantize");
}
