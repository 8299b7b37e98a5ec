// Host tests of the CUDA sparse24_int4_gemm's __host__ __device__ layout, decode and index maps
// (bitpress/sparse24/sparse24_int4_mma.h) and of the kernel's data flow
// (csrc/sparse24/sparse24_int4_gemm_sm80.cu):
//   1. the maps: the nibble interleave is a bijection, the lop3 pair of A register p holds codes
//      (v_2p, v_2p+1), the register rows follow the PTX A fragment, and the word layout equals the
//      Python converter's (bitpress.sparse24.layout_mma_int4: the bf16 layout's value permutation,
//      sparse24_mma_fixture.h, with the nibble order);
//   2. the decode: every code, symmetric and integer / non-integer zero points, a sweep of scales,
//      fp16 and bf16, against round((q - z) s) for integer z (exactly, sign of zero included) and
//      round((q - zi) s + round(-(z - zi) s)) for a float z, computed here;
//   3. the whole kernel emulated on the CPU, block by block and warp by warp: the layout built from
//      the interchange codes with the header maps, the stage loaders (codes, metadata, the scale
//      and zero rows of the stage's groups in fp32 / fp16 / bf16, x into the swizzled tile), the
//      decode of each lane's word into its A registers with the constants of rows g and g + 8,
//      ldmatrix.x4 addresses, mma.sp from the PTX tables (selectors 0 / 1), the k-warp reduction,
//      split-K; compared (a) with x W^T on the decoded dense weight in double (exact up to
//      summation order) and (b) with the float64 definition w = (q - z) s within the rounding of w
//      to 16 bits.
//   4. the split heuristic and workspace size.
#include <bitpress/sparse24/sparse24_int4_gemm_cuda.h>
#include <bitpress/sparse24/sparse24_int4_mma.h>
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

// ----- PTX ISA rules of mma.sp.m16n8k32 .f16/.bf16, written out independently of the headers -----
void ptx_a(int lane, int i, int* row, int* ccol) {
  const int g = lane / 4, t = lane % 4;
  *row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
  *ccol = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
}
void ptx_meta(int r, int j, int sel, int* lane, int* bit) {
  *lane = 4 * (r % 8) + 2 * sel + j / 4;
  *bit = 16 * (r / 8) + 4 * (j % 4);
}
void ptx_b(int lane, int i, int* k, int* n) {
  *k = 2 * (lane % 4) + (i & 1) + 8 * (i / 2);
  *n = lane / 4;
}
void ptx_c(int lane, int i, int* row, int* col) {
  *row = lane / 4 + (i >= 2 ? 8 : 0);
  *col = 2 * (lane % 4) + (i & 1);
}

// One warp-wide mma.sp.m16n8k32 with ordered metadata: acc += A B (double).
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
      if (i0 >= i1) ok = false;
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

template <DType T>
float to_t(float f) {  // f rounded to T (nearest even), as a float
  return T == DType::kFloat16 ? half_bits_to_float(float_to_half_bits(f))
                              : bf16_bits_to_float(float_to_bf16_bits(f));
}
template <DType T>
float bits_to_float(uint32_t h) {
  return T == DType::kFloat16 ? half_bits_to_float(uint16_t(h)) : bf16_bits_to_float(uint16_t(h));
}

// ----- 1. maps -----

