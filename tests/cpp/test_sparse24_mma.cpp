// Host tests of the CUDA sparse24_gemm's __host__ __device__ index maps
// (bitpress/sparse24/sparse24_mma_layout.h) and of the kernel's data flow:
//   1. the maps: A fragment and metadata maps are bijections, agree with the PTX ISA fragment
//      rules of mma.sp.m16n8k32 .f16/.bf16 (written out here independently), and with the Python
//      converter (bitpress.sparse24.layout_mma) through the generated sparse24_mma_fixture.h;
//   2. the whole GEMM kernel emulated on the CPU, block by block and warp by warp: the layout
//      built with the header maps, the cp.async x loader into the XOR-swizzled tile, ldmatrix.x4
//      at the kernel's addresses, mma.sp emulated from the PTX tables (A fragment over the
//      compressed columns, the metadata of the lanes the selector names, B, C), selector 0 / 1 per
//      k-tile of a pair, the k-warp reduction, split-K ranges, partials summed in split order,
//      the C fragment -> (m, n) stores; compared with x W^T on the dense weight in double. Ragged
//      M, K (partial stages and pairs), several tile rows per block, split-K; and the large-M
//      path's decompression (sparse24_mma_expand_group) against the dense weight;
//   3. the split heuristic and workspace size.
#include <bitpress/sparse24/sparse24_gemm_cuda.h>
#include <bitpress/sparse24/sparse24_mma_layout.h>

#include <algorithm>
#include <bitpress/cuda/primitives.cuh>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "sparse24_mma_fixture.h"

using namespace bitpress;

namespace {

// ----- PTX ISA rules, written out independently of the header -----
// A (sparse m16n8k32, .f16/.bf16): a_i, i = 0..7, at row g for i in {0, 1, 4, 5}, else g + 8;
// compressed column 2t + (i & 1), + 8 for i >= 4.
void ptx_a(int lane, int i, int* row, int* ccol) {
  const int g = lane / 4, t = lane % 4;
  *row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
  *ccol = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
}
// Metadata with selector s: row r, group j (columns 4j..4j+3) is in lane 4 (r % 8) + 2 s + j / 4,
// bits 16 (r / 8) + 4 (j % 4) .. +3.
void ptx_meta(int r, int j, int sel, int* lane, int* bit) {
  *lane = 4 * (r % 8) + 2 * sel + j / 4;
  *bit = 16 * (r / 8) + 4 * (j % 4);
}
// B (k32 x n8): b_i at row 2t + (i & 1) + 8 (i / 2), column g.
void ptx_b(int lane, int i, int* k, int* n) {
  *k = 2 * (lane % 4) + (i & 1) + 8 * (i / 2);
  *n = lane / 4;
}
// C/D: c_i at row g (+ 8 for i >= 2), column 2t + (i & 1).
void ptx_c(int lane, int i, int* row, int* col) {
  *row = lane / 4 + (i >= 2 ? 8 : 0);
  *col = 2 * (lane % 4) + (i & 1);
}

// One warp-wide mma.sp.m16n8k32 (ordered metadata): acc[lane][4] += A B. a: 8 values per lane,
// b: 8 values per lane, e: the metadata register of every lane (only the selected lanes count).
bool emulate_mma_sp(double (*acc)[4], const float (*a)[8], const float (*b)[8], const uint32_t* e,
                    int sel) {
  double comp[16][16], dense[16][32] = {}, bm[32][8];
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) {
      int r, c, k, n;
      ptx_a(l, i, &r, &c);
      comp[r][c] = a[l][i];
      ptx_b(l, i, &k, &n);
      bm[k][n] = b[l][i];
    }
  }
  bool ok = true;
  for (int r = 0; r < 16; ++r) {
    for (int j = 0; j < 8; ++j) {
      int lane, bit;
      ptx_meta(r, j, sel, &lane, &bit);
      const int nib = int(e[lane] >> bit) & 0xF;
      const int i0 = nib & 3, i1 = nib >> 2;
      if (i0 >= i1) ok = false;  // ::ordered_metadata: undefined otherwise
      dense[r][4 * j + i0] = comp[r][2 * j];
      dense[r][4 * j + i1] = comp[r][2 * j + 1];
    }
  }
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 4; ++i) {
      int r, n;
      ptx_c(l, i, &r, &n);
      double s = 0;
      for (int k = 0; k < 32; ++k) s += dense[r][k] * bm[k][n];
      acc[l][i] += s;
    }
  }
  return ok;
}

