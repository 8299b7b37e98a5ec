// int4_gemm_decode_cpu: the CPU tile layout -> a dense Wt [K, N] (bitpress/int4/int4_gemm.h), the
// workspace of int4_gemm's dense path (decode once, then a dense GEMM).
//
// Work split: one task per range of octets (8 rows of the packed weight), each row of Wt written
// whole and in order (N values, contiguous). Writing 64-column segments of every row per tile
// instead touched a new 4 KiB page per row (rows are N * 2 bytes apart) and measured ~16 ms for
// 4096 x 14336; row order reads each tile's 256 bytes of the octet (one page per tile, 224 per
// octet, shared by its 8 rows). The value arithmetic is the fused kernel's, (q - z) * s in
// float32, then one rounding to the workspace dtype (round to nearest even, cpu::converter): the
// dense path differs from the fused path by that rounding of the weight (relative 2^-9 in bf16,
// 2^-12 in fp16, none in fp32).
#include <string.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "bitpress/int4/int4_gemm.h"
#include "common/convert.h"
#include "common/isa.h"
#include "common/thread_buffer.h"

namespace bitpress {
namespace {

// Nibble position of row j of an octet (the layout's nibble i holds row (0,2,4,6,1,3,5,7)[i]).
constexpr int kNibbleOfRow[8] = {0, 4, 1, 5, 2, 6, 3, 7};

// One row of a tile: 64 values of packed row 8o + j. Plain loops over 64 lanes: the callers below
// compile them for AVX-512, AVX2 or the baseline (auto-vectorized).
inline __attribute__((always_inline)) void decode_row(const int32_t* words, int shift,
                                                      const float* s, const uint8_t* z,
                                                      float* row) {
  if (z) {
    for (int c = 0; c < kInt4TileN; ++c) {
      row[c] = float(((words[c] >> shift) & 15) - int(z[c])) * s[c];
    }
  } else {
    for (int c = 0; c < kInt4TileN; ++c) row[c] = float(((words[c] >> shift) & 15) - 8) * s[c];
  }
}

struct DecodeArgs {
  const Int4GemmParams* p;
  char* wt;
  size_t esz;
  int64_t ld;
  cpu::ConvertFn cvt;
};

thread_local ThreadBuffer t_row;  // one float32 row of Wt per pool thread

// Octets [o0, o1): each of their rows as float32 [N] over all tiles, then converted into Wt.
inline __attribute__((always_inline)) Status decode_octets_body(const DecodeArgs& a, int64_t o0,
                                                                int64_t o1) {
  const Int4GemmParams& p = *a.p;
  const int64_t octets = p.Kp / 8, Nt = (p.N + kInt4TileN - 1) / kInt4TileN;
  float* row = static_cast<float*>(t_row.get(size_t(Nt) * kInt4TileN * sizeof(float)));
  if (!row) return Status::kOutOfMemory;
  int64_t g =
      std::upper_bound(p.group_starts, p.group_starts + p.G + 1, int32_t(o0)) - p.group_starts - 1;
  for (int64_t o = o0; o < o1; ++o) {
    while (o >= p.group_starts[g + 1]) ++g;
    for (int j = 0; j < 8; ++j) {
      const int64_t r = 8 * o + j;
      const int64_t k = p.perm ? p.perm[r] : r;
      if (k < 0) continue;  // padding row
      for (int64_t t = 0; t < Nt; ++t) {
        const int64_t sg = (t * p.G + g) * kInt4TileN;
        decode_row(p.qweight + (t * octets + o) * kInt4TileN, 4 * kNibbleOfRow[j], p.scales + sg,
                   p.zeros ? p.zeros + sg : nullptr, row + t * kInt4TileN);
      }
      a.cvt(row, a.wt + k * a.ld * a.esz, p.N);
    }
  }
  return Status::kSuccess;
}

#if defined(__x86_64__)
BITPRESS_TARGET_AVX512 Status decode_octets_avx512(const DecodeArgs& a, int64_t o0, int64_t o1) {
  return decode_octets_body(a, o0, o1);
}
BITPRESS_TARGET_AVX2 Status decode_octets_avx2(const DecodeArgs& a, int64_t o0, int64_t o1) {
  return decode_octets_body(a, o0, o1);
}
#endif
Status decode_octets_scalar(const DecodeArgs& a, int64_t o0, int64_t o1) {
  return decode_octets_body(a, o0, o1);
}

}  // namespace

Status int4_gemm_decode_cpu(const Int4GemmParams& p, void* wt, DType wt_dtype,
                            int64_t wt_row_stride, const CpuThreadPool* pool) {
  if (p.K < 0 || p.N < 0 || p.Kp < 0 || p.Kp % 8 != 0 || p.G < 0 || wt_row_stride < p.N) {
    return Status::kInvalidArgument;
  }
  if (wt_dtype != DType::kFloat32 && wt_dtype != DType::kFloat16 && wt_dtype != DType::kBFloat16) {
    return Status::kInvalidArgument;
  }
  if (!p.perm && p.Kp != p.K) return Status::kInvalidArgument;
  if (p.K == 0 || p.N == 0) return Status::kSuccess;
  if (!wt || !p.qweight || !p.scales || !p.group_starts || (p.G > 0 && p.Kp == 0)) {
    return Status::kInvalidArgument;
  }
  if (p.G == 0 || p.group_starts[0] != 0 || p.group_starts[p.G] != p.Kp / 8) {
    return Status::kInvalidArgument;
  }
  for (int64_t g = 0; g < p.G; ++g) {
    if (p.group_starts[g + 1] < p.group_starts[g]) return Status::kInvalidArgument;
  }
  const size_t esz = dtype_size(wt_dtype);
  char* out = static_cast<char*>(wt);
  if (p.perm) {
    // Rows of x that no packed row names multiply nothing: their rows of Wt are zero.
    std::vector<char> named(size_t(p.K), 0);
    for (int64_t r = 0; r < p.Kp; ++r) {
      const int32_t k = p.perm[r];
      if (k < -1 || k >= p.K) return Status::kInvalidArgument;
      if (k >= 0) named[k] = 1;
    }
    for (int64_t k = 0; k < p.K; ++k) {
      if (!named[k]) memset(out + k * wt_row_stride * esz, 0, size_t(p.N) * esz);
    }
  }
  const CpuIsa isa = active_cpu_isa();
  const DecodeArgs args{&p, out, esz, wt_row_stride, cpu::converter(wt_dtype, isa)};
  Status (*octets)(const DecodeArgs&, int64_t, int64_t) = decode_octets_scalar;
#if defined(__x86_64__)
  if (isa >= CpuIsa::kAvx512) {
    octets = decode_octets_avx512;
  } else if (isa >= CpuIsa::kAvx2) {
    octets = decode_octets_avx2;
  }
#endif
  std::atomic<int> status{int(Status::kSuccess)};
  parallel_for(pool, 0, p.Kp / 8, 4, [&](int64_t b, int64_t e) {
    const Status st = octets(args, b, e);
    if (st != Status::kSuccess) status = int(st);
  });
  return Status(status.load());
}

}  // namespace bitpress