void test_maps() {
  bool seen[8] = {};
  for (int v = 0; v < 8; ++v) {
    const int i = sparse24_int4_mma_nibble(v);
    CHECK(i >= 0 && i < 8 && !seen[i], "nibble(%d) = %d", v, i);
    if (i >= 0 && i < 8) seen[i] = true;
    CHECK(sparse24_int4_mma_value_of_nibble(i) == v, "value_of_nibble(%d) != %d", i, v);
  }
  // A word with code v + 1 in value v's nibble: the lop3 pair of register p is (v_2p, v_2p+1).
  uint32_t word = 0;
  for (int v = 0; v < 8; ++v) word |= uint32_t(v + 1) << (4 * sparse24_int4_mma_nibble(v));
  for (int p = 0; p < 4; ++p) {
    const uint32_t bits = sparse24_int4_mma_offset_pair<DType::kFloat16>(word, p);
    CHECK((bits & 0xFFFFu) == (0x6400u | uint32_t(2 * p + 1)) &&
              (bits >> 16) == (0x6400u | uint32_t(2 * p + 2)),
          "offset_pair p %d = %08x", p, bits);
    const uint32_t bb = sparse24_int4_mma_offset_pair<DType::kBFloat16>(word, p);
    CHECK(bits_to_float<DType::kBFloat16>(bb & 0xFFFFu) == 128.f + float(2 * p + 1) &&
              bits_to_float<DType::kBFloat16>(bb >> 16) == 128.f + float(2 * p + 2),
          "bf16 offset_pair p %d = %08x", p, bb);
    for (int l = 0; l < 32; ++l) {
      int r0, c0, r1, c1;
      ptx_a(l, 2 * p, &r0, &c0);
      ptx_a(l, 2 * p + 1, &r1, &c1);
      CHECK(r0 == r1 && r0 == sparse24_int4_mma_reg_row(l, p), "reg_row lane %d p %d", l, p);
    }
  }
  // The word layout against the Python converter: code v of lane l of tile (nt, kt) is the
  // interchange code at the bf16 layout's value source (fixture), in nibble nibble(v).
  const int N = kFixtureN, K = kFixtureK;
  const int64_t KT = K / 32;
  for (int nt = 0; nt < N / 16; ++nt) {
    for (int kt = 0; kt < KT; ++kt) {
      for (int l = 0; l < 32; ++l) {
        const int64_t w = sparse24_int4_mma_word_index(nt, kt, l, KT);
        for (int v = 0; v < 8; ++v) {
          int r, c;
          sparse24_mma_a_coords(l, v, &r, &c);
          const int want = (16 * nt + r) * (K / 2) + 16 * kt + c;
          // The bf16 layout stores value v of this lane at element 8 w + v.
          CHECK(kFixtureValueSource[8 * w + v] == want, "word %lld value %d: source %d vs %d",
                (long long)w, v, kFixtureValueSource[8 * w + v], want);
        }
      }
    }
  }
}

// ----- 2. decode -----

template <DType T>
void test_decode() {
  const float scales[] = {1.f, 0.5f, 3.0e-3f, 0.0371f, 7.25f, -0.125f, 6.1e-5f, 1.9e-2f, 0.f};
  const float zeros[] = {8.f, 0.f, 15.f, 3.f, 7.5f, 2.37f};
  for (float s : scales) {
    for (float z : zeros) {
      uint32_t zb, sb, cb;
      sparse24_int4_mma_group_consts<T>(s, z, &zb, &sb, &cb);
      const float s_t = to_t<T>(s);
      CHECK(bits_to_float<T>(sb) == s_t, "scale bits");
      const float zi = std::min(15.f, std::max(0.f, std::floor(z)));
      const float c_t = z == zi ? -0.f : to_t<T>(-(z - zi) * s_t);
      CHECK(bits_to_float<T>(zb) == (T == DType::kFloat16 ? 1024.f : 128.f) + zi, "zero bits");
      for (int q0 = 0; q0 < 16; ++q0) {
        const int q1 = 15 - q0;
        const uint32_t word = uint32_t(q0) | uint32_t(q1) << 16;  // pair p = 0 holds nibbles 0, 4
        const uint32_t bits = sparse24_int4_mma_offset_pair<T>(word, 0);
        const uint32_t w2 =
            sparse24_int4_mma_decode<T>(bits, sparse24_int4_mma_splat(zb),
                                        sparse24_int4_mma_splat(sb), sparse24_int4_mma_splat(cb));
        const int qs[2] = {q0, q1};
        for (int h = 0; h < 2; ++h) {
          const float got = bits_to_float<T>((w2 >> (16 * h)) & 0xFFFFu);
          // (q - zi) s_t is exact in double; one rounding of the sum with c_t.
          const float want = to_t<T>(float((double(qs[h]) - zi) * s_t + c_t));
          CHECK(got == want || (std::isnan(got) && std::isnan(want)),
                "decode q %d s %g z %g: %g vs %g", qs[h], s, z, got, want);
          if (z == 8.f || z == 0.f || z == 15.f || z == 3.f) {
            // Integer zero points: c = -z s_t is exact, so w = round((q - z) s_t) exactly.
            const float exact = to_t<T>(float((double(qs[h]) - z) * s_t));
            CHECK(got == exact && std::signbit(got) == std::signbit(exact),
                  "integer z %g q %d s %g: %g vs round((q - z) s) %g", z, qs[h], s, got, exact);
          }
        }
      }
    }
  }
}