// ----- 1. index maps -----

void test_maps() {
  bool seen[16][16] = {};
  for (int l = 0; l < 32; ++l) {
    for (int v = 0; v < 8; ++v) {
      int r, c, pr, pc, l2, v2;
      sparse24_mma_a_coords(l, v, &r, &c);
      ptx_a(l, v, &pr, &pc);
      CHECK(r == pr && c == pc, "a_coords lane %d v %d: (%d, %d) vs PTX (%d, %d)", l, v, r, c, pr,
            pc);
      CHECK(!seen[r][c], "a_coords: (%d, %d) twice", r, c);
      seen[r][c] = true;
      sparse24_mma_a_locate(r, c, &l2, &v2);
      CHECK(l2 == l && v2 == v, "a_locate(%d, %d) = (%d, %d), want (%d, %d)", r, c, l2, v2, l, v);
      // The kernel's decompression writes whole groups from values v, v ^ 1 of a lane.
      int r1, c1;
      sparse24_mma_a_coords(l, v ^ 1, &r1, &c1);
      CHECK(r1 == r && c1 / 2 == c / 2 && c1 != c, "lane %d values %d, %d not one group", l, v,
            v ^ 1);
    }
  }
  bool mseen[2][16][8] = {};
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) {
      int r, dkt, j, pl, pbit, l2, i2;
      sparse24_mma_meta_coords(l, i, &r, &dkt, &j);
      CHECK(dkt == sparse24_mma_selector(dkt), "selector of k-tile %d", dkt);
      ptx_meta(r, j, dkt, &pl, &pbit);
      CHECK(pl == l && pbit == 4 * i, "meta lane %d nibble %d: PTX lane %d bit %d", l, i, pl, pbit);
      CHECK(!mseen[dkt][r][j], "meta_coords: (%d, %d, %d) twice", dkt, r, j);
      mseen[dkt][r][j] = true;
      sparse24_mma_meta_locate(r, dkt, j, &l2, &i2);
      CHECK(l2 == l && i2 == i, "meta_locate(%d, %d, %d) = (%d, %d)", r, dkt, j, l2, i2);
    }
  }
  for (int l = 0; l < 32; ++l) {
    for (int j = 0; j < 4; ++j) {
      int m, k, pk, pn;
      sparse24_mma_b_coords(l, j, &m, &k);
      ptx_b(l, 2 * j, &pk, &pn);
      CHECK(m == pn && k == pk, "b_coords lane %d reg %d", l, j);
      ptx_b(l, 2 * j + 1, &pk, &pn);
      CHECK(k + 1 == pk, "b_coords lane %d reg %d high half", l, j);
    }
    for (int i = 0; i < 4; ++i) {
      int r, m, pr, pm;
      sparse24_mma_c_coords(l, i, &r, &m);
      ptx_c(l, i, &pr, &pm);
      CHECK(r == pr && m == pm, "c_coords lane %d acc %d", l, i);
    }
  }
  CHECK(sparse24_mma_padded_k(0) == 0 && sparse24_mma_padded_k(8) == 64 &&
            sparse24_mma_padded_k(64) == 64 && sparse24_mma_padded_k(72) == 128,
        "padded_k");
}

// The header maps against the Python maps (the generated fixture).
void test_fixture() {
  const int N = kFixtureN, K = kFixtureK;
  const int64_t KT = K / 32, KP = sparse24_mma_padded_k(K) / 64;
  CHECK(int64_t(sizeof(kFixtureValueSource) / 2) == int64_t(N) * K / 2, "fixture value size");
  CHECK(int64_t(sizeof(kFixtureMetaSource) / 2) == N / 16 * KP * 32 * 8, "fixture meta size");
  for (int nt = 0; nt < N / 16; ++nt) {
    for (int kt = 0; kt < KT; ++kt) {
      for (int l = 0; l < 32; ++l) {
        for (int v = 0; v < 8; ++v) {
          int r, c;
          sparse24_mma_a_coords(l, v, &r, &c);
          const int want = (16 * nt + r) * (K / 2) + 16 * kt + c;
          const int64_t idx = sparse24_mma_value_index(nt, kt, l, v, KT);
          CHECK(kFixtureValueSource[idx] == want, "value source %lld: %d vs %d", (long long)idx,
                kFixtureValueSource[idx], want);
        }
      }
    }
    for (int kp = 0; kp < KP; ++kp) {
      for (int l = 0; l < 32; ++l) {
        for (int i = 0; i < 8; ++i) {
          int r, dkt, j;
          sparse24_mma_meta_coords(l, i, &r, &dkt, &j);
          const int grp = (2 * kp + dkt) * 8 + j;
          const int want = grp < K / 4 ? (16 * nt + r) * (K / 4) + grp : -1;
          const int64_t idx = sparse24_mma_meta_index(nt, kp, l, KP) * 8 + i;
          CHECK(kFixtureMetaSource[idx] == want, "meta source %lld: %d vs %d", (long long)idx,
                kFixtureMetaSource[idx], want);
        }
      }
    }
  }
}

