// int4_gemm_repack_cpu (GPTQ qweight -> the GPU mma layout) against a loop written from the PTX
// fragment description (not from the header's index helpers), on small odd shapes, with and
// without perm, padded row strides and a chunking thread pool; the error statuses; and the
// consistency of the header's maps, which the CUDA kernel uses in their inverse form.
#include <bitpress/bitpress.h>
#include <bitpress/int4/int4_mma_layout.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"

using namespace bitpress;

namespace {

constexpr int32_t kPoison = int32_t(0xDEADBEEF);

// PTX ISA, mma.m16n8k16 B fragment ("col"): lane l = 4g + t holds b0, b1, b2, b3 = rows 2t, 2t+1,
// 2t+8, 2t+9 of column g of its n8-block. Word w of lane l: block 2w in v0..v3, block 2w+1 in
// v4..v7; v_{2p} in nibble p, v_{2p+1} in nibble p + 4.
std::vector<int32_t> expected(const std::vector<uint8_t>& q, int64_t N,
                              const std::vector<int32_t>& perm) {
  const int64_t Kp = int64_t(perm.size()), Nt = (N + 63) / 64;
  std::vector<int32_t> out(size_t(Kp / 16 * Nt * 128));
  for (int64_t kt = 0; kt < Kp / 16; ++kt) {
    for (int64_t nt = 0; nt < Nt; ++nt) {
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        const int rows[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
        for (int w = 0; w < 4; ++w) {
          uint32_t word = 0;
          for (int v = 0; v < 8; ++v) {
            const int block = 2 * w + v / 4;
            const int64_t k = perm[size_t(16 * kt + rows[v % 4])];
            const int64_t n = 64 * nt + 8 * block + g;
            const uint32_t val = (k >= 0 && n < N) ? q[size_t(k * N + n)] : 0;
            const int nibble = v % 2 == 0 ? v / 2 : v / 2 + 4;
            word |= val << (4 * nibble);
          }
          out[size_t(kt * Nt * 128 + nt * 128 + 4 * lane + w)] = int32_t(word);
        }
      }
    }
  }
  return out;
}

// A pool that runs the range in chunks of `grain` (serially), so that chunk boundaries are
// exercised without threads.
CpuThreadPool chunking_pool() {
  CpuThreadPool pool;
  pool.parallel_for = [](void*, int64_t begin, int64_t end, int64_t grain, ParallelBody body,
                         void* ctx) {
    const int64_t step = std::max<int64_t>(1, std::min<int64_t>(grain, 3));
    for (int64_t b = begin; b < end; b += step) body(ctx, b, std::min(end, b + step));
  };
  return pool;
}

void run_case(std::mt19937& rng, int64_t K, int64_t N, bool with_perm, int64_t pad_stride,
              const CpuThreadPool* pool) {
  std::vector<uint8_t> q(size_t(K * N));
  for (auto& v : q) v = uint8_t(rng() % 16);
  const int64_t stride = N + pad_stride;
  std::vector<int32_t> qweight(size_t(K / 8 * stride), kPoison);  // the padding must not be read
  for (int64_t r = 0; r < K / 8; ++r) {
    for (int64_t n = 0; n < N; ++n) {
      uint32_t word = 0;
      for (int j = 0; j < 8; ++j) word |= uint32_t(q[size_t((8 * r + j) * N + n)]) << (4 * j);
      qweight[size_t(r * stride + n)] = int32_t(word);
    }
  }
  std::vector<int32_t> perm;
  if (with_perm) {
    // A shuffled order with -1 rows spread in, padded to whole k-tiles (as mma_row_order does).
    for (int64_t k = 0; k < K; ++k) perm.push_back(int32_t(k));
    std::shuffle(perm.begin(), perm.end(), rng);
    const int64_t Kp = (K + 16 + 15) / 16 * 16;
    while (int64_t(perm.size()) < Kp) {
      perm.insert(perm.begin() + int64_t(rng() % (perm.size() + 1)), -1);
    }
  } else {
    for (int64_t k = 0; k < K; ++k) perm.push_back(int32_t(k));
  }
  const int64_t Kp = int64_t(perm.size()), Nt = (N + 63) / 64;
  std::vector<int32_t> out(size_t(Kp / 16 * Nt * 128), kPoison);
  Int4RepackParams p;
  p.qweight = qweight.data();
  p.qweight_row_stride = stride;
  p.perm = with_perm ? perm.data() : nullptr;
  p.K = K;
  p.N = N;
  p.Kp = Kp;
  p.out = out.data();
  p.out_row_stride = Nt * 128;
  const Status s = int4_gemm_repack_cpu(p, pool);
  CHECK(s == Status::kSuccess, "K=%ld N=%ld perm=%d: status %s", long(K), long(N), int(with_perm),
        status_string(s));
  const std::vector<int32_t> want = expected(q, N, perm);
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) bad += out[i] != want[i];
  CHECK(bad == 0, "K=%ld N=%ld perm=%d stride=%ld: %ld of %zu words differ", long(K), long(N),
        int(with_perm), long(stride), long(bad), want.size());
}

