// Host tests of the CUDA int4_gemm's __host__ __device__ helpers (bitpress/int4/int4_mma_dequant.h,
// and the shared swizzle of bitpress/cuda/primitives.cuh):
//   1. lop3 / magic-number dequantization: every q and z (0..15), fp16 and bf16, a sweep of
//      scales (normal, subnormal, large, random) against round((q - z) * s) computed in double;
//   2. the shared-memory index math: A swizzle (bijective, ldmatrix conflict-free), B and scale
//      loaders, split-K ranges, the split heuristic and workspace size;
//   3. the whole GEMM kernel emulated on the CPU, block by block and warp by warp: the cp.async
//      loaders through the same helpers, ldmatrix.x4 and mma.m16n8k16 emulated from the PTX ISA
//      fragment tables (written out here independently of the helpers), dequantization with the
//      host helpers, the k-warp reduction, split-K partials and the C fragment -> (m, n) stores;
//      compared with x * dequant(W) in double. Ragged M, N and K (partial tiles, stages, blocks);
//      groups that straddle stages and splits (3, 5, 16 k-tiles per group); the act-order gather
//      (int4_gemm_gather_kernel: x_perm from x, perm with padding rows, NaN for a bad perm
//      value) and the epilogue (bias of each dtype added in fp32, one rounding to fp16 / bf16,
//      after the split-K reduction or in the kernel);
//   4. argument checks of int4_gemm_cuda (no device needed).
#include <bitpress/bitpress.h>
#include <bitpress/int4/int4_mma_dequant.h>
#include <bitpress/int4/int4_mma_layout.h>

#include <algorithm>
#include <bitpress/cuda/primitives.cuh>
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
float hf(uint32_t bits) {
  return int4_mma_half_to_float<T>(bits & 0xFFFFu);
}

// Round a double that is exactly representable in float (all products here are) to the half type.
template <DType T>
uint32_t round_half(double v) {
  return int4_mma_float_to_half<T>(float(v));
}

bool same_value(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// ---------------------------------------------------------------------------------------------
// 1. dequantization
// ---------------------------------------------------------------------------------------------

template <DType T>
void test_dequant() {
  std::vector<float> scales = {1.f, 0.5f, 0.0123f, 3.14159f, 1e-3f, -0.02f, 0.f, 7.f / 3.f};
  if (T == DType::kFloat16) {
    // fp16 subnormal scales and products (2^-24 .. 2^-14), and large ones that overflow to inf.
    for (float s : {5.9604645e-08f, 1.7881393e-07f, 3.0e-6f, 6.1e-5f, 2.0e-5f, 1000.f, 4099.f,
                    30000.f, 65504.f})
      scales.push_back(s);
  } else {
    for (float s : {1e-39f, 9.2e-41f, 1.2e-38f, 3e-36f, 1e30f, 3e38f, 2.5e37f}) scales.push_back(s);
  }
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-4.f, 4.f);
  for (int i = 0; i < 200; ++i) scales.push_back(std::ldexp(u(rng), int(rng() % 30) - 20));

  const uint32_t magic = Int4MmaMagic<T>::kHalf;
  const float M = hf<T>(magic);
  CHECK(M == (T == DType::kFloat16 ? 1024.f : 128.f), "%s magic %g", tname<T>(), M);
  int checked = 0;
  for (int qa = 0; qa < 16; ++qa) {
    const int qb = (qa * 7 + 3) & 15;  // a different nibble in the high half
    for (int p = 0; p < 4; ++p) {
      // qa in nibble p, qb in nibble p + 4, the other nibbles filled with garbage.
      uint32_t word = 0xA5C3E19Bu;
      word &= ~((0xFu << (4 * p)) | (0xFu << (4 * (p + 4))));
      word |= uint32_t(qa) << (4 * p) | uint32_t(qb) << (4 * (p + 4));
      const uint32_t pair = int4_mma_offset_pair<T>(word, p);
      CHECK(hf<T>(pair) == M + qa && hf<T>(pair >> 16) == M + qb, "%s offset pair q=%d,%d p=%d",
            tname<T>(), qa, qb, p);
      for (int z = 0; z < 16; ++z) {
        const uint32_t zp = int4_mma_zero_pair<T>(uint32_t(z));
        CHECK(hf<T>(zp) == M + z && hf<T>(zp >> 16) == M + z, "%s zero pair %d", tname<T>(), z);
        for (float s : scales) {
          const uint32_t sp = int4_mma_scale_pair<T>(s);
          const double sh = hf<T>(sp);
          CHECK(hf<T>(sp >> 16) == sh, "scale pair halves");
          const uint32_t r = int4_mma_sub_mul<T>(pair, zp, sp);
          const float lo = hf<T>(round_half<T>(double(qa - z) * sh));
          const float hi = hf<T>(round_half<T>(double(qb - z) * sh));
          CHECK(same_value(hf<T>(r), lo) && same_value(hf<T>(r >> 16), hi),
                "%s q=%d,%d z=%d s=%g: got %g,%g want %g,%g", tname<T>(), qa, qb, z, double(s),
                double(hf<T>(r)), double(hf<T>(r >> 16)), double(lo), double(hi));
          ++checked;
        }
      }
    }
  }
  // The scale rounding is nearest-even: compare with the neighbours in double.
  for (float s : scales) {
    const double sh = hf<T>(int4_mma_scale_bits<T>(s));
    if (!std::isfinite(sh)) continue;
    const uint32_t b = int4_mma_scale_bits<T>(s);
    const double up = hf<T>(b + 1), dn = hf<T>(b == 0 ? 0 : b - 1);
    CHECK(std::fabs(sh - s) <= std::fabs(up - s) && std::fabs(sh - s) <= std::fabs(dn - s),
          "%s scale rounding %g", tname<T>(), double(s));
  }
  CHECK(checked > 16 * 4 * 16 * 200, "coverage");
}

