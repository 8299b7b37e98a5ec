// sparse24_compress / decompress on the CPU: the interchange format of 2:4 weights
// (bitpress/sparse24/sparse24.h). Run once at load; plain C++ over rows, threaded.
#include <string.h>

#include <atomic>

#include "bitpress/sparse24/sparse24.h"
#include "bitpress/sparse24/sparse24_cpu.h"

namespace bitpress {
namespace {

// Whether the bits of a float of `Bytes` bytes are a zero of either sign.
template <typename U>
inline bool is_zero(U u) {
  constexpr U sign = U(U(1) << (8 * sizeof(U) - 1));
  return (u & U(~sign)) == 0;
}

template <typename U>
int64_t compress_row(const U* w, int64_t K, U* values, uint8_t* meta, int* count) {
  for (int64_t g = 0; g < K / 4; ++g) {
    const U* q = w + 4 * g;
    uint32_t nz = 0;
    for (int i = 0; i < 4; ++i) nz |= uint32_t(!is_zero(q[i])) << i;
    const uint32_t nib = sparse24_nibble_of_mask(nz);
    if (nib == 0xFFu) {
      *count = __builtin_popcount(nz);
      return g;
    }
    values[2 * g] = q[sparse24_idx0(nib)];
    values[2 * g + 1] = q[sparse24_idx1(nib)];
    if (g & 1) {
      meta[g >> 1] = uint8_t(meta[g >> 1] | (nib << 4));
    } else {
      meta[g >> 1] = uint8_t(nib);
    }
  }
  return -1;
}

template <typename U>
Status compress(const void* w, int64_t N, int64_t K, int64_t ld, void* values, uint8_t* meta,
                int64_t* bad_row, int64_t* bad_group, int* bad_count, const CpuThreadPool* pool) {
  // The first bad row in row-major order: each task reports its first, the minimum wins.
  std::atomic<int64_t> first{N};
  parallel_for(pool, 0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1 && n < first.load(std::memory_order_relaxed); ++n) {
      int count = 0;
      const int64_t g =
          compress_row(static_cast<const U*>(w) + n * ld, K, static_cast<U*>(values) + n * (K / 2),
                       meta + n * (K / 8), &count);
      if (g >= 0) {
        int64_t cur = first.load();
        while (n < cur && !first.compare_exchange_weak(cur, n)) {
        }
        break;
      }
    }
  });
  const int64_t n = first.load();
  if (n == N) return Status::kSuccess;
  // Recompute the group of the first bad row (cheap, once, on the error path).
  int count = 0;
  U* vrow = static_cast<U*>(values) + n * (K / 2);
  *bad_group = compress_row(static_cast<const U*>(w) + n * ld, K, vrow, meta + n * (K / 8), &count);
  *bad_row = n;
  *bad_count = count;
  return Status::kInvalidArgument;
}

template <typename U>
void decompress_row(const U* values, const uint8_t* meta, int64_t K, U* w) {
  memset(w, 0, size_t(K) * sizeof(U));
  for (int64_t j = 0; j < K / 2; ++j) w[sparse24_value_col(meta, j)] = values[j];
}

}  // namespace

bool sparse24_find_bad_meta(const uint8_t* meta, int64_t N, int64_t K, int64_t* row, int64_t* group,
                            int* nibble) {
  const int64_t K8 = K / 8;
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* m = meta + n * K8;
    for (int64_t b = 0; b < K8; ++b) {
      if (sparse24_meta_byte_valid(m[b])) continue;
      const bool lo_ok = sparse24_nibble_valid(m[b] & 0xFu);
      *row = n;
      *group = 2 * b + (lo_ok ? 1 : 0);
      *nibble = lo_ok ? (m[b] >> 4) : (m[b] & 0xF);
      return true;
    }
  }
  return false;
}

Status sparse24_compress_cpu(const void* w, int elem_size, int64_t N, int64_t K,
                             int64_t w_row_stride, void* values, uint8_t* meta, int64_t* bad_row,
                             int64_t* bad_group, int* bad_count, const CpuThreadPool* pool) {
  if (N < 0 || K < 0 || K % 8 || (N * K > 0 && (!w || !values || !meta)) || w_row_stride < K ||
      !bad_row || !bad_group || !bad_count) {
    return Status::kInvalidArgument;
  }
  if (N == 0 || K == 0) return Status::kSuccess;
  switch (elem_size) {
    case 1:
      return compress<uint8_t>(w, N, K, w_row_stride, values, meta, bad_row, bad_group, bad_count,
                               pool);
    case 2:
      return compress<uint16_t>(w, N, K, w_row_stride, values, meta, bad_row, bad_group, bad_count,
                                pool);
    case 4:
      return compress<uint32_t>(w, N, K, w_row_stride, values, meta, bad_row, bad_group, bad_count,
                                pool);
    default:
      return Status::kInvalidArgument;
  }
}

Status sparse24_decompress_cpu(const void* values, int elem_size, const uint8_t* meta, int64_t N,
                               int64_t K, void* w, const CpuThreadPool* pool) {
  if (N < 0 || K < 0 || K % 8 || (N * K > 0 && (!w || !values || !meta))) {
    return Status::kInvalidArgument;
  }
  if (elem_size != 1 && elem_size != 2 && elem_size != 4) return Status::kInvalidArgument;
  if (N == 0 || K == 0) return Status::kSuccess;
  int64_t r, g;
  int nib;
  if (sparse24_find_bad_meta(meta, N, K, &r, &g, &nib)) return Status::kInvalidArgument;
  parallel_for(pool, 0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* m = meta + n * (K / 8);
      switch (elem_size) {
        case 1:
          decompress_row(static_cast<const uint8_t*>(values) + n * (K / 2), m, K,
                         static_cast<uint8_t*>(w) + n * K);
          break;
        case 2:
          decompress_row(static_cast<const uint16_t*>(values) + n * (K / 2), m, K,
                         static_cast<uint16_t*>(w) + n * K);
          break;
        default:
          decompress_row(static_cast<const uint32_t*>(values) + n * (K / 2), m, K,
                         static_cast<uint32_t*>(w) + n * K);
      }
    }
  });
  return Status::kSuccess;
}

}  // namespace bitpress
