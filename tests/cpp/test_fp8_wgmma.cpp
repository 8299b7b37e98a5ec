// Host tests of the sm_90a fp8_gemm (csrc/fp8/fp8_gemm_sm90a.cu) without a GPU:
//   1. the index maps of bitpress/fp8/fp8_wgmma_layout.h: the 128-byte swizzle (a permutation of
//      each 1024-byte atom that keeps rows, conflict-free for the loaders), the loader map (every
//      chunk of a tile copied once, coalesced), the wgmma descriptor fields, and the accumulator
//      fragment map against the PTX ISA figure written out here independently;
//   2. the whole kernel emulated block by block and warpgroup by warpgroup: the cp.async loaders
//      through the same helpers into a byte image of shared memory (ring of stages, zero-fill past
//      M, N, K), wgmma modelled as the hardware reads it (the descriptor decoded here, the
//      canonical K-major 128-byte-swizzled layout of the PTX ISA applied to the computed address),
//      E4M3 decoded from its bit definition, the promotion every 128 K with block scales, the
//      epilogue from the fragment map, split-K partials and their reduction; compared with a
//      float64 reference on odd M, N, K for every scale mode and output dtype;
//   3. why the promotion is there: a model of the tensor core's reduced-precision running sum
//      (~14 mantissa bits, DeepSeek-V3 §3.3.2) drifts over a 4096-long chain, and not over chains
//      of 128 promoted in fp32;
//   4. the split heuristic, the workspace size and the argument checks of fp8_gemm_cuda.
#include <bitpress/common/dtype.h>
#include <bitpress/fp8/fp8_gemm_cuda.h>
#include <bitpress/fp8/fp8_wgmma_layout.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "check.h"

using namespace bitpress;

namespace {

// ---------------------------------------------------------------------------------------------
// E4M3 (float8_e4m3fn) from its definition: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits;
// exponent 0 is subnormal (m / 8 * 2^-6); S.1111.111 is NaN; no infinities.
// ---------------------------------------------------------------------------------------------
double e4m3_value(uint8_t v) {
  const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  if (e == 15 && m == 7) return NAN;
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -mag : mag;
}

// A random finite E4M3 byte with a magnitude in [2^-4, 448] or zero (products stay normal floats).
uint8_t random_e4m3(std::mt19937& rng) {
  for (;;) {
    const uint8_t v = uint8_t(rng());
    const int e = (v >> 3) & 15;
    if ((e == 15 && (v & 7) == 7) || (e != 0 && e < 3)) continue;
    if (e == 0 && (v & 7) != 0) continue;
    return v;
  }
}

// ---------------------------------------------------------------------------------------------
// 1. Index maps
// ---------------------------------------------------------------------------------------------

void test_swizzle() {
  std::set<uint32_t> seen;
  for (uint32_t o = 0; o < 1024; ++o) {
    const uint32_t s = fp8_swizzle128(o);
    CHECK(s < 1024 && (s >> 7) == (o >> 7), "row kept: %u -> %u", o, s);
    CHECK((s & 15) == (o & 15), "bytes inside a chunk kept: %u -> %u", o, s);
    seen.insert(s);
  }
  CHECK(seen.size() == 1024, "swizzle is a permutation of the atom (%zu)", seen.size());
  // The 8 rows of one K chunk land in 8 distinct 16-byte bank groups (wgmma and the loaders read
  // / write a column of chunks without conflicts).
  for (int chunk = 0; chunk < 8; ++chunk) {
    std::set<uint32_t> groups;
    for (int row = 0; row < 8; ++row) groups.insert((fp8_tile_offset(row, 16 * chunk) % 128) / 16);
    CHECK(groups.size() == 8, "chunk %d: %zu bank groups", chunk, groups.size());
  }
}

void test_loader_map() {
  for (int threads : {128, 256}) {
    for (int rows : {64, 128}) {
      const int rounds = rows * 8 / threads;
      std::vector<int> hits(rows * 8, 0);
      std::set<uint32_t> dst;
      for (int r = 0; r < rounds; ++r) {
        for (int t = 0; t < threads; ++t) {
          const Fp8LoadChunk c = fp8_load_chunk(t, r, threads);
          CHECK(c.row < rows && c.chunk < 8, "in the tile");
          hits[c.row * 8 + c.chunk]++;
          CHECK(c.smem == fp8_tile_offset(c.row, 16 * c.chunk), "destination");
          dst.insert(c.smem);
          // Coalescing: the 8 threads of an aligned group of 8 read one 128-byte row in order.
          if (t % 8 != 0) {
            const Fp8LoadChunk p = fp8_load_chunk(t - 1, r, threads);
            CHECK(p.row == c.row && p.chunk + 1 == c.chunk, "coalesced");
          }
        }
      }
      CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }),
            "each chunk copied once (threads %d rows %d)", threads, rows);
      CHECK(int(dst.size()) == rows * 8, "distinct destinations");
    }
  }
}