// ---------------------------------------------------------------------------------------------
// 2. index math
// ---------------------------------------------------------------------------------------------

void test_indices() {
  // Layout helpers: value_coords and locate are inverse bijections on a k16 x n64 tile.
  std::vector<int> seen(16 * 64, 0);
  for (int lane = 0; lane < 32; ++lane)
    for (int w = 0; w < 4; ++w)
      for (int v = 0; v < 8; ++v) {
        int kk, nn, l2, w2, v2;
        int4_mma_value_coords(lane, w, v, &kk, &nn);
        int4_mma_locate(kk, nn, &l2, &w2, &v2);
        CHECK(l2 == lane && w2 == w && v2 == v, "locate(value_coords)");
        seen[kk * 64 + nn]++;
        // The B register of (w, p = nibble pair) is block 2w + p/2: value v sits in nibble
        // int4_mma_nibble_of_value(v) = p or p + 4, and its block is 2w + v/4.
        const int nib = int4_mma_nibble_of_value(v), p = nib & 3;
        CHECK(int4_mma_block_of_reg(w, p) == nn / 8, "block of reg");
        CHECK(int4_mma_half_of_reg(p) == (v & 3) / 2, "half of reg");  // b0b1 -> 0, b2b3 -> 1
      }
  for (int i = 0; i < 16 * 64; ++i) CHECK(seen[i] == 1, "tile coverage %d", i);

  // The shared XOR swizzle (bitpress/cuda/primitives.cuh) that the kernel's A tile uses: a
  // permutation of each row's chunks, and the 8 rows of one logical chunk in 8 bank groups.
  for (int row_chunks : {8, 16, 32}) {
    for (int row = 0; row < 16; ++row) {
      std::vector<int> rhit(row_chunks, 0);
      for (int ch = 0; ch < row_chunks; ++ch) {
        const int s = swizzled_chunk_index(row, ch, row_chunks) - row * row_chunks;
        CHECK(s >= 0 && s < row_chunks, "swizzle stays in the row");
        if (s >= 0 && s < row_chunks) rhit[s]++;
      }
      for (int s = 0; s < row_chunks; ++s) CHECK(rhit[s] == 1, "swizzle permutes a row");
    }
    for (int ch = 0; ch < row_chunks; ++ch) {
      int groups = 0;
      for (int r = 0; r < 8; ++r) groups |= 1 << (swizzled_chunk_index(r, ch, row_chunks) % 8);
      CHECK(groups == 0xFF, "swizzle: 8 rows of chunk %d in 8 bank groups", ch);
    }
  }
  for (int row = 0; row < 64; ++row)
    for (int ch = 0; ch < 16; ++ch)
      CHECK(int4_gemm_a_smem_chunk(row, ch) == swizzled_chunk_index(row, ch, 16),
            "A tile uses the shared swizzle");

  for (int MT : {1, 2, 4}) {
    const int chunks = 16 * MT * 16;
    std::vector<int> hit(chunks, 0);
    for (int c = 0; c < chunks; ++c) {
      int row, ch;
      int4_gemm_a_load_coords(c, &row, &ch);
      const int s = int4_gemm_a_smem_chunk(row, ch);
      CHECK(s >= 0 && s < chunks, "A smem range");
      if (s >= 0 && s < chunks) hit[s]++;
    }
    for (int s = 0; s < chunks; ++s) CHECK(hit[s] == 1, "A swizzle bijective MT=%d", MT);
    // ldmatrix.x4: each 8x8 matrix is read in one phase from lanes 8i..8i+7; conflict-free when
    // its 8 row addresses fall in 8 different 16-byte bank groups (row pitch 256 B: chunk % 8).
    for (int mi = 0; mi < MT; ++mi)
      for (int kk = 0; kk < 8; ++kk)
        for (int mat = 0; mat < 4; ++mat) {
          int groups = 0;
          for (int r = 0; r < 8; ++r) {
            int row, ch;
            int4_gemm_a_ldmatrix_coords(8 * mat + r, kk, &row, &ch);
            groups |= 1 << (int4_gemm_a_smem_chunk(16 * mi + row, ch) % 8);
          }
          CHECK(groups == 0xFF, "ldmatrix bank conflict mi=%d kk=%d mat=%d", mi, kk, mat);
        }
  }
  std::vector<int> bhit(512, 0);
  for (int c = 0; c < 512; ++c) {
    int kk, ntl, lane;
    int4_gemm_b_load_coords(c, &kk, &ntl, &lane);
    bhit[int4_gemm_b_smem_chunk(kk, ntl, lane)]++;
  }
  for (int s = 0; s < 512; ++s) CHECK(bhit[s] == 1, "B smem bijective");
  // A warp's LDS.128: 32 consecutive chunks (4 conflict-free phases of 8).
  for (int kk = 0; kk < 8; ++kk)
    for (int wn = 0; wn < 2; ++wn)
      for (int lane = 1; lane < 32; ++lane)
        CHECK(int4_gemm_b_smem_chunk(kk, wn, lane) == int4_gemm_b_smem_chunk(kk, wn, 0) + lane,
              "B warp read contiguous");
  // Scales / zeros: 8 groups x 128 columns, each element loaded once.
  std::vector<int> shit(8 * 128, 0), zhit(8 * 128, 0);
  for (int c = 0; c < 256; ++c)
    for (int e = 0; e < 4; ++e) {
      int gi, col;
      int4_gemm_s_load_coords(c, &gi, &col);
      shit[int4_gemm_sz_smem_index(gi, col + e)]++;
    }
  for (int c = 0; c < 64; ++c)
    for (int e = 0; e < 16; ++e) {
      int gi, col;
      int4_gemm_z_load_coords(c, &gi, &col);
      zhit[int4_gemm_sz_smem_index(gi, col + e)]++;
    }
  for (int i = 0; i < 8 * 128; ++i) CHECK(shit[i] == 1 && zhit[i] == 1, "scale/zero smem %d", i);
  // C fragments cover the 16 x 64 warp tile once.
  std::vector<int> chit(16 * 64, 0);
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 8; ++j)
      for (int i = 0; i < 4; ++i) {
        int row, col;
        int4_gemm_c_coords(lane, j, i, &row, &col);
        chit[row * 64 + col]++;
        CHECK(col / 8 == j, "C column in block j");
      }
  for (int i = 0; i < 16 * 64; ++i) CHECK(chit[i] == 1, "C coverage");
  // Split-K ranges: contiguous, covering, balanced, none empty for S <= T.
  for (int64_t T = 0; T < 70; ++T)
    for (int S = 1; S <= 66; ++S) {
      int64_t prev = 0, mn = T + 1, mx = -1;
      for (int s = 0; s < S; ++s) {
        int64_t b, e;
        int4_gemm_split_range(T, S, s, &b, &e);
        CHECK(b == prev && e >= b, "split contiguous T=%lld S=%d", (long long)T, S);
        prev = e;
        mn = std::min(mn, e - b);
        mx = std::max(mx, e - b);
      }
      CHECK(prev == T && mx - mn <= 1 && (S > T || mn >= 1), "split cover T=%lld S=%d",
            (long long)T, S);
    }
  // Split heuristic: M = 1 decode on an H100 (132 SMs), Llama-3-8B shapes.
  CHECK(int4_gemm_cuda_splits(1, 4096, 4096, 132) == 4, "splits 4096x4096: %d",
        int4_gemm_cuda_splits(1, 4096, 4096, 132));
  CHECK(int4_gemm_cuda_splits(1, 4096, 14336, 132) == 1, "splits 4096x14336");
  CHECK(int4_gemm_cuda_splits(1, 14336, 4096, 132) == 4, "splits 14336x4096");
  CHECK(int4_gemm_cuda_splits(1, 4096, 1, 132) == 16, "splits N=1: %d",
        int4_gemm_cuda_splits(1, 4096, 1, 132));
  CHECK(int4_gemm_cuda_splits(64, 256, 64, 132) == 1, "splits few stages");
  CHECK(int4_gemm_cuda_splits(1, 1 << 20, 1, 132) == 64, "splits cap");
  for (int64_t M : {1, 7, 16, 33, 64, 65, 300})
    for (int64_t Kp : {0, 16, 512, 4096, 12288})
      for (int64_t N : {1, 65, 4095}) {
        const int S = int4_gemm_cuda_splits(M, Kp, N, 132);
        const int64_t stages = (Kp / 16 + 7) / 8;
        CHECK(S >= 1 && (S == 1 || S <= stages / 2), "splits range");
        Int4GemmCudaParams p;
        p.M = M;
        p.Kp = Kp;
        p.N = N;
        p.num_sms = 132;
        const size_t want = (S > 1 ? size_t(S) * M * ((N + 63) / 64 * 64) * 4 : 0);
        CHECK(int4_gemm_cuda_workspace_size(p) == want, "workspace");
        int32_t perm_dummy = 0;
        p.perm = &perm_dummy;
        CHECK(int4_gemm_cuda_workspace_size(p) == want + (size_t(M * Kp * 2) + 255) / 256 * 256,
              "workspace with perm");
      }
}