// ----- 3. the kernel, emulated -----

uint32_t valid_nibble(std::mt19937& rng) {
  static const int kNib[6] = {0 | 1 << 2, 0 | 2 << 2, 0 | 3 << 2,
                              1 | 2 << 2, 1 | 3 << 2, 2 | 3 << 2};
  return uint32_t(kNib[std::uniform_int_distribution<int>(0, 5)(rng)]);
}

// Store float f as dtype dt at element i of a byte buffer (the [G, N] scales / zeros).
void store_as(std::vector<unsigned char>& buf, DType dt, int64_t i, float f) {
  if (dt == DType::kFloat32) {
    std::memcpy(&buf[4 * i], &f, 4);
  } else {
    const uint16_t h = dt == DType::kFloat16 ? float_to_half_bits(f) : float_to_bf16_bits(f);
    std::memcpy(&buf[2 * i], &h, 2);
  }
}
float load_from(const unsigned char* p, DType dt) {
  if (dt == DType::kFloat32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return dt == DType::kFloat16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
}

struct Problem {
  int64_t M, N, K, group_size;
  int splits;
  DType sdt;
  bool asym;
  DType zdt;
};

template <DType T>
void test_gemm(const Problem& pb, std::mt19937& rng) {
  const int64_t M = pb.M, N = pb.N, K = pb.K;
  const int64_t KT = K / 32, KP = sparse24_mma_padded_k(K) / 64, Nt = N / 16;
  const int64_t gk = sparse24_int4_group_k(pb.group_size, K), G = (K + gk - 1) / gk;
  const int s_es = dtype_size(pb.sdt), z_es = dtype_size(pb.zdt);
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> code(0, 15);
  // Interchange: codes [N, K/2], nibbles [N, K/4], scales / zeros [G, N].
  std::vector<int> q(N * K / 2), nib(N * K / 4);
  for (auto& c : q) c = code(rng);
  for (auto& c : nib) c = int(valid_nibble(rng));
  std::vector<unsigned char> sbuf(G * N * s_es), zbuf(G * N * z_es);
  for (int64_t i = 0; i < G * N; ++i) {
    store_as(sbuf, pb.sdt, i, 0.02f * (1.f + std::fabs(nd(rng))));
    // Integer zero points for half the groups, non-integer ones for the others.
    const float z = std::uniform_int_distribution<int>(0, 15)(rng) + (i % 2 ? 0.25f : 0.f);
    store_as(zbuf, pb.zdt, i, z);
  }
  auto s_at = [&](int64_t g, int64_t n) { return load_from(&sbuf[(g * N + n) * s_es], pb.sdt); };
  auto z_at = [&](int64_t g, int64_t n) {
    return pb.asym ? load_from(&zbuf[(g * N + n) * z_es], pb.zdt) : 8.f;
  };
  // Two dense references: the definition in double, and the decoded weight (round to T once).
  std::vector<double> w_def(N * K, 0.0), w_dec(N * K, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < K / 2; ++j) {
      const int c = nib[n * (K / 4) + j / 2];
      const int64_t k = 4 * (j / 2) + ((j & 1) ? (c >> 2) : (c & 3));
      const double s = s_at(k / gk, n), z = z_at(k / gk, n);
      const int qq = q[n * (K / 2) + j];
      w_def[n * K + k] = (qq - z) * s;
      const float s_t = to_t<T>(float(s));
      const double zi = std::min(15.0, std::max(0.0, std::floor(z)));
      const float c_t = z == zi ? 0.f : to_t<T>(float(-(z - zi) * s_t));
      w_dec[n * K + k] = to_t<T>(float((qq - zi) * s_t + c_t));
    }
  }
  // The mma layout through the header maps: words [N/16, K/32, 32], metadata as sparse24_gemm.
  std::vector<uint32_t> qm(N * K / 16), mm(Nt * KP * 32);
  for (int64_t nt = 0; nt < Nt; ++nt) {
    for (int64_t kt = 0; kt < KT; ++kt) {
      for (int l = 0; l < 32; ++l) {
        uint32_t w = 0;
        for (int v = 0; v < 8; ++v) {
          int r, c;
          sparse24_mma_a_coords(l, v, &r, &c);
          w |= uint32_t(q[(16 * nt + r) * (K / 2) + 16 * kt + c])
               << (4 * sparse24_int4_mma_nibble(v));
        }
        qm[sparse24_int4_mma_word_index(nt, kt, l, KT)] = w;
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
  const int64_t xs = K + 8;  // a row stride > K
  std::vector<float> x(M * xs);
  for (auto& f : x) f = to_t<T>(nd(rng));

  const int MT = sparse24_int4_gemm_cuda_m_tiles(M), BM = 8 * MT;
  const int S = pb.splits;
  const int64_t stages = (K + 255) / 256;
  std::vector<double> partials(S * M * N, 0.0);
  bool ordered = true;
  const int64_t n_blocks = (Nt + 3) / 4, m_blocks = (M + BM - 1) / BM;
  for (int split = 0; split < S; ++split) {
    const int64_t qq = stages / S, rr = stages % S;
    const int64_t st_begin = split * qq + std::min<int64_t>(split, rr);
    const int64_t st_end = st_begin + qq + (split < rr ? 1 : 0);
    for (int64_t nb = 0; nb < n_blocks; ++nb) {
      for (int64_t mb = 0; mb < m_blocks; ++mb) {
        const int64_t m0 = mb * BM;
        std::vector<double> acc(4 * 2 * MT * 32 * 4, 0.0);
        auto A = [&](int wn, int wk, int mi) {
          return reinterpret_cast<double (*)[4]>(&acc[(((wn * 2 + wk) * MT + mi) * 32) * 4]);
        };
        for (int64_t st = st_begin; st < st_end; ++st) {
          // --- the stage loaders ---
          std::vector<uint32_t> sq(256 * 4, 0xDEADBEEFu), sm(128 * 4, 0xDEADBEEFu);
          for (int c = 0; c < 256; ++c) {
            int ntl, kk, q4;
            sparse24_int4_q_load_coords(c, &ntl, &kk, &q4);
            const int64_t nt = nb * 4 + ntl, kt = st * 8 + kk;
            const bool valid = nt < Nt && kt < KT;
            for (int e = 0; e < 4; ++e) {
              sq[4 * c + e] = valid ? qm[sparse24_int4_mma_word_index(nt, kt, 4 * q4, KT) + e] : 0u;
            }
          }
          for (int c = 0; c < 128; ++c) {
            int ntl, pp, q4;
            sparse24_int4_m_load_coords(c, &ntl, &pp, &q4);
            const int64_t nt = nb * 4 + ntl, kp = st * 4 + pp;
            const bool valid = nt < Nt && kp < KP;
            for (int e = 0; e < 4; ++e) {
              sm[4 * c + e] = valid ? mm[sparse24_mma_meta_index(nt, kp, 4 * q4, KP) + e] : 0u;
            }
          }
          int64_t g0, g1;
          sparse24_int4_stage_groups(st, K, gk, &g0, &g1);
          CHECK(g1 - g0 < kSparse24Int4StageGroups, "stage %lld touches %lld groups", (long long)st,
                (long long)(g1 - g0 + 1));
          std::vector<unsigned char> ss(2048, 0xAB), sz(2048, 0xAB);
          auto load_sz = [&](std::vector<unsigned char>& dst, const std::vector<unsigned char>& src,
                             int es) {
            for (int c = 0; c < 128; ++c) {
              int gi, col;
              sparse24_int4_sz_load_coords(c, es, &gi, &col);
              if (gi >= kSparse24Int4StageGroups) continue;
              const int64_t g = g0 + gi, n = nb * 64 + col;
              const bool valid = g <= g1 && n < N;
              const int off = sparse24_int4_sz_smem_byte(gi, col, es);
              CHECK(off % 16 == 0 && off + 16 <= 2048, "sz chunk %d at byte %d", c, off);
              for (int b = 0; b < 16; ++b) dst[off + b] = valid ? src[(g * N + n) * es + b] : 0;
            }
          };
          load_sz(ss, sbuf, s_es);
          if (pb.asym) load_sz(sz, zbuf, z_es);
          std::vector<float> sx(BM * 256, -12345.f);
          for (int c = 0; c < BM * 32; ++c) {
            const int row = c / 32, ch = c % 32;
            const int64_t m = m0 + row, k = st * 256 + 8 * ch;
            const bool valid = m < M && k < K;
            for (int e = 0; e < 8; ++e) {
              sx[swizzled_chunk_index(row, ch, 32) * 8 + e] = valid ? x[m * xs + k + e] : 0.f;
            }
          }
          // --- the warps ---
          for (int wn = 0; wn < 4; ++wn) {
            const int64_t nt = nb * 4 + wn;
            if (nt >= Nt) continue;
            for (int wk = 0; wk < 2; ++wk) {
              for (int j = 0; j < 2; ++j) {
                const int pp = wk + 2 * j;
                const int64_t kp = st * 4 + pp;
                if (kp >= KP) break;
                uint32_t e[32];
                for (int l = 0; l < 32; ++l) e[l] = sm[(wn * 4 + pp) * 32 + l];
                for (int dkt = 0; dkt < 2; ++dkt) {
                  const int kk = 2 * pp + dkt;
                  const int64_t kt = st * 8 + kk;
                  if (kt >= KT) continue;
                  const int gi = sparse24_int4_group_of_ktile(int(kt), int(gk / 32)) - int(g0);
                  float a[32][8];
                  for (int l = 0; l < 32; ++l) {
                    uint32_t z2[2], s2[2], c2[2];
                    for (int h = 0; h < 2; ++h) {
                      const int col = wn * 16 + (l >> 2) + 8 * h;
                      const float s =
                          load_from(&ss[sparse24_int4_sz_smem_byte(gi, col, s_es)], pb.sdt);
                      const float z =
                          pb.asym
                              ? load_from(&sz[sparse24_int4_sz_smem_byte(gi, col, z_es)], pb.zdt)
                              : 8.f;
                      uint32_t zb, sb, cb;
                      sparse24_int4_mma_group_consts<T>(s, z, &zb, &sb, &cb);
                      z2[h] = sparse24_int4_mma_splat(zb);
                      s2[h] = sparse24_int4_mma_splat(sb);
                      c2[h] = sparse24_int4_mma_splat(cb);
                    }
                    const uint32_t word = sq[(wn * 8 + kk) * 32 + l];
                    for (int p = 0; p < 4; ++p) {
                      const uint32_t r =
                          sparse24_int4_mma_decode<T>(sparse24_int4_mma_offset_pair<T>(word, p),
                                                      z2[p & 1], s2[p & 1], c2[p & 1]);
                      a[l][2 * p] = bits_to_float<T>(r & 0xFFFFu);
                      a[l][2 * p + 1] = bits_to_float<T>(r >> 16);
                    }
                  }
                  for (int mi = 0; mi < MT; ++mi) {
                    int addr[32];
                    for (int l = 0; l < 32; ++l) {
                      addr[l] = swizzled_chunk_index(8 * mi + (l & 7), kk * 4 + (l >> 3), 32);
                    }
                    float b[32][8];
                    for (int L = 0; L < 32; ++L) {
                      for (int jj = 0; jj < 4; ++jj) {
                        const int base = addr[8 * jj + L / 4] * 8 + 2 * (L % 4);
                        b[L][2 * jj] = sx[base];
                        b[L][2 * jj + 1] = sx[base + 1];
                      }
                    }
                    ordered &= emulate_mma_sp(A(wn, wk, mi), a, b, e, dkt);
                  }
                }
              }
            }
          }
        }
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
  double worst_dec = 0, worst_def = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double got = 0, ref_dec = 0, ref_def = 0, mag = 0;
      for (int s = 0; s < S; ++s) got += partials[(s * M + m) * N + n];
      for (int64_t k = 0; k < K; ++k) {
        ref_dec += double(x[m * xs + k]) * w_dec[n * K + k];
        ref_def += double(x[m * xs + k]) * w_def[n * K + k];
        mag += std::fabs(double(x[m * xs + k]) * w_def[n * K + k]);
      }
      worst_dec = std::max(worst_dec, std::fabs(got - ref_dec) / (mag + 1e-30));
      worst_def = std::max(worst_def, std::fabs(got - ref_def) / (mag + 1e-30));
    }
  }
  const double tol_def = T == DType::kFloat16 ? 2e-3 : 1e-2;  // w rounded to 11 / 8 bits
  CHECK(worst_dec < 1e-12, "%s M %lld N %lld K %lld g %lld S %d: error vs decoded weight %g",
        T == DType::kFloat16 ? "fp16" : "bf16", (long long)M, (long long)N, (long long)K,
        (long long)pb.group_size, S, worst_dec);
  CHECK(worst_def < tol_def, "%s M %lld N %lld K %lld g %lld S %d: error vs definition %g",
        T == DType::kFloat16 ? "fp16" : "bf16", (long long)M, (long long)N, (long long)K,
        (long long)pb.group_size, S, worst_def);
}

// ----- 4. splits, workspace, stage groups -----

void test_splits() {
  const int s = sparse24_int4_gemm_cuda_splits(1, 4096, 4096, 132);
  CHECK(s >= 2 && s <= 16, "splits(1, 4096, 4096, 132) = %d", s);
  CHECK(sparse24_int4_gemm_cuda_splits(1, 512, 64, 132) == 1, "short K: no split");
  CHECK(sparse24_int4_gemm_cuda_splits(64, 4096, 65536, 132) == 1, "enough blocks: no split");
  CHECK(sparse24_int4_gemm_cuda_splits(1, 1 << 20, 16, 132) <= 32, "at most 32 splits");
  Sparse24Int4GemmCudaParams p;
  p.M = 3;
  p.N = 4096;
  p.K = 4096;
  p.num_sms = 132;
  const int S = sparse24_int4_gemm_cuda_splits(p.M, p.K, p.N, p.num_sms);
  CHECK(sparse24_int4_gemm_cuda_workspace_size(p) == (S > 1 ? size_t(S) * 3 * 4096 * 4 : 0),
        "workspace");
  CHECK(sparse24_int4_gemm_cuda_m_tiles(1) == 1 && sparse24_int4_gemm_cuda_m_tiles(16) == 2 &&
            sparse24_int4_gemm_cuda_m_tiles(17) == 4 && sparse24_int4_gemm_cuda_m_tiles(500) == 4,
        "m tiles");
  // Every group size % 32 == 0 meets at most 8 groups per 256-K stage.
  for (int64_t gs = 32; gs <= 1024; gs += 32) {
    for (int64_t st = 0; st < 40; ++st) {
      int64_t g0, g1;
      sparse24_int4_stage_groups(st, 40 * 256, gs, &g0, &g1);
      CHECK(g1 - g0 + 1 <= kSparse24Int4StageGroups && g0 == st * 256 / gs &&
                g1 == (st * 256 + 255) / gs,
            "stage groups gs %lld st %lld", (long long)gs, (long long)st);
    }
  }
  CHECK(sparse24_int4_group_k(-1, 4096) == 4096 && sparse24_int4_group_k(128, 4096) == 128,
        "group_k");
}

}  // namespace

int main() {
  test_maps();
  test_decode<DType::kFloat16>();
  test_decode<DType::kBFloat16>();
  test_splits();
  std::mt19937 rng(11);
  const Problem problems[] = {
      // M, N, K, group_size, splits, scales dtype, asymmetric, zeros dtype
      {1, 16, 32, -1, 1, DType::kFloat16, false, DType::kFloat16},     // one k-tile
      {5, 48, 96, 32, 1, DType::kFloat32, true, DType::kFloat32},      // odd K/32, 3 tile rows
      {16, 80, 288, 96, 2, DType::kBFloat16, true, DType::kFloat16},   // boundary inside a pair
      {17, 64, 544, 128, 3, DType::kFloat16, false, DType::kFloat16},  // MT = 4, 3 stages / 3
      {3, 144, 1024, 64, 2, DType::kFloat32, true, DType::kBFloat16},  // 3 blocks, 2 splits
      {40, 32, 160, -1, 1, DType::kBFloat16, false, DType::kFloat16},  // 2 m-blocks, one group
  };
  for (const Problem& pb : problems) {
    test_gemm<DType::kFloat16>(pb, rng);
    test_gemm<DType::kBFloat16>(pb, rng);
  }
  return check_result("test_sparse24_int4_mma");
}