// The descriptor as the hardware decodes it (PTX ISA, matrix descriptor format).
struct Desc {
  uint32_t start, lbo, sbo, base_offset, swizzle;
};
Desc decode_desc(uint64_t d) {
  return {uint32_t(d & 0x3FFF) << 4, uint32_t((d >> 16) & 0x3FFF) << 4,
          uint32_t((d >> 32) & 0x3FFF) << 4, uint32_t((d >> 49) & 7), uint32_t(d >> 62)};
}

// Byte address wgmma reads for element (row, k) (k < 32 bytes: one k32 step of E4M3) of a K-major
// operand in the 128-byte swizzle mode: the canonical layout ((8, m), (T, 2)) : ((8T, SBO), (1,
// T)) in units of 16-byte T, i.e. row r at (r / 8) SBO + (r % 8) 128 bytes from the start, K
// contiguous; then the swizzle (address bits [4, 7) ^= bits [7, 10)) on the full address.
uint32_t wgmma_kmajor_sw128_address(uint64_t desc, int row, int k) {
  const Desc d = decode_desc(desc);
  const uint32_t addr = d.start + uint32_t(row / 8) * d.sbo + uint32_t(row % 8) * 128 + uint32_t(k);
  return addr ^ (((addr >> 7) & 7) << 4);
}

void test_descriptor() {
  const uint32_t base = 0x1c00 * 8;  // 1024-aligned
  for (int ks = 0; ks < 4; ++ks) {
    for (int row0 : {0, 64}) {
      const Desc d = decode_desc(fp8_tile_desc(base, row0, ks));
      CHECK(d.swizzle == 1 && d.sbo == 1024 && d.lbo == 16 && d.base_offset == 0, "fields");
      CHECK(d.start == base + 128 * row0 + 32 * ks, "start %u", d.start);
      // Every element of the k32 step the instruction reads is where the loaders put it.
      for (int r = 0; r < 64; ++r) {
        for (int k = 0; k < 32; ++k) {
          const uint32_t hw = wgmma_kmajor_sw128_address(fp8_tile_desc(base, row0, ks), r, k);
          CHECK(hw == base + fp8_tile_offset(row0 + r, 32 * ks + k), "ks %d row %d k %d", ks, r, k);
        }
      }
    }
  }
}

// The accumulator fragment as the PTX ISA figure draws it ("WGMMA .m64nNk32 register fragment
// layout for accumulator matrix D"): warp w covers rows 16w..16w+15; in each 8-column block i,
// lane l holds (row l/4, columns 2(l%4), +1) in d[4i], d[4i+1] and the same 8 rows lower in
// d[4i+2], d[4i+3].
Fp8AccCoord ptx_acc_coord(int thread, int reg) {
  const int warp = thread / 32, lane = thread % 32, block = reg / 4, pos = reg % 4;
  const int row = 16 * warp + lane / 4 + (pos >= 2 ? 8 : 0);
  const int col = 8 * block + 2 * (lane % 4) + (pos % 2);
  return {row, col};
}