// ----- 2. the kernel, emulated -----

float round_bf16(float f) {  // values exactly representable in bf16: products are exact
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u &= 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Problem {
  int64_t M, N, K;
  int splits;
};

void test_gemm(const Problem& pb, std::mt19937& rng) {
  const int64_t M = pb.M, N = pb.N, K = pb.K;
  const int64_t KT = K / 32, KP = sparse24_mma_padded_k(K) / 64, Nt = N / 16;
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> pat(0, 5);
  static const int kNib[6] = {0 | 1 << 2, 0 | 2 << 2, 0 | 3 << 2,
                              1 | 2 << 2, 1 | 3 << 2, 2 | 3 << 2};
  // Interchange: values [N, K/2], nibbles [N, K/4]; and the dense weight.
  std::vector<float> vals(N * K / 2), dense(N * K, 0.f);
  std::vector<int> nib(N * K / 4);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < K / 4; ++j) {
      const int c = kNib[pat(rng)];
      nib[n * (K / 4) + j] = c;
      const float v0 = round_bf16(nd(rng)), v1 = round_bf16(nd(rng));
      vals[n * (K / 2) + 2 * j] = v0;
      vals[n * (K / 2) + 2 * j + 1] = v1;
      dense[n * K + 4 * j + (c & 3)] = v0;
      dense[n * K + 4 * j + (c >> 2)] = v1;
    }
  }
  // The mma layout, through the header maps.
  std::vector<float> vm(N * K / 2);  // [N, K/2], the tiles in order
  std::vector<uint32_t> mm(Nt * KP * 32);
  for (int64_t nt = 0; nt < Nt; ++nt) {
    for (int64_t kt = 0; kt < KT; ++kt) {
      for (int l = 0; l < 32; ++l) {
        for (int v = 0; v < 8; ++v) {
          int r, c;
          sparse24_mma_a_coords(l, v, &r, &c);
          vm[sparse24_mma_value_index(nt, kt, l, v, KT)] =
              vals[(16 * nt + r) * (K / 2) + 16 * kt + c];
        }
      }
    }
    for (int64_t kp = 0; kp < KP; ++kp) {
      for (int l = 0; l < 32; ++l) {
        uint32_t w = 0;
        for (int i = 0; i < 8; ++i) {
          int r, dkt, j;
          sparse24_mma_meta_coords(l, i, &r, &dkt, &j);
          const int64_t grp = (2 * kp + dkt) * 8 + j;
          const int c = grp < K / 4 ? nib[(16 * nt + r) * (K / 4) + grp] : kSparse24MmaPadNibble;
          w |= uint32_t(c) << (4 * i);
        }
        mm[sparse24_mma_meta_index(nt, kp, l, KP)] = w;
      }
    }
  }
  // The large-M path's decompression (sparse24_decompress_kernel: one thread per tile and lane,
  // whole groups from sparse24_mma_expand_group) rebuilds the dense weight exactly, every element
  // written once.
  {
    std::vector<float> w(N * K, std::nanf(""));
    std::vector<int> writes(N * K, 0);
    for (int64_t nt = 0; nt < Nt; ++nt) {
      for (int64_t kt = 0; kt < KT; ++kt) {
        for (int l = 0; l < 32; ++l) {
          for (int v = 0; v < 8; v += 2) {
            int r, j;
            float g4[4];
            sparse24_mma_expand_group(vm.data(), mm.data(), nt, kt, l, v, KT, KP, &r, &j, g4);
            for (int q = 0; q < 4; ++q) {
              const int64_t idx = (16 * nt + r) * K + 32 * kt + 4 * j + q;
              w[idx] = g4[q];
              ++writes[idx];
            }
          }
        }
      }
    }
    bool same = true;
    for (int64_t i = 0; i < N * K; ++i) same &= writes[i] == 1 && w[i] == dense[i];
    CHECK(same, "N %lld K %lld: decompression differs from the dense weight", (long long)N,
          (long long)K);
  }
  // x with a row stride > K (the kernel reads rows by stride).
  const int64_t xs = K + 8;
  std::vector<float> x(M * xs);
  for (auto& f : x) f = round_bf16(nd(rng));
  std::vector<float> bias(N);
  for (auto& f : bias) f = nd(rng);

  const int MT = sparse24_gemm_cuda_m_tiles(M), BM = 8 * MT;
  const int S = pb.splits;
  const int64_t stages = (K + 127) / 128;
  std::vector<double> partials(S * M * N, 0.0);
  bool ordered = true;
  const int64_t n_blocks = (Nt + 3) / 4, m_blocks = (M + BM - 1) / BM;
  for (int split = 0; split < S; ++split) {
    // split_range of the kernel
    const int64_t q = stages / S, rr = stages % S;
    const int64_t st_begin = split * q + std::min<int64_t>(split, rr);
    const int64_t st_end = st_begin + q + (split < rr ? 1 : 0);
    for (int64_t nb = 0; nb < n_blocks; ++nb) {
      for (int64_t mb = 0; mb < m_blocks; ++mb) {
        const int64_t m0 = mb * BM;
        // acc[wn][wk][mi][lane][4]
        std::vector<double> acc(4 * 2 * MT * 32 * 4, 0.0);
        auto A = [&](int wn, int wk, int mi) {
          return reinterpret_cast<double (*)[4]>(&acc[(((wn * 2 + wk) * MT + mi) * 32) * 4]);
        };
        for (int64_t st = st_begin; st < st_end; ++st) {
          // The x loader: 16 chunks of 8 per row, zero-filled past M and K, XOR-swizzled.
          std::vector<float> sx(BM * 128, -12345.f);
          for (int c = 0; c < BM * 16; ++c) {
            const int row = c / 16, ch = c % 16;
            const int64_t m = m0 + row, k = st * 128 + 8 * ch;
            const bool valid = m < M && k < K;
            for (int e = 0; e < 8; ++e) {
              sx[swizzled_chunk_index(row, ch, 16) * 8 + e] = valid ? x[m * xs + k + e] : 0.f;
            }
          }
          for (int wn = 0; wn < 4; ++wn) {
            for (int wk = 0; wk < 2; ++wk) {
              const int64_t nt = nb * 4 + wn, kp = st * 2 + wk;
              if (nt >= Nt || kp >= KP) continue;
              uint32_t e[32];
              for (int l = 0; l < 32; ++l) e[l] = mm[sparse24_mma_meta_index(nt, kp, l, KP)];
              for (int dkt = 0; dkt < 2; ++dkt) {
                const int kk = 2 * wk + dkt;  // k-tile within the stage
                const int64_t kt = st * 4 + kk;
                if (kt >= KT) continue;  // K / 32 odd: the last pair's second half is padding
                float a[32][8];
                for (int l = 0; l < 32; ++l)
                  for (int v = 0; v < 8; ++v) a[l][v] = vm[(nt * KT + kt) * 256 + 8 * l + v];
                for (int mi = 0; mi < MT; ++mi) {
                  // ldmatrix.x4: lane l gives row l % 8 of matrix l / 8 at the kernel's address;
                  // register j of lane L = elements 2 (L % 4), +1 of row L / 4 of matrix j.
                  int addr[32];
                  for (int l = 0; l < 32; ++l) {
                    addr[l] = swizzled_chunk_index(8 * mi + (l & 7), kk * 4 + (l >> 3), 16);
                  }
                  float b[32][8];
                  for (int L = 0; L < 32; ++L) {
                    for (int j = 0; j < 4; ++j) {
                      const int base = addr[8 * j + L / 4] * 8 + 2 * (L % 4);
                      b[L][2 * j] = sx[base];
                      b[L][2 * j + 1] = sx[base + 1];
                    }
                  }
                  ordered &= emulate_mma_sp(A(wn, wk, mi), a, b, e, sparse24_mma_selector(kt));
                }
              }
            }
          }
        }
        // k-warp reduction (wk 0 + wk 1) and the C fragment stores.
        for (int wn = 0; wn < 4; ++wn) {
          const int64_t nt = nb * 4 + wn;
          if (nt >= Nt) continue;
          for (int mi = 0; mi < MT; ++mi) {
            for (int l = 0; l < 32; ++l) {
              for (int i = 0; i < 4; ++i) {
                int r, mm_;
                sparse24_mma_c_coords(l, i, &r, &mm_);
                const int64_t m = m0 + 8 * mi + mm_, n = nt * 16 + r;
                if (m >= M) continue;
                partials[(split * M + m) * N + n] = A(wn, 0, mi)[l][i] + A(wn, 1, mi)[l][i];
              }
            }
          }
        }
      }
    }
  }
  CHECK(ordered, "M %lld N %lld K %lld: a metadata nibble was not ordered", (long long)M,
        (long long)N, (long long)K);
  double worst = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double got = 0, ref = bias[n], mag = std::fabs(bias[n]);
      for (int s = 0; s < S; ++s) got += partials[(s * M + m) * N + n];
      got += bias[n];
      for (int64_t k = 0; k < K; ++k) {
        ref += double(x[m * xs + k]) * dense[n * K + k];
        mag += std::fabs(double(x[m * xs + k]) * dense[n * K + k]);
      }
      worst = std::max(worst, std::fabs(got - ref) / (mag + 1e-30));
    }
  }
  CHECK(worst < 1e-12, "M %lld N %lld K %lld S %d: relative error %g", (long long)M, (long long)N,
        (long long)K, S, worst);
}