// ---------------------------------------------------------------------------------------------
// 3. the kernel, emulated
// ---------------------------------------------------------------------------------------------

// PTX ISA, mma.m16n8k16 (.f16 / .bf16) fragments, g = lane / 4, t = lane % 4:
//   A (row): a{2r}, a{2r+1} of register r = (row g + 8 (r % 2), col 2t + 8 (r / 2)) and col + 1
//   B (col): b0, b1 (reg 0) = rows 2t, 2t + 1 of column g; b2, b3 (reg 1) = rows 2t + 8, 2t + 9
//   C/D:     c0, c1 = (g, 2t), (g, 2t + 1); c2, c3 = (g + 8, 2t), (g + 8, 2t + 1)
template <DType T>
void emulate_mma(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], float (&c)[32][4]) {
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h)
        A[g + 8 * (r % 2)][2 * t + 8 * (r / 2) + h] = hf<T>(a[l][r] >> (16 * h));
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) B[2 * t + 8 * r + h][g] = hf<T>(b[l][r] >> (16 * h));
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      float s = c[l][i];
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      c[l][i] = s;
    }
  }
}

struct Problem {
  int64_t M, K, N, G;  // K = Kp (a multiple of 16)
  int splits;
  bool zeros;
  int pad = -1;   // act-order: x has Kp - pad columns, perm has pad padding rows; -1: no perm
  int bias = -1;  // the bias dtype (a DType value), -1: no bias
  bool bad_perm = false;  // one perm value = K (outside [-1, K)): every output must be NaN
};

