// GPTQ tensors -> the int4_gemm tile layout (bitpress/int4/int4_gemm.h). The same layout as
// python/bitpress/formats/int4_layout.py: rows grouped by g_idx in their original order (a stable
// counting sort, i.e. the act-order reorder done once at load), each group padded to whole octets,
// nibble i of a word holding row (0, 2, 4, 6, 1, 3, 5, 7)[i] of its octet.
#include <string.h>

#include <vector>

#include "bitpress/int4/int4.h"
#include "bitpress/int4/int4_gemm.h"

namespace bitpress {
namespace {

constexpr int kNibbleOfRow[8] = {0, 4, 1, 5, 2, 6, 3, 7};

Status check(const Int4PackParams& p) {
  if (p.K < 0 || p.N < 0 || p.G < 0 || p.K % 8 || !dtype_valid(p.scales_dtype)) {
    return Status::kInvalidArgument;
  }
  if (p.K == 0) return Status::kSuccess;
  if (!p.qweight || !p.scales || p.G == 0 || p.qweight_row_stride < p.N ||
      p.scales_row_stride < p.N || (p.qzeros && p.qzeros_row_stride < (p.N + 7) / 8)) {
    return Status::kInvalidArgument;
  }
  if (!p.g_idx && (p.group_size <= 0 || (p.K - 1) / p.group_size + 1 != p.G)) {  // K > 0
    return Status::kInvalidArgument;
  }
  for (int64_t k = 0; p.g_idx && k < p.K; ++k) {
    if (p.g_idx[k] < 0 || p.g_idx[k] >= p.G) return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

std::vector<int64_t> group_counts(const Int4PackParams& p) {
  std::vector<int64_t> counts(size_t(p.G), 0);
  for (int64_t k = 0; k < p.K; ++k) ++counts[size_t(int4_group_of(k, p.g_idx, p.group_size))];
  return counts;
}

}  // namespace

Status int4_gemm_pack_size(const Int4PackParams& p, int64_t* Kp) {
  const Status s = check(p);
  if (s != Status::kSuccess) return s;
  int64_t total = 0;
  for (int64_t c : group_counts(p)) total += (c + 7) / 8 * 8;
  *Kp = total;
  return Status::kSuccess;
}

Status int4_gemm_pack(const Int4PackParams& p, int32_t* qweight_tiles, float* scales_tiles,
                      uint8_t* zeros_tiles, int32_t* group_starts, int32_t* perm) {
  int64_t Kp = 0;
  const Status s = int4_gemm_pack_size(p, &Kp);
  if (s != Status::kSuccess) return s;
  if (!qweight_tiles || !scales_tiles || !group_starts || (Kp && !perm)) {
    return Status::kInvalidArgument;
  }
  const int64_t Nt = (p.N + kInt4TileN - 1) / kInt4TileN, K8 = Kp / 8;
  // perm and group_starts: a stable counting sort of the rows by group.
  const std::vector<int64_t> counts = group_counts(p);
  std::vector<int64_t> next(size_t(p.G), 0);
  group_starts[0] = 0;
  for (int64_t g = 0; g < p.G; ++g) {
    next[size_t(g)] = 8 * int64_t(group_starts[g]);
    group_starts[g + 1] = int32_t(group_starts[g] + (counts[size_t(g)] + 7) / 8);
  }
  for (int64_t i = 0; i < Kp; ++i) perm[i] = -1;
  for (int64_t k = 0; k < p.K; ++k) {
    perm[next[size_t(int4_group_of(k, p.g_idx, p.group_size))]++] = int32_t(k);
  }
  memset(qweight_tiles, 0, size_t(Nt * K8 * kInt4TileN) * sizeof(int32_t));
  for (int64_t o = 0; o < K8; ++o) {
    for (int j = 0; j < 8; ++j) {
      const int64_t k = perm[8 * o + j];
      if (k < 0) continue;
      const uint32_t* row =
          reinterpret_cast<const uint32_t*>(p.qweight + (k / 8) * p.qweight_row_stride);
      for (int64_t n = 0; n < p.N; ++n) {
        const uint32_t q = uint32_t(unpack_nibble(row[n], int(k % 8)));
        int32_t& w = qweight_tiles[((n / kInt4TileN) * K8 + o) * kInt4TileN + n % kInt4TileN];
        w = int32_t(uint32_t(w) | (q << (4 * kNibbleOfRow[j])));
      }
    }
  }
  for (int64_t g = 0; g < p.G; ++g) {
    for (int64_t n = 0; n < Nt * kInt4TileN; ++n) {
      const int64_t t = n / kInt4TileN, c = n % kInt4TileN, i = (t * p.G + g) * kInt4TileN + c;
      scales_tiles[i] =
          n < p.N ? load_as_float(p.scales, p.scales_dtype, g * p.scales_row_stride + n) : 0.f;
      if (zeros_tiles) {
        zeros_tiles[i] = n >= p.N ? 0
                         : p.qzeros
                             ? uint8_t(unpack_nibble(
                                   uint32_t(p.qzeros[g * p.qzeros_row_stride + n / 8]), int(n % 8)))
                             : uint8_t(kInt4SymmetricZero);
      }
    }
  }
  return Status::kSuccess;
}

}  // namespace bitpress
