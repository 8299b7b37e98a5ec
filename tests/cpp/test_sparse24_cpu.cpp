// The 2:4 CPU kernels through the torch-free API: the metadata helpers, compress / decompress
// (exact, the pattern error), sparse24_gemm on every path the CPU can run and on every microkernel
// variant of the panel path (the AMX and AVX512-BF16 emulations everywhere), and
// sparse24_int4_gemm, each against a double reference.
#include <math.h>
#include <string.h>

#include <random>
#include <vector>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/cpu/gemm_microkernel.h"
#include "bitpress/sparse24/sparse24.h"
#include "bitpress/sparse24/sparse24_cpu.h"
#include "check.h"

using namespace bitpress;

namespace {

std::mt19937 rng(1234);

// A dense bf16 [N, K] weight with the 2:4 pattern (small integers times 2^-3: exact sums).
std::vector<uint16_t> random_24(int64_t N, int64_t K) {
  std::vector<uint16_t> w(size_t(N * K), 0);
  std::uniform_int_distribution<int> pos(0, 3), val(-8, 8);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < K / 4; ++g) {
      for (int t = 0; t < 2; ++t) {
        w[n * K + 4 * g + pos(rng)] = float_to_bf16_bits(float(val(rng)) * 0.125f);
      }
    }
  }
  return w;
}

void test_helpers() {
  int valid = 0;
  for (uint32_t nib = 0; nib < 16; ++nib) {
    const bool ok = sparse24_idx0(nib) < sparse24_idx1(nib);
    CHECK(sparse24_nibble_valid(nib) == ok, "nibble %u", nib);
    valid += ok;
  }
  CHECK(valid == 6, "%d valid nibbles", valid);
  for (uint32_t mask = 0; mask < 16; ++mask) {
    const uint32_t nib = sparse24_nibble_of_mask(mask);
    if (__builtin_popcount(mask) > 2) {
      CHECK(nib == 0xFFu, "mask %u", mask);
      continue;
    }
    CHECK(sparse24_nibble_valid(nib), "mask %u -> %u", mask, nib);
    // Every nonzero position is kept.
    for (int i = 0; i < 4; ++i) {
      if ((mask >> i) & 1) {
        CHECK(sparse24_idx0(nib) == i || sparse24_idx1(nib) == i, "mask %u pos %d", mask, i);
      }
    }
  }
  // Value j's position is bits 2j..2j+1 of the row read little-endian.
  const uint8_t meta[2] = {uint8_t(0x9 | (0xE << 4)), uint8_t(0x4 | (0xC << 4))};
  const int want[8] = {1, 2, 2, 3, 0, 1, 0, 3};
  uint32_t word = uint32_t(meta[0]) | uint32_t(meta[1]) << 8;
  for (int j = 0; j < 8; ++j) {
    CHECK(sparse24_value_pos(meta, j) == want[j], "value %d", j);
    CHECK(sparse24_value_col(meta, j) == (j / 2) * 4 + want[j], "col %d", j);
    CHECK(sparse24_word_col(word, j) == (j / 2) * 4 + want[j], "word col %d", j);
  }
}

void test_compress() {
  for (int64_t K : {8, 64, 136}) {
    const int64_t N = 13;
    std::vector<uint16_t> w = random_24(N, K), v(size_t(N * K / 2)), back(size_t(N * K));
    std::vector<uint8_t> meta(size_t(N * K / 8));
    int64_t r = -1, g = -1;
    int c = 0;
    CHECK(sparse24_compress_cpu(w.data(), 2, N, K, K, v.data(), meta.data(), &r, &g, &c, nullptr) ==
              Status::kSuccess,
          "compress K=%ld", long(K));
    CHECK(sparse24_decompress_cpu(v.data(), 2, meta.data(), N, K, back.data(), nullptr) ==
              Status::kSuccess,
          "decompress");
    for (size_t i = 0; i < w.size(); ++i) {
      // -0.0 never occurs here: the round trip is bit for bit.
      CHECK(back[i] == w[i], "K=%ld i=%zu", long(K), i);
    }
    int64_t br, bg;
    int bn;
    CHECK(!sparse24_find_bad_meta(meta.data(), N, K, &br, &bg, &bn), "valid meta flagged");
    std::vector<uint8_t> good = meta;  // the failed compress below leaves meta undefined
    // A third nonzero in row 5, group 1, and a later one: the first is named.
    w[5 * K + 4] = w[5 * K + 5] = w[5 * K + 6] = float_to_bf16_bits(1.f);
    w[9 * K] = w[9 * K + 1] = w[9 * K + 2] = float_to_bf16_bits(1.f);
    if (K >= 8) {
      const Status st =
          sparse24_compress_cpu(w.data(), 2, N, K, K, v.data(), meta.data(), &r, &g, &c, nullptr);
      CHECK(st == Status::kInvalidArgument && r == 5 && g == 1 && c >= 3, "bad: %ld %ld %d",
            long(r), long(g), c);
    }
    good[7 * (K / 8)] = 0x55;
    CHECK(sparse24_find_bad_meta(good.data(), N, K, &br, &bg, &bn) && br == 7 && bg == 0 && bn == 5,
          "bad meta %ld %ld %d", long(br), long(bg), bn);
  }
}