void test_acc_fragment() {
  std::vector<int> hits(64 * 128, 0);
  for (int t = 0; t < 128; ++t) {
    for (int r = 0; r < 64; ++r) {
      const Fp8AccCoord c = fp8_wgmma_acc_coord(t, r), e = ptx_acc_coord(t, r);
      CHECK(c.row == e.row && c.col == e.col, "t %d r %d", t, r);
      CHECK(c.row == fp8_wgmma_acc_row(t, (r >> 1) & 1), "row helper t %d r %d", t, r);
      hits[c.row * 128 + c.col]++;
    }
  }
  CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }), "bijective");
}

// ---------------------------------------------------------------------------------------------
// 2. The kernel, emulated
// ---------------------------------------------------------------------------------------------

struct Problem {
  int64_t M, N, K;
  Fp8ScaleMode ma, mb;
  DType out;
  bool bias;
  int num_sms;
};

int64_t scale_count(Fp8ScaleMode m, int64_t rows, int64_t KB, bool is_b) {
  if (m == Fp8ScaleMode::kTensor) return 1;
  if (m == Fp8ScaleMode::kRow) return rows;
  return (is_b ? (rows + 127) / 128 : rows) * KB;
}

// Scale of operand row `row` for K block kb, from the contract (bitpress/fp8/fp8_gemm_cuda.h).
double scale_of(const std::vector<float>& s, Fp8ScaleMode m, int64_t row, int64_t kb, int64_t KB,
                bool is_b) {
  if (m == Fp8ScaleMode::kTensor) return s[0];
  if (m == Fp8ScaleMode::kRow) return s[row];
  return s[(is_b ? row / 128 : row) * KB + kb];
}

float round_to(DType t, float v) {
  if (t == DType::kBFloat16) return bf16_bits_to_float(float_to_bf16_bits(v));
  if (t == DType::kFloat16) return half_bits_to_float(float_to_half_bits(v));
  return v;
}