// ----- 3. splits and workspace -----

void test_splits() {
  // Decode on 132 SMs: N = 4096 gives 64 blocks, which a split of K brings to ~2 per SM.
  const int s = sparse24_gemm_cuda_splits(1, 4096, 4096, 132);
  CHECK(s >= 4 && s <= 16, "splits(1, 4096, 4096, 132) = %d", s);
  CHECK(sparse24_gemm_cuda_splits(1, 4096, 14336, 132) >= 1, "splits");
  CHECK(sparse24_gemm_cuda_splits(1, 256, 64, 132) <= 1, "short K: no split (%d)",
        sparse24_gemm_cuda_splits(1, 256, 64, 132));
  CHECK(sparse24_gemm_cuda_splits(64, 4096, 65536, 132) == 1, "enough blocks: no split");
  CHECK(sparse24_gemm_cuda_splits(1, 1 << 20, 16, 132) <= 32, "at most 32 splits");
  Sparse24GemmCudaParams p;
  p.M = 3;
  p.N = 4096;
  p.K = 4096;
  p.num_sms = 132;
  const int S = sparse24_gemm_cuda_splits(p.M, p.K, p.N, p.num_sms);
  CHECK(sparse24_gemm_cuda_workspace_size(p) == (S > 1 ? size_t(S) * 3 * 4096 * 4 : 0),
        "workspace");
  CHECK(sparse24_gemm_cuda_m_tiles(1) == 1 && sparse24_gemm_cuda_m_tiles(16) == 2 &&
            sparse24_gemm_cuda_m_tiles(17) == 4 && sparse24_gemm_cuda_m_tiles(64) == 8,
        "m tiles");
}

}  // namespace

int main() {
  test_maps();
  test_fixture();
  test_splits();
  std::mt19937 rng(7);
  const Problem problems[] = {
      {1, 16, 32, 1},     // one k-tile: half a pair, a partial stage
      {5, 48, 96, 1},     // 3 k-tiles: the last pair half padding; 3 tile rows (block partial)
      {16, 80, 224, 2},   // MT = 2, two blocks, split-K, last stage 3 k-tiles
      {17, 64, 384, 3},   // MT = 4, 3 splits of 1 stage
      {40, 32, 160, 1},   // MT = 8, 5 k-tiles
      {70, 128, 640, 4},  // two m-blocks, 4 splits of 5 stages
  };
  for (const Problem& pb : problems) test_gemm(pb, rng);
  return check_result("test_sparse24_mma");
}