// y (double) = x W^T for bf16 x [M, K] and the dense W.
std::vector<double> ref_gemm(const std::vector<uint16_t>& x, const std::vector<uint16_t>& w,
                             int64_t M, int64_t K, int64_t N) {
  std::vector<double> y(size_t(M * N), 0.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) {
        s += double(bf16_bits_to_float(x[m * K + k])) * bf16_bits_to_float(w[n * K + k]);
      }
      y[m * N + n] = s;
    }
  }
  return y;
}

void test_gemm_bf16() {
  struct Shape {
    int64_t M, K, N;
  };
  const Shape shapes[] = {{1, 64, 16}, {5, 136, 33}, {16, 256, 7}, {17, 96, 40}, {40, 512, 61}};
  for (const Shape& s : shapes) {
    std::vector<uint16_t> w = random_24(s.N, s.K), v(size_t(s.N * s.K / 2));
    std::vector<uint8_t> meta(size_t(s.N * s.K / 8));
    int64_t r, g;
    int c;
    sparse24_compress_cpu(w.data(), 2, s.N, s.K, s.K, v.data(), meta.data(), &r, &g, &c, nullptr);
    std::vector<uint16_t> x(size_t(s.M * s.K));
    std::uniform_int_distribution<int> xv(-16, 16);
    for (auto& e : x) e = float_to_bf16_bits(float(xv(rng)) * 0.25f);
    const std::vector<double> want = ref_gemm(x, w, s.M, s.K, s.N);
    // Small integer multiples of powers of two: every path's float32 sums are exact.
    struct Run {
      Sparse24GemmPath path;
      int kernel;
    };
    std::vector<Run> runs = {{Sparse24GemmPath::kDirect, -1}, {Sparse24GemmPath::kAuto, -1}};
    for (cpu::GemmKernel k :
         {cpu::GemmKernel::kAmx, cpu::GemmKernel::kAvx512Bf16, cpu::GemmKernel::kAvx2,
          cpu::GemmKernel::kAmxEmulated, cpu::GemmKernel::kAvx512Bf16Emulated}) {
      if (cpu::gemm_kernel_available(k)) runs.push_back({Sparse24GemmPath::kPanels, int(k)});
    }
    for (const Run& run : runs) {
      for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAmx}) {
        if (isa > best_cpu_isa()) continue;
        set_cpu_isa(isa);
        std::vector<uint16_t> out(size_t(s.M * s.N), 0x7FC0);
        Sparse24GemmParams p;
        p.x = x.data();
        p.x_dtype = DType::kBFloat16;
        p.x_row_stride = s.K;
        p.M = s.M;
        p.K = s.K;
        p.N = s.N;
        p.values = v.data();
        p.meta = meta.data();
        p.out = out.data();
        p.out_row_stride = s.N;
        p.path = run.path;
        p.gemm_kernel = run.kernel;
        const Status st = sparse24_gemm_cpu(p, nullptr);
        if (st == Status::kUnsupported) continue;  // a real variant this ISA cap excludes
        CHECK(st == Status::kSuccess, "status %d", int(st));
        for (int64_t i = 0; i < s.M * s.N; ++i) {
          const float want_bf16 = bf16_bits_to_float(float_to_bf16_bits(float(want[i])));
          CHECK(bf16_bits_to_float(out[i]) == want_bf16, "M=%ld K=%ld N=%ld path=%s isa=%d i=%ld",
                long(s.M), long(s.K), long(s.N), sparse24_gemm_cpu_path_name(p), int(isa), long(i));
        }
      }
      reset_cpu_isa();
    }
  }
}