// What sm90_e4m3_fp8_gemm_kernel<kWG, out> computes, thread by thread. Returns out [M, N] as
// floats (rounded to the output dtype), NaN where nothing was written.
std::vector<float> emulate(const Problem& pr, const std::vector<uint8_t>& a,
                           const std::vector<uint8_t>& b, const std::vector<float>& sa,
                           const std::vector<float>& sb, const std::vector<float>& bias) {
  const int64_t M = pr.M, N = pr.N, K = pr.K;
  const int S = fp8_gemm_cuda_splits(M, N, K, pr.num_sms);
  const int BM = fp8_gemm_cuda_block_m(M), WG = BM / 64, threads = 128 * WG;
  const int stages = WG == 2 ? 4 : 6;  // Fp8TileConfig<kWG>::kStages
  const int a_bytes = BM * 128, stage_bytes = a_bytes + 128 * 128;
  const int64_t KT = (K + 127) / 128;
  std::vector<float> out(size_t(M * N), NAN), ws(size_t(S) * M * N, NAN);
  const uint32_t base = 4096;  // shared-window address of the aligned ring (1024-aligned)
  std::vector<uint8_t> smem(base + size_t(stages) * stage_bytes, 0xEE);  // stale bytes
  double lut[256];  // e4m3_value of every byte (the stale 0xEE included: -256)
  for (int v = 0; v < 256; ++v) lut[v] = e4m3_value(uint8_t(v));

  const int64_t tiles_m = (M + BM - 1) / BM, tiles_n = (N + 127) / 128;
  std::vector<int> tile_hits(size_t(tiles_m * tiles_n), 0);
  for (int64_t block = 0; block < tiles_m * tiles_n; ++block) {  // blockIdx.x
    const Fp8TileIndex tile = fp8_gemm_tile_of_block(block, tiles_m, tiles_n);
    tile_hits[size_t(tile.m * tiles_n + tile.n)]++;
    {
      for (int split = 0; split < S; ++split) {  // blockIdx.z
        const int64_t m0 = tile.m * BM, n0 = tile.n * 128;
        const int64_t kt0 = fp8_gemm_split_begin(KT, split, S);
        const int n_kt = int(fp8_gemm_split_begin(KT, split + 1, S) - kt0);
        auto load_tile = [&](uint32_t tile, const std::vector<uint8_t>& src, int64_t row0,
                             int64_t nrows, int64_t k0, int rows) {
          for (int r = 0; r < rows * 8 / threads; ++r) {
            for (int t = 0; t < threads; ++t) {
              const Fp8LoadChunk c = fp8_load_chunk(t, r, threads);
              const int64_t row = row0 + c.row, k = k0 + 16 * c.chunk;
              uint8_t* dst = &smem[tile + c.smem];
              if (row < nrows && k < K) {
                std::memcpy(dst, &src[size_t(row * K + k)], 16);
              } else {
                std::memset(dst, 0, 16);  // cp.async src-size 0
              }
            }
          }
        };
        auto load_stage = [&](int i) {
          const uint32_t st = base + uint32_t(i % stages) * stage_bytes;
          load_tile(st, a, m0, M, (kt0 + i) * 128, BM);
          load_tile(st + a_bytes, b, n0, N, (kt0 + i) * 128, 128);
        };
        std::vector<float> acc(size_t(threads) * 64, 0.f);
        for (int s = 0; s < stages - 1; ++s) {
          if (s < n_kt) load_stage(s);
        }
        for (int i = 0; i < n_kt; ++i) {
          const int64_t kb = kt0 + i;
          // The refill of the slot read in iteration i - 1 (the kernel issues it while this
          // iteration's MMAs run, so it must be another slot than the one they read).
          CHECK((i + stages - 1) % stages != i % stages, "refill slot");
          if (i + stages - 1 < n_kt) load_stage(i + stages - 1);
          const uint32_t st = base + uint32_t(i % stages) * stage_bytes;
          for (int wg = 0; wg < WG; ++wg) {
            for (int t = 0; t < 128; ++t) {
              for (int r = 0; r < 64; ++r) {
                const Fp8AccCoord c = ptx_acc_coord(t, r);
                // 4 chained k32 steps; exact E4M3 products summed (the tensor core's chain).
                double part = 0;
                for (int ks = 0; ks < 4; ++ks) {
                  const uint64_t da = fp8_tile_desc(st, 64 * wg, ks);
                  const uint64_t db = fp8_tile_desc(st + a_bytes, 0, ks);
                  for (int k = 0; k < 32; ++k) {
                    part += lut[smem[wgmma_kmajor_sw128_address(da, c.row, k)]] *
                            lut[smem[wgmma_kmajor_sw128_address(db, c.col, k)]];
                  }
                }
                const int64_t row = m0 + 64 * wg + fp8_wgmma_acc_row(t, (r >> 1) & 1);
                float s = 1.f;
                if (pr.ma == Fp8ScaleMode::kBlock) s = row < M ? sa[size_t(row * KT + kb)] : 0.f;
                if (pr.mb == Fp8ScaleMode::kBlock) s *= sb[size_t((n0 / 128) * KT + kb)];
                float& ac = acc[size_t(wg * 128 + t) * 64 + r];
                ac = std::fma(float(part), s, ac);
              }
            }
          }
        }
        // Epilogue: the pair of adjacent columns a thread holds (acc[r], acc[r + 1]), the second
        // stored only when it is inside N; each element written once.
        for (int wg = 0; wg < WG; ++wg) {
          for (int t = 0; t < 128; ++t) {
            for (int r = 0; r < 64; r += 2) {
              const Fp8AccCoord c = fp8_wgmma_acc_coord(t, r);
              const int64_t row = m0 + 64 * wg + c.row, col = n0 + c.col;
              CHECK(c.col % 2 == 0 && fp8_wgmma_acc_coord(t, r + 1).col == c.col + 1 &&
                        fp8_wgmma_acc_coord(t, r + 1).row == c.row,
                    "pair t %d r %d", t, r);
              if (row >= M || col >= N) continue;
              for (int e = 0; e < 2 && col + e < N; ++e) {
                const float ra = pr.ma == Fp8ScaleMode::kBlock    ? 1.f
                                 : pr.ma == Fp8ScaleMode::kTensor ? sa[0]
                                                                  : sa[size_t(row)];
                const float rb = pr.mb == Fp8ScaleMode::kBlock    ? 1.f
                                 : pr.mb == Fp8ScaleMode::kTensor ? sb[0]
                                                                  : sb[size_t(col + e)];
                const float v = acc[size_t(wg * 128 + t) * 64 + r + e] * ra * rb;
                float* dst = S == 1 ? &out[size_t(row * N + col + e)]
                                    : &ws[(size_t(split) * M + row) * N + col + e];
                CHECK(std::isnan(*dst), "written twice: row %lld col %lld", (long long)row,
                      (long long)(col + e));
                *dst = S == 1 ? round_to(pr.out, pr.bias ? v + bias[size_t(col + e)] : v) : v;
              }
            }
          }
        }
      }
    }
  }
  CHECK(std::all_of(tile_hits.begin(), tile_hits.end(), [](int h) { return h == 1; }),
        "every tile once");
  if (S > 1) {  // sm90_fp8_gemm_reduce_kernel
    for (int64_t i = 0; i < M * N; ++i) {
      float v = 0.f;
      for (int s = 0; s < S; ++s) v += ws[size_t(s * M * N + i)];
      if (pr.bias) v += bias[size_t(i % N)];
      out[size_t(i)] = round_to(pr.out, v);
    }
  }
  return out;
}