template <DType T>
void test_kernel_emulation(const Problem& pr, std::mt19937& rng) {
  const int64_t M = pr.M, Kp = pr.K, N = pr.N, G = pr.G, KT = Kp / 16;
  const int64_t Nt = (N + 63) / 64, Np = 64 * Nt, tpg = KT / G;
  const int MT = int4_gemm_cuda_m_tiles(M), BM = 16 * MT;
  const int S = pr.splits;
  const int64_t stages = (KT + 7) / 8;
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  // Inputs: x [M, K] half bits (row stride K + 5 with act-order), q [Kp, Np] (0 past N),
  // scales / zeros [G, Np], perm [Kp], bias [N].
  const bool act = pr.pad >= 0;
  const int64_t K = act ? Kp - pr.pad : Kp, xs_stride = act ? K + 5 : Kp;
  std::vector<uint16_t> xs(M * xs_stride);
  for (auto& v : xs) v = uint16_t(int4_mma_float_to_half<T>(u(rng)));
  std::vector<int32_t> perm(Kp);
  for (int64_t k = 0; k < Kp; ++k) perm[k] = k < K ? int32_t(k) : -1;
  if (act) std::shuffle(perm.begin(), perm.end(), rng);
  if (pr.bad_perm) perm[Kp / 3] = int32_t(K);
  // x_perm: the gather kernel's loop body (int4_gemm_gather_kernel) for every (m, k).
  std::vector<uint16_t> x(M * Kp);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < Kp; ++k)
      x[m * Kp + k] =
          act ? int4_gemm_gather_value(&xs[m * xs_stride], K, perm[k], int4_mma_nan_bits<T>())
              : xs[m * Kp + k];
  const DType bias_dtype = pr.bias >= 0 ? DType(pr.bias) : DType::kFloat32;
  std::vector<uint8_t> bias_raw(N * 4);
  for (int64_t n = 0; n < N; ++n) {
    const float b = 4.f * u(rng);
    if (bias_dtype == DType::kFloat32) {
      std::memcpy(&bias_raw[4 * n], &b, 4);
    } else {
      const uint16_t h =
          uint16_t(bias_dtype == DType::kFloat16 ? float_to_half_bits(b) : float_to_bf16_bits(b));
      std::memcpy(&bias_raw[2 * n], &h, 2);
    }
  }
  const void* bias = pr.bias >= 0 ? bias_raw.data() : nullptr;
  std::vector<uint8_t> q(Kp * Np, 0), zeros(G * Np, 0);
  std::vector<float> scales(G * Np, 0.f);
  for (int64_t k = 0; k < Kp; ++k)
    for (int64_t n = 0; n < N; ++n) q[k * Np + n] = uint8_t(rng() % 16);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t n = 0; n < N; ++n) {
      scales[g * Np + n] = 0.002f + 0.02f * std::fabs(u(rng));
      zeros[g * Np + n] = pr.zeros ? uint8_t(rng() % 16) : uint8_t(8);
    }
  // Pack: every (k, n) through int4_mma_locate.
  std::vector<uint32_t> qw(KT * Nt * 128, 0);
  for (int64_t k = 0; k < Kp; ++k)
    for (int64_t n = 0; n < Np; ++n) {
      int lane, w, v;
      int4_mma_locate(int(k % 16), int(n % 64), &lane, &w, &v);
      qw[int4_mma_word_index(k / 16, n / 64, lane, w, Nt)] |= uint32_t(q[k * Np + n])
                                                              << (4 * int4_mma_nibble_of_value(v));
    }
  // Reference: W = round((q - z) * s_h), y[m] = sum_k x[m, perm[k]] W[k] in double (padding
  // rows contribute nothing), read from x itself, not from the emulated gather.
  std::vector<double> ref(M * N, 0.0);
  for (int64_t k = 0; k < Kp; ++k) {
    const int64_t g = (k / 16) / tpg;
    if (perm[k] < 0) continue;
    for (int64_t n = 0; n < N; ++n) {
      const double sh = hf<T>(int4_mma_scale_bits<T>(scales[g * Np + n]));
      const double w = hf<T>(round_half<T>((int(q[k * Np + n]) - zeros[g * Np + n]) * sh));
      for (int64_t m = 0; m < M; ++m)
        ref[m * N + n] += double(hf<T>(xs[m * xs_stride + perm[k] % (K > 0 ? K : 1)])) * w;
    }
  }

  const float kPoison = std::nanf("");
  std::vector<float> partials(size_t(S) * M * Np, kPoison), out(M * N, kPoison);
  std::vector<uint16_t> out_h(M * N, 0xFFFF);  // the rounded output (0xFFFF: NaN, unwritten)
  const int64_t n_blocks = (Nt + 1) / 2, m_blocks = (M + BM - 1) / BM;
  // One stage slot of shared memory.
  std::vector<uint16_t> sA(BM * 128);
  std::vector<uint32_t> sB(512 * 4);
  std::vector<float> sS(8 * 128);
  std::vector<uint8_t> sZ(8 * 128);

  for (int split = 0; split < S; ++split)
    for (int64_t mb = 0; mb < m_blocks; ++mb)
      for (int64_t nb = 0; nb < n_blocks; ++nb) {
        const int64_t m0 = mb * BM;
        int64_t sb, se;
        int4_gemm_split_range(stages, S, split, &sb, &se);
        // acc[warp][mi][j][lane][i]
        std::vector<float> acc(8 * MT * 8 * 32 * 4, 0.f);
        auto ACC = [&](int warp, int mi, int j, int lane, int i) -> float& {
          return acc[(((warp * MT + mi) * 8 + j) * 32 + lane) * 4 + i];
        };
        int cur_g[8];
        uint32_t s2[8][32][8], z2[8][32][8];
        for (int w = 0; w < 8; ++w) cur_g[w] = -1;
        for (int64_t st = sb; st < se; ++st) {
          // Loader (the kernel's load_stage), poisoned smem first.
          std::fill(sA.begin(), sA.end(), uint16_t(0x7FFF));
          std::fill(sB.begin(), sB.end(), 0xDEADBEEFu);
          std::fill(sS.begin(), sS.end(), kPoison);
          std::fill(sZ.begin(), sZ.end(), uint8_t(0xEE));
          const int64_t kt0 = st * 8;
          const int g0 = int4_gemm_group_of_ktile(kt0, tpg);
          const int64_t kt_last = std::min<int64_t>(kt0 + 7, KT - 1);
          const int ng = int4_gemm_group_of_ktile(kt_last, tpg) - g0 + 1;
          CHECK(ng >= 1 && ng <= 8, "groups per stage");
          const int64_t col0 = nb * 128;
          for (int tid = 0; tid < 256; ++tid) {
            for (int j = 0; j < 2; ++j) {
              int kk, ntl, ln;
              int4_gemm_b_load_coords(tid + 256 * j, &kk, &ntl, &ln);
              const int64_t kt = kt0 + kk, nt = nb * 2 + ntl;
              const bool valid = kt < KT && nt < Nt;
              for (int e = 0; e < 4; ++e)
                sB[int4_gemm_b_smem_chunk(kk, ntl, ln) * 4 + e] =
                    valid ? qw[int4_mma_word_index(kt, nt, ln, 0, Nt) + e] : 0u;
            }
            for (int j = 0; j < MT; ++j) {
              int row, ch;
              int4_gemm_a_load_coords(tid + 256 * j, &row, &ch);
              const int64_t m = m0 + row, kt = kt0 + (ch >> 1);
              const bool valid = m < M && kt < KT;
              for (int e = 0; e < 8; ++e)
                sA[int4_gemm_a_smem_chunk(row, ch) * 8 + e] =
                    valid ? x[m * Kp + kt0 * 16 + 8 * ch + e] : uint16_t(0);
            }
            if (tid < 32 * ng) {
              int gi, col;
              int4_gemm_s_load_coords(tid, &gi, &col);
              const bool valid = col0 + col < Np;
              for (int e = 0; e < 4; ++e)
                sS[int4_gemm_sz_smem_index(gi, col) + e] =
                    valid ? scales[(g0 + gi) * Np + col0 + col + e] : 0.f;
            }
            if (pr.zeros && tid < 8 * ng) {
              int gi, col;
              int4_gemm_z_load_coords(tid, &gi, &col);
              const bool valid = col0 + col < Np;
              for (int e = 0; e < 16; ++e)
                sZ[int4_gemm_sz_smem_index(gi, col) + e] =
                    valid ? zeros[(g0 + gi) * Np + col0 + col + e] : uint8_t(0);
            }
          }
          // Compute (the kernel's compute_stage), warp by warp.
          for (int warp = 0; warp < 8; ++warp) {
            const int wn = warp % 2, wk = warp / 2;
            if (nb * 2 + wn >= Nt) continue;
            for (int r = 0; r < 2; ++r) {
              const int kk = wk + 4 * r;
              const int64_t kt = kt0 + kk;
              if (kt >= KT) continue;
              const int g = int4_gemm_group_of_ktile(kt, tpg);
              if (g != cur_g[warp]) {
                cur_g[warp] = g;
                for (int lane = 0; lane < 32; ++lane)
                  for (int j = 0; j < 8; ++j) {
                    const int col =
                        int4_gemm_sz_smem_index(g - g0, wn * 64 + int4_gemm_b_col(lane, j));
                    s2[warp][lane][j] = int4_mma_scale_pair<T>(sS[col]);
                    z2[warp][lane][j] = int4_mma_zero_pair<T>(pr.zeros ? sZ[col] : 8u);
                  }
              }
              for (int mi = 0; mi < MT; ++mi) {
                // ldmatrix.x4: lane 8i + r gives row r of matrix i; lane l receives, for each
                // matrix i, elements 2 (l % 4), +1 of row l / 4 (PTX ISA, ldmatrix).
                int addr[32];
                for (int l = 0; l < 32; ++l) {
                  int row, ch;
                  int4_gemm_a_ldmatrix_coords(l, kk, &row, &ch);
                  addr[l] = int4_gemm_a_smem_chunk(16 * mi + row, ch);
                }
                uint32_t a[32][4];
                for (int l = 0; l < 32; ++l)
                  for (int i = 0; i < 4; ++i) {
                    const int base = addr[8 * i + l / 4] * 8 + 2 * (l % 4);
                    a[l][i] = uint32_t(sA[base]) | uint32_t(sA[base + 1]) << 16;
                  }
                for (int w = 0; w < 4; ++w)
                  for (int hb = 0; hb < 2; ++hb) {
                    const int j = int4_mma_block_of_reg(w, 2 * hb);
                    uint32_t b[32][2];
                    float c[32][4];
                    for (int l = 0; l < 32; ++l) {
                      const uint32_t word = sB[int4_gemm_b_smem_chunk(kk, wn, l) * 4 + w];
                      for (int h = 0; h < 2; ++h) {
                        const int p = 2 * hb + h;
                        b[l][int4_mma_half_of_reg(p)] = int4_mma_sub_mul<T>(
                            int4_mma_offset_pair<T>(word, p), z2[warp][l][j], s2[warp][l][j]);
                      }
                      for (int i = 0; i < 4; ++i) c[l][i] = ACC(warp, mi, j, l, i);
                    }
                    emulate_mma<T>(a, b, c);
                    for (int l = 0; l < 32; ++l)
                      for (int i = 0; i < 4; ++i) ACC(warp, mi, j, l, i) = c[l][i];
                  }
              }
            }
          }
        }
        // k-warp reduction in the kernel's order: wk 2, 3 into 0, 1, then 1 into 0.
        for (int wn = 0; wn < 2; ++wn) {
          const int w0 = wn, w1 = 2 + wn, w2 = 4 + wn, w3 = 6 + wn;
          for (int mi = 0; mi < MT; ++mi)
            for (int j = 0; j < 8; ++j)
              for (int l = 0; l < 32; ++l)
                for (int i = 0; i < 4; ++i) {
                  ACC(w0, mi, j, l, i) += ACC(w2, mi, j, l, i);
                  ACC(w1, mi, j, l, i) += ACC(w3, mi, j, l, i);
                  ACC(w0, mi, j, l, i) += ACC(w1, mi, j, l, i);
                }
          const int64_t nt = nb * 2 + wn;
          if (nt >= Nt) continue;
          for (int mi = 0; mi < MT; ++mi)
            for (int j = 0; j < 8; ++j)
              for (int l = 0; l < 32; ++l)
                for (int i = 0; i < 4; ++i) {
                  int row, col;
                  int4_gemm_c_coords(l, j, i, &row, &col);
                  const int64_t m = m0 + 16 * mi + row, n = nt * 64 + col;
                  if (m >= M || n >= N) continue;
                  float& dst = S == 1 ? out[m * N + n] : partials[(split * M + m) * Np + n];
                  CHECK(std::isnan(dst), "element (%lld, %lld) stored twice", (long long)m,
                        (long long)n);
                  dst = ACC(w0, mi, j, l, i);
                  if (S == 1) out_h[m * N + n] = int4_gemm_epilogue<T>(dst, bias, bias_dtype, n);
                }
        }
      }
  if (S > 1) {  // the reduction kernel: splits in order
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float v = 0.f;
        for (int s = 0; s < S; ++s) v += partials[(s * M + m) * Np + n];
        out[m * N + n] = v;
        out_h[m * N + n] = int4_gemm_epilogue<T>(v, bias, bias_dtype, n);
      }
  }
  if (pr.bad_perm) {  // x_perm's column Kp / 3 is NaN: so is every output
    int finite = 0;
    for (int64_t i = 0; i < M * N; ++i) finite += !std::isnan(hf<T>(out_h[i]));
    CHECK(finite == 0, "%s bad perm value: %d finite outputs of %lld", tname<T>(), finite,
          (long long)(M * N));
    return;
  }
  double num = 0, den = 0;
  int bad = 0;
  for (int64_t i = 0; i < M * N; ++i) {
    if (std::isnan(out[i])) ++bad;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  const double rel = std::sqrt(num / std::max(den, 1e-300));
  CHECK(bad == 0 && rel < 1e-6,
        "%s emulated GEMM M=%lld K=%lld N=%lld G=%lld S=%d zeros=%d pad=%d: "
        "%d unwritten, rel err %g",
        tname<T>(), (long long)M, (long long)Kp, (long long)N, (long long)G, S, int(pr.zeros),
        pr.pad, bad, rel);
  // Epilogue: bias added to the fp32 sum, one round-to-nearest-even to T; against the double
  // reference plus the bias, the rounded output is within T's rounding (2^-11 fp16, 2^-8 bf16).
  int wrong_bits = 0;
  double num_h = 0, den_h = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const float b = bias != nullptr ? load_as_float(bias, bias_dtype, n) : 0.f;
      const float sum = bias != nullptr ? out[m * N + n] + b : out[m * N + n];
      wrong_bits += out_h[m * N + n] != round_half<T>(double(sum));
      const double e = double(hf<T>(out_h[m * N + n])) - (ref[m * N + n] + double(b));
      num_h += e * e;
      den_h += (ref[m * N + n] + double(b)) * (ref[m * N + n] + double(b));
    }
  const double rel_h = std::sqrt(num_h / std::max(den_h, 1e-300));
  CHECK(wrong_bits == 0 && rel_h < (T == DType::kFloat16 ? 6e-4 : 5e-3),
        "%s epilogue M=%lld N=%lld S=%d bias=%d: %d outputs not round(sum + bias), rel err %g",
        tname<T>(), (long long)M, (long long)N, S, pr.bias, wrong_bits, rel_h);
}

