// int4_gemm through the torch-free API, as an embedding runtime would use it: GPTQ tensors ->
// int4_gemm_pack -> int4_gemm_cpu, against a float64 evaluation of the GPTQ definition, on every
// ISA path, for act-order groups of uneven sizes, asymmetric zeros, fp32 and bf16 activations;
// and int4_gemm_decode_cpu (the dense path's decode) bit for bit.
#include <bitpress/bitpress.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "check.h"

using namespace bitpress;

int main() {
  std::mt19937 rng(7);
  const int64_t K = 144, N = 70, G = 5, M = 3;
  // GPTQ tensors: q [K, N], real zeros [G, N], scales fp32 [G, N], g_idx with uneven groups.
  std::vector<int32_t> q(K * N), z(G * N), g_idx(K);
  for (auto& v : q) v = int32_t(rng() % 16);
  for (auto& v : z) v = int32_t(rng() % 16);
  for (auto& v : g_idx) v = int32_t(rng() % G);
  std::vector<float> scales(G * N);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto& s : scales) s = 0.01f + 0.02f * std::fabs(normal(rng));
  const int64_t NZ = (N + 7) / 8;
  std::vector<int32_t> qweight(K / 8 * N, 0), qzeros(G * NZ, 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n)
      qweight[k / 8 * N + n] |= int32_t(uint32_t(q[k * N + n]) << (4 * (k % 8)));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t n = 0; n < N; ++n)
      qzeros[g * NZ + n / 8] |= int32_t(uint32_t(z[g * N + n]) << (4 * (n % 8)));

  Int4PackParams pk;
  pk.qweight = qweight.data();
  pk.qweight_row_stride = N;
  pk.qzeros = qzeros.data();
  pk.qzeros_row_stride = NZ;
  pk.scales = scales.data();
  pk.scales_dtype = DType::kFloat32;
  pk.scales_row_stride = N;
  pk.g_idx = g_idx.data();
  pk.K = K;
  pk.N = N;
  pk.G = G;
  int64_t Kp = 0;
  CHECK(int4_gemm_pack_size(pk, &Kp) == Status::kSuccess && Kp >= K && Kp % 8 == 0, "size");
  const int64_t Nt = (N + kInt4TileN - 1) / kInt4TileN;
  std::vector<int32_t> qt(Nt * Kp / 8 * kInt4TileN), starts(G + 1), perm(Kp);
  std::vector<float> st(Nt * G * kInt4TileN);
  std::vector<uint8_t> zt(Nt * G * kInt4TileN);
  CHECK(int4_gemm_pack(pk, qt.data(), st.data(), zt.data(), starts.data(), perm.data()) ==
            Status::kSuccess,
        "pack");

  std::vector<float> x(M * K);
  for (auto& v : x) v = normal(rng);
  // float64 reference of the GPTQ definition.
  std::vector<double> want(M * N, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = g_idx[k];
        want[m * N + n] +=
            double(x[m * K + k]) * double(q[k * N + n] - z[g * N + n]) * double(scales[g * N + n]);
      }

  for (DType xd : {DType::kFloat32, DType::kBFloat16}) {
    std::vector<uint16_t> xb(M * K);
    for (int64_t i = 0; i < M * K; ++i) xb[i] = float_to_bf16_bits(x[i]);
    for (int isa = 0; isa <= int(best_cpu_isa()); ++isa) {
      CHECK(set_cpu_isa(CpuIsa(isa)) == Status::kSuccess, "isa %d", isa);
      Int4GemmParams p;
      p.x = xd == DType::kFloat32 ? static_cast<const void*>(x.data()) : xb.data();
      p.x_dtype = xd;
      p.x_row_stride = K;
      p.M = M;
      p.K = K;
      p.qweight = qt.data();
      p.scales = st.data();
      p.zeros = zt.data();
      p.group_starts = starts.data();
      p.perm = perm.data();
      p.Kp = Kp;
      p.G = G;
      p.N = N;
      std::vector<float> out(M * N, NAN);
      p.out = out.data();
      p.out_dtype = DType::kFloat32;
      p.out_row_stride = N;
      const size_t ws = int4_gemm_cpu_workspace_size(M, Kp, G);
      void* w = std::aligned_alloc(64, (ws + 63) / 64 * 64);
      p.workspace = w;
      p.workspace_bytes = ws;
      CHECK(int4_gemm_cpu(p) == Status::kSuccess, "gemm isa %d", isa);
      std::free(w);
      double num = 0, den = 0;
      for (int64_t i = 0; i < M * N; ++i) {
        // bf16 x: the reference uses the same rounded x.
        double ref = want[i];
        if (xd == DType::kBFloat16) {
          ref = 0;
          const int64_t m = i / N, n = i % N;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t g = g_idx[k];
            ref += double(bf16_bits_to_float(xb[m * K + k])) * double(q[k * N + n] - z[g * N + n]) *
                   double(scales[g * N + n]);
          }
        }
        num += (out[i] - ref) * (out[i] - ref);
        den += ref * ref;
      }
      const double rel = std::sqrt(num / den);
      CHECK(rel < 2e-6, "isa %d x %s: relative error %g", isa, dtype_name(xd), rel);
    }
    reset_cpu_isa();
  }

  // The dense path's decode: Wt[k, n] = (q - z) * s in float32 (the same two operations, so
  // bit-exact in fp32), and rounded once to bf16, on every ISA path.
  for (int isa = 0; isa <= int(best_cpu_isa()); ++isa) {
    CHECK(set_cpu_isa(CpuIsa(isa)) == Status::kSuccess, "isa %d", isa);
    Int4GemmParams p;
    p.K = K;
    p.qweight = qt.data();
    p.scales = st.data();
    p.zeros = zt.data();
    p.group_starts = starts.data();
    p.perm = perm.data();
    p.Kp = Kp;
    p.G = G;
    p.N = N;
    const int64_t ld = N + 3;  // a row stride wider than N
    std::vector<float> wt(K * ld, NAN);
    std::vector<uint16_t> wb(K * ld, 0xFFFF);
    CHECK(int4_gemm_decode_cpu(p, wt.data(), DType::kFloat32, ld) == Status::kSuccess, "decode");
    CHECK(int4_gemm_decode_cpu(p, wb.data(), DType::kBFloat16, ld) == Status::kSuccess, "decode");
    int64_t bad_f = 0, bad_b = 0;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t g = g_idx[k];
        const float w = float(q[k * N + n] - z[g * N + n]) * scales[g * N + n];
        bad_f += wt[k * ld + n] != w;
        bad_b += wb[k * ld + n] != float_to_bf16_bits(w);
      }
    CHECK(bad_f == 0 && bad_b == 0, "decode isa %d: %lld fp32 and %lld bf16 values differ", isa,
          (long long)bad_f, (long long)bad_b);
  }
  reset_cpu_isa();
  {
    Int4GemmParams p;  // a row stride below N
    p.K = K;
    p.N = N;
    p.Kp = Kp;
    p.perm = perm.data();
    std::vector<float> wt(K * N);
    CHECK(int4_gemm_decode_cpu(p, wt.data(), DType::kFloat32, N - 1) == Status::kInvalidArgument,
          "decode stride");
  }

  // Bad input: g_idx out of range.
  std::vector<int32_t> bad = g_idx;
  bad[3] = int32_t(G);
  pk.g_idx = bad.data();
  CHECK(int4_gemm_pack_size(pk, &Kp) == Status::kInvalidArgument, "bad g_idx");
  return check_result("test_int4_gemm");
}