void test_kernel(const Problem& pr, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t M = pr.M, N = pr.N, K = pr.K, KB = (K + 127) / 128;
  std::vector<uint8_t> a(size_t(M * K)), b(size_t(N * K));
  for (auto& v : a) v = random_e4m3(rng);
  for (auto& v : b) v = random_e4m3(rng);
  std::uniform_real_distribution<float> us(0.25f, 4.f), ub(-2.f, 2.f);
  std::vector<float> sa(size_t(scale_count(pr.ma, M, KB, false)));
  std::vector<float> sb(size_t(scale_count(pr.mb, N, KB, true)));
  std::vector<float> bias(static_cast<size_t>(N));
  for (auto& v : sa) v = us(rng) / 448.f;
  for (auto& v : sb) v = us(rng) / 448.f;
  for (auto& v : bias) v = ub(rng);

  const std::vector<float> out = emulate(pr, a, b, sa, sb, bias);
  // float64 reference and the magnitude that bounds the fp32 summation error.
  const double tol = pr.out == DType::kBFloat16 ? 1.0 / 256 : pr.out == DType::kFloat16 ? 1e-3 : 0;
  int bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double ref = pr.bias ? bias[size_t(n)] : 0.0, mag = std::fabs(ref);
      for (int64_t k = 0; k < K; ++k) {
        const double t = scale_of(sa, pr.ma, m, k / 128, KB, false) *
                         scale_of(sb, pr.mb, n, k / 128, KB, true) *
                         e4m3_value(a[size_t(m * K + k)]) * e4m3_value(b[size_t(n * K + k)]);
        ref += t;
        mag += std::fabs(t);
      }
      const double got = out[size_t(m * N + n)];
      const double bound = 1e-5 * mag + tol * std::fabs(ref) + 1e-30;
      if (!(std::fabs(got - ref) <= bound) && ++bad <= 5) {
        CHECK(false, "M %lld N %lld K %lld modes %d/%d out %s: [%lld, %lld] got %g ref %g",
              (long long)M, (long long)N, (long long)K, int(pr.ma), int(pr.mb), dtype_name(pr.out),
              (long long)m, (long long)n, got, ref);
      }
    }
  }
  CHECK(bad == 0, "%d mismatches", bad);
}