// ---------------------------------------------------------------------------------------------
// 4. argument checks
// ---------------------------------------------------------------------------------------------

void test_checks() {
  alignas(256) static int32_t qw[4 * 128];
  alignas(256) static float sc[64];
  alignas(256) static uint16_t x[64], out[64];
  alignas(256) static unsigned char ws[1 << 16];
  Int4GemmCudaParams p;
  p.x = x;
  p.x_dtype = DType::kFloat16;
  p.x_row_stride = 64;
  p.M = 1;
  p.K = 64;
  p.qweight = qw;
  p.scales = sc;
  p.Kp = 64;
  p.G = 1;
  p.N = 64;
  p.out = out;
  p.out_row_stride = 64;
  p.num_sms = 132;
  p.workspace = ws;
  p.workspace_bytes = sizeof(ws);
#if defined(BITPRESS_WITH_CUDA)
  const Status bad = Status::kInvalidArgument;
  auto with = [&](auto f) {
    Int4GemmCudaParams q = p;
    f(q);
    return int4_gemm_cuda(q, nullptr);
  };
  CHECK(with([](Int4GemmCudaParams& q) { q.x_dtype = DType::kFloat32; }) == bad, "fp32 x");
  CHECK(with([](Int4GemmCudaParams& q) { q.K = 48; }) == bad, "K != Kp without perm");
  CHECK(with([](Int4GemmCudaParams& q) { q.Kp = 56; }) == bad, "Kp %% 16");
  CHECK(with([](Int4GemmCudaParams& q) { q.G = 3; }) == bad, "KT %% G");
  CHECK(with([](Int4GemmCudaParams& q) { q.num_sms = 0; }) == bad, "num_sms");
  CHECK(with([](Int4GemmCudaParams& q) {
          q.x_row_stride = 60;
          q.M = 2;
        }) == bad,
        "x stride");
  CHECK(with([](Int4GemmCudaParams& q) { q.x = x + 1; }) == bad, "x alignment");
  CHECK(with([](Int4GemmCudaParams& q) { q.qweight = qw + 1; }) == bad, "qweight alignment");
  CHECK(with([](Int4GemmCudaParams& q) { q.out_row_stride = 32; }) == bad, "out stride");
  CHECK(with([](Int4GemmCudaParams& q) {
          q.Kp = 4096;
          q.K = 4096;
          q.G = 1;
          q.workspace_bytes = 0;
        }) == bad,
        "workspace too small");
  CHECK(with([](Int4GemmCudaParams& q) { q.M = 0; }) == Status::kSuccess, "M = 0: nothing to do");
  CHECK(with([](Int4GemmCudaParams& q) { q.N = 0; }) == Status::kSuccess, "N = 0: nothing to do");
  Int4GemmDequantizeCudaParams d;
  d.K = 48;
  d.Kp = 64;
  CHECK(int4_gemm_dequantize_cuda(d, nullptr) == bad, "dequantize K != Kp without perm");
#else
  CHECK(int4_gemm_cuda(p, nullptr) == Status::kUnsupported, "CPU-only build");
  CHECK(int4_gemm_dequantize_cuda(Int4GemmDequantizeCudaParams{}, nullptr) == Status::kUnsupported,
        "CPU-only build");
#endif
}

}  // namespace