void test_gemm_float32_and_int4() {
  const int64_t M = 3, K = 160, N = 9, gs = 32, G = K / gs;
  std::vector<uint16_t> wb = random_24(N, K);
  std::vector<uint8_t> meta(size_t(N * K / 8));
  std::vector<uint16_t> vb(size_t(N * K / 2));
  int64_t r, g;
  int c;
  sparse24_compress_cpu(wb.data(), 2, N, K, K, vb.data(), meta.data(), &r, &g, &c, nullptr);
  std::vector<float> v(vb.size()), x(size_t(M * K));
  for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_bits_to_float(vb[i]);
  std::normal_distribution<float> nd;
  for (auto& e : x) e = nd(rng);
  std::vector<int32_t> q(size_t(N * K / 16), 0);
  std::uniform_int_distribution<int> code(0, 15);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < K / 2; ++j) {
      q[n * (K / 16) + j / 8] |= int32_t(uint32_t(code(rng)) << (4 * (j % 8)));
    }
  }
  std::vector<float> sc(size_t(G * N)), zr(size_t(G * N));
  for (auto& e : sc) e = 0.01f + std::abs(nd(rng)) * 0.01f;
  for (auto& e : zr) e = 7.5f + nd(rng);
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (isa > best_cpu_isa()) continue;
    set_cpu_isa(isa);
    std::vector<float> out(size_t(M * N), NAN), out4(size_t(M * N), NAN);
    Sparse24GemmParams p;
    p.x = x.data();
    p.x_dtype = DType::kFloat32;
    p.x_row_stride = K;
    p.M = M;
    p.K = K;
    p.N = N;
    p.values = v.data();
    p.meta = meta.data();
    p.out = out.data();
    p.out_row_stride = N;
    CHECK(sparse24_gemm_cpu(p, nullptr) == Status::kSuccess, "fp32 gemm");
    Sparse24Int4GemmParams p4;
    p4.x = x.data();
    p4.x_dtype = DType::kFloat32;
    p4.x_row_stride = K;
    p4.M = M;
    p4.K = K;
    p4.N = N;
    p4.qvalues = q.data();
    p4.meta = meta.data();
    p4.scales = sc.data();
    p4.zeros = zr.data();
    p4.G = G;
    p4.group_size = gs;
    p4.out = out4.data();
    p4.out_row_stride = N;
    CHECK(sparse24_int4_gemm_cpu(p4, nullptr) == Status::kSuccess, "int4 gemm");
    std::vector<float> dense(size_t(N * K));
    CHECK(sparse24_int4_dequantize_cpu(p4, dense.data(), nullptr) == Status::kSuccess, "deq");
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double s = 0, s4 = 0, s4d = 0, mag = 0, mag4 = 0;
        for (int64_t j = 0; j < K / 2; ++j) {
          const int64_t col = sparse24_value_col(meta.data() + n * (K / 8), j);
          const double xv = x[m * K + col];
          s += xv * v[n * (K / 2) + j];
          mag += std::abs(xv * v[n * (K / 2) + j]);
          const int64_t grp = col / gs;
          const double w4 =
              (double(sparse24_int4_code(q.data() + n * (K / 16), j)) - zr[grp * N + n]) *
              sc[grp * N + n];
          s4 += xv * w4;
          mag4 += std::abs(xv * w4);
          s4d += xv * dense[n * K + col];
        }
        CHECK(std::abs(out[m * N + n] - s) <= 1e-5 * mag + 1e-30, "fp32 isa=%d", int(isa));
        CHECK(std::abs(out4[m * N + n] - s4) <= 1e-5 * mag4 + 1e-30, "int4 isa=%d %f %f", int(isa),
              out4[m * N + n], s4);
        CHECK(std::abs(s4d - s4) <= 1e-5 * mag4 + 1e-30, "dequantize");
      }
    }
    // An unordered nibble is rejected.
    std::vector<uint8_t> bad = meta;
    bad[N * K / 8 - 1] = 0x3C;
    p.meta = bad.data();
    p4.meta = bad.data();
    CHECK(sparse24_gemm_cpu(p, nullptr) == Status::kInvalidArgument, "bad meta gemm");
    CHECK(sparse24_int4_gemm_cpu(p4, nullptr) == Status::kInvalidArgument, "bad meta int4");
  }
  reset_cpu_isa();
}

}  // namespace

int main() {
  test_helpers();
  test_compress();
  test_gemm_bf16();
  test_gemm_float32_and_int4();
  return check_result("test_sparse24_cpu");
}