void test_kernel_shapes() {
  using SM = Fp8ScaleMode;
  const SM modes[3] = {SM::kTensor, SM::kRow, SM::kBlock};
  uint32_t seed = 1;
  // Odd M, N, K: partial M and N tiles, a partial last K tile (K % 128 != 0), both block heights
  // (BM = 64, 128), split-K (few tiles, many SMs) with uneven split lengths, more K tiles than
  // stages (ring reuse).
  const struct {
    int64_t M, N, K;
    int sms;
  } shapes[] = {
      {1, 129, 144, 132},  {7, 200, 784, 132}, {5, 131, 2064, 132}, {64, 128, 128, 132},
      {65, 130, 912, 132}, {130, 257, 400, 4}, {3, 64, 48, 132},
  };
  for (const auto& s : shapes) {
    for (int i = 0; i < 3; ++i) {
      // Same-kind pairs (the torch._scaled_mm recipes), then the mixed pairs the kernel also takes.
      const SM ma = modes[i], mb = modes[(i + seed) % 3];
      const DType out = seed % 3 == 0   ? DType::kFloat32
                        : seed % 3 == 1 ? DType::kBFloat16
                                        : DType::kFloat16;
      test_kernel({s.M, s.N, s.K, ma, ma, out, seed % 2 == 0, s.sms}, seed);
      if (s.M * s.N * s.K < 20000000) {
        test_kernel({s.M, s.N, s.K, ma, mb, DType::kFloat32, seed % 2 == 1, s.sms}, seed + 100);
      }
      ++seed;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Promotion
// ---------------------------------------------------------------------------------------------

// Keep `bits` explicit mantissa bits, truncating (a model of the FP8 tensor core's running sum).
float truncate_mantissa(float v, int bits) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= ~((1u << (23 - bits)) - 1);
  std::memcpy(&v, &u, 4);
  return v;
}

void test_promotion() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int K = 4096;
  double err_chain = 0, err_promoted = 0;
  for (int trial = 0; trial < 16; ++trial) {
    std::vector<double> prod(K);
    double exact = 0;
    for (auto& p : prod) exact += (p = u(rng) * u(rng));
    auto sum = [&](int chain) {
      double total = 0;  // fp32 promotion target (double here: the chain error is the subject)
      for (int k0 = 0; k0 < K; k0 += chain) {
        float run = 0.f;
        for (int k = k0; k < k0 + chain; ++k) run = truncate_mantissa(run + float(prod[k]), 13);
        total += run;
      }
      return total;
    };
    err_chain = std::max(err_chain, std::fabs(sum(K) - exact) / exact);
    err_promoted = std::max(err_promoted, std::fabs(sum(128) - exact) / exact);
  }
  // Truncation biases every addition the same way: the error grows with the chain length.
  CHECK(err_promoted < 1.0 / 256, "promoted every 128: rel err %g", err_promoted);
  CHECK(err_chain > 10 * err_promoted, "one 4096 chain %g vs promoted %g", err_chain, err_promoted);
  std::printf("reduced-precision chain model: rel err %.2e (K = 4096 chain) vs %.2e (128)\n",
              err_chain, err_promoted);
}

// ---------------------------------------------------------------------------------------------
// 4. Schedule and checks
// ---------------------------------------------------------------------------------------------

void test_schedule() {
  // Decode on an H100 (132 SMs), Llama-3-8B shapes: the chosen split count is at least as good as
  // every other under the model, and fills one wave where the tiles alone fill less than half.
  for (int64_t M : {1, 16, 128}) {
    for (int64_t N : {1024, 4096, 6144, 14336}) {
      for (int64_t K : {4096, 14336}) {
        const int S = fp8_gemm_cuda_splits(M, N, K, 132);
        const int64_t kt = K / 128, tiles = (N + 127) / 128;
        CHECK(S >= 1 && S <= 32 && (S == 1 || kt / S >= 2), "M %lld N %lld K %lld S %d",
              (long long)M, (long long)N, (long long)K, S);
        if (tiles * 2 <= 132) {
          CHECK(tiles * S > 66, "N %lld: %lld tiles x %d splits underfill", (long long)N,
                (long long)tiles, S);
        }
      }
    }
  }
  CHECK(fp8_gemm_cuda_splits(1, 4096, 4096, 132) == 4, "32 tiles x 4 = one wave of 128 blocks");
  CHECK(fp8_gemm_cuda_splits(1, 4096, 4096, 132) * 32 <= 132, "no second, near-empty wave");
  // Grouped ordering: a bijection from block indices to tiles, groups of kFp8GroupM tile rows.
  for (int64_t tm : {1, 3, 8, 13, 32}) {
    for (int64_t tn : {1, 5, 112}) {
      std::vector<int> hits(size_t(tm * tn), 0);
      for (int64_t b = 0; b < tm * tn; ++b) {
        const Fp8TileIndex t = fp8_gemm_tile_of_block(b, tm, tn);
        CHECK(t.m >= 0 && t.m < tm && t.n >= 0 && t.n < tn, "in range");
        CHECK(t.m / kFp8GroupM == b / (kFp8GroupM * tn), "group of rows");
        hits[size_t(t.m * tn + t.n)]++;
      }
      CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }), "bijection");
    }
  }
  CHECK(fp8_gemm_cuda_splits(4096, 4096, 4096, 132) == 1, "large M: no split");
  CHECK(fp8_gemm_cuda_splits(1, 4096, 4096, 0) == 1, "unknown SM count: no split");
  // Split ranges partition [0, kt) in order.
  for (int64_t kt : {1, 7, 32, 112}) {
    for (int S = 1; S <= 8; ++S) {
      CHECK(fp8_gemm_split_begin(kt, 0, S) == 0 && fp8_gemm_split_begin(kt, S, S) == kt, "ends");
      for (int s = 0; s < S; ++s) {
        const int64_t len = fp8_gemm_split_begin(kt, s + 1, S) - fp8_gemm_split_begin(kt, s, S);
        CHECK(len == kt / S || len == kt / S + 1, "even lengths");
      }
    }
  }
  Fp8GemmCudaParams p;
  p.M = 1;
  p.N = 4096;
  p.K = 4096;
  p.num_sms = 132;
  CHECK(fp8_gemm_cuda_workspace_size(p) == size_t(4) * 4096 * 4, "workspace");
}