int main() {
  test_dequant<DType::kFloat16>();
  test_dequant<DType::kBFloat16>();
  test_indices();
  std::mt19937 rng(3);
  const Problem problems[] = {
      // M, Kp, N, G, splits, zeros
      {1, 64, 64, 1, 1, false},     // one partial stage, one n-tile, MT = 1
      {5, 224, 150, 7, 1, true},    // KT = 14 (last stage partial), tpg 2, odd n-tile count
      {20, 256, 130, 16, 2, true},  // MT = 2, groups of one k-tile (8 per stage), split-K
      {37, 384, 64, 3, 3, false},   // MT = 4, tpg 8 (one group per stage), 3 splits
      {70, 208, 257, 13, 1, true},  // two m-blocks, N % 64 = 1
      // Groups straddling stages (8 k-tiles) and split boundaries: tiles per group 3, 5, 16.
      {3, 16 * 3 * 7, 70, 7, 3, true, -1, int(DType::kFloat16)},       // tpg 3, KT 21, S 3
      {17, 16 * 5 * 5, 64, 5, 2, true, -1, int(DType::kFloat32)},      // tpg 5, KT 25, MT 2
      {40, 16 * 16 * 3, 130, 3, 1, false, -1, int(DType::kBFloat16)},  // tpg 16, MT 4
      {1, 16 * 16 * 4, 64, 4, 4, true},  // tpg 16 (2 stages per group), 4 splits of 2 stages
      // Act-order: x_perm gathered from x with padding rows; bias; split-K and direct.
      {5, 16 * 5 * 4, 100, 4, 2, true, 13, int(DType::kBFloat16)},
      {33, 16 * 3 * 8, 64, 8, 1, true, 5, int(DType::kFloat32)},
      {2, 256, 65, 2, 1, true, 7, -1, true},                     // perm value K: NaN outputs
      {2, 256, 65, 2, 3, false, 0, int(DType::kFloat16), true},  // the same through split-K
  };
  for (const Problem& pr : problems) {
    test_kernel_emulation<DType::kFloat16>(pr, rng);
    test_kernel_emulation<DType::kBFloat16>(pr, rng);
  }
  test_checks();
  return check_result("test_int4_mma");
}