void check_header_maps() {
  for (int i = 0; i < 8; ++i) {
    CHECK(int4_mma_nibble_of_value(kInt4MmaRowOfNibble[i]) == i, "nibble map at %d", i);
  }
  std::vector<int> seen(16 * 64, 0);
  for (int lane = 0; lane < 32; ++lane) {
    for (int w = 0; w < 4; ++w) {
      for (int v = 0; v < 8; ++v) {
        int kk = -1, nn = -1, l2 = -1, w2 = -1, v2 = -1;
        int4_mma_value_coords(lane, w, v, &kk, &nn);
        CHECK(kk >= 0 && kk < 16 && nn >= 0 && nn < 64, "coords out of the tile");
        if (kk < 0 || kk >= 16 || nn < 0 || nn >= 64) continue;
        ++seen[size_t(kk * 64 + nn)];
        int4_mma_locate(kk, nn, &l2, &w2, &v2);
        CHECK(l2 == lane && w2 == w && v2 == v, "locate(coords(%d, %d, %d))", lane, w, v);
      }
    }
  }
  for (int c : seen) CHECK(c == 1, "a tile position held %d times", c);
}

void check_errors() {
  std::vector<int32_t> qweight(4 * 10, 0), out(2 * 128, kPoison), perm(32, -1);
  Int4RepackParams p;
  p.qweight = qweight.data();
  p.qweight_row_stride = 10;
  p.perm = perm.data();
  p.K = 32;
  p.N = 10;
  p.Kp = 32;
  p.out = out.data();
  p.out_row_stride = 128;
  CHECK(int4_gemm_repack_cpu(p) == Status::kSuccess, "all-padding perm");
  for (int32_t v : out) CHECK(v == 0, "padding rows must be zero, got %08x", unsigned(v));

  const auto status_with = [&](auto edit) {
    Int4RepackParams b = p;
    std::vector<int32_t> pm = perm;
    b.perm = pm.data();
    edit(b, pm);
    return int4_gemm_repack_cpu(b);
  };
  using P = Int4RepackParams;
  using V = std::vector<int32_t>;
  const Status inv = Status::kInvalidArgument;
  CHECK(status_with([](P&, V& pm) { pm[5] = 32; }) == inv, "perm value K");
  CHECK(status_with([](P&, V& pm) { pm[31] = -2; }) == inv, "perm value -2");
  CHECK(status_with([](P&, V& pm) { pm[0] = 31; }) == Status::kSuccess, "perm value K-1");
  CHECK(status_with([](P& b, V&) { b.Kp = 24; }) == inv, "Kp % 16");
  CHECK(status_with([](P& b, V&) { b.K = 28; }) == inv, "K % 8");
  CHECK(status_with([](P& b, V&) { b.qweight_row_stride = 9; }) == inv, "row stride < N");
  CHECK(status_with([](P& b, V&) { b.out_row_stride = 127; }) == inv, "out row stride");
  CHECK(status_with([](P& b, V&) { b.out = nullptr; }) == inv, "null out");
  CHECK(status_with([](P& b, V&) { b.qweight = nullptr; }) == inv, "null qweight");
  CHECK(status_with([](P& b, V&) { b.N = -1; }) == inv, "N < 0");
  CHECK(status_with([](P& b, V&) { b.perm = nullptr, b.K = 24, b.Kp = 24; }) == inv,
        "no perm, K % 16");
  CHECK(status_with([](P& b, V&) { b.perm = nullptr, b.Kp = 48; }) == inv, "no perm, Kp != K");
  CHECK(status_with([](P& b, V&) { b.N = 0, b.out = nullptr; }) == Status::kSuccess, "N = 0");
  // The CUDA entry point checks sizes on the host before touching the device.
  Int4RepackParams bad = p;
  bad.Kp = 24;
#if defined(BITPRESS_WITH_CUDA)
  CHECK(int4_gemm_repack_cuda(bad, nullptr) == inv, "cuda: Kp % 16");
#else
  CHECK(int4_gemm_repack_cuda(bad, nullptr) == Status::kUnsupported, "cuda stub");
#endif
}

}  // namespace

int main() {
  std::mt19937 rng(11);
  const CpuThreadPool pool = chunking_pool();
  const int64_t Ns[] = {1, 7, 64, 65, 130};
  for (int64_t N : Ns) {
    run_case(rng, 16, N, false, 0, nullptr);
    run_case(rng, 48, N, false, 3, &pool);
    run_case(rng, 24, N, true, 0, nullptr);
    run_case(rng, 136, N, true, 5, &pool);
  }
  check_header_maps();
  check_errors();
  return check_result("test_int4_gemm_repack");
}