void test_checks() {
  alignas(256) static uint8_t buf[1 << 16];
  alignas(256) static float fbuf[1024];
  auto good = [&] {
    Fp8GemmCudaParams p;
    p.a = buf;
    p.b = buf;
    p.a_row_stride = p.b_row_stride = 32;
    p.M = 3;
    p.N = 5;
    p.K = 32;
    p.scale_a = p.scale_b = fbuf;
    p.out = fbuf;
    p.out_row_stride = 5;
    return p;
  };
  CHECK(fp8_gemm_cuda_check(good()) == Status::kSuccess, "good");
  auto bad = [&](auto mutate, const char* what) {
    Fp8GemmCudaParams p = good();
    mutate(p);
    CHECK(fp8_gemm_cuda_check(p) == Status::kInvalidArgument, "%s", what);
    // The entry point checks first, with and without CUDA.
    CHECK(fp8_gemm_cuda(p, nullptr) == Status::kInvalidArgument, "entry: %s", what);
  };
  bad([](Fp8GemmCudaParams& p) { p.K = 24; }, "K % 16");
  bad([](Fp8GemmCudaParams& p) { p.a = buf + 8; }, "a alignment");
  bad([](Fp8GemmCudaParams& p) { p.b_row_stride = 40; }, "b stride % 16");
  bad([](Fp8GemmCudaParams& p) { p.a_row_stride = 16; }, "a stride < K");
  bad([](Fp8GemmCudaParams& p) { p.out_row_stride = 4; }, "out stride < N");
  bad([](Fp8GemmCudaParams& p) { p.out_dtype = DType::kFloat8E4M3; }, "out dtype");
  bad([](Fp8GemmCudaParams& p) { p.scale_b = nullptr; }, "scale_b null");
  bad([](Fp8GemmCudaParams& p) { p.scale_a_mode = Fp8ScaleMode(7); }, "scale mode");
  bad(
      [](Fp8GemmCudaParams& p) {
        p.M = 1;
        p.N = 256;
        p.K = 4096;
        p.a_row_stride = p.b_row_stride = 4096;
        p.out_row_stride = 256;
        p.num_sms = 132;  // split-K: a workspace is needed
      },
      "missing workspace");
#if !defined(BITPRESS_WITH_CUDA)
  CHECK(fp8_gemm_cuda(good(), nullptr) == Status::kUnsupported, "no CUDA in this build");
#endif
}

}  // namespace

int main() {
  test_swizzle();
  test_loader_map();
  test_descriptor();
  test_acc_fragment();
  test_schedule();
  test_checks();
  test_promotion();
  test_kernel_shapes();
  return check_result("test_fp8_wgmma");
}
