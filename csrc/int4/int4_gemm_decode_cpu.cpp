// int4_gemm_decode_cpu: the CPU tile layout -> a dense Wt [K, N] (bitpress/int4/int4_gemm.h), the
// workspace of int4_gemm's dense path (decode once, then a dense GEMM).
//
// Work split: one task per 64-column tile, so that each thread reads its tile's qweight once
// (Kp/8 x 64 words, contiguous) and writes 64-column (128-byte in bf16) segments of every row of
// Wt. The value arithmetic is the fused kernel's, (q - z) * s in float32, then one rounding to the
// workspace dtype (round to nearest even, cpu::converter): the dense path differs from the fused
// path by that rounding of the weight (relative 2^-9 in bf16, 2^-12 in fp16, none in fp32).
#include <string.h>

#include <algorithm>
#include <vector>

#include "bitpress/int4/int4_gemm.h"
#include "common/convert.h"
#include "common/isa.h"

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

inline __attribute__((always_inline)) void decode_tile_body(const DecodeArgs& a, int64_t t) {
  const Int4GemmParams& p = *a.p;
  const int64_t octets = p.Kp / 8, n0 = t * kInt4TileN;
  const int64_t width = std::min<int64_t>(kInt4TileN, p.N - n0);
  alignas(64) float row[kInt4TileN];
  for (int64_t g = 0; g < p.G; ++g) {
    const float* s = p.scales + (t * p.G + g) * kInt4TileN;
    const uint8_t* z = p.zeros ? p.zeros + (t * p.G + g) * kInt4TileN : nullptr;
    for (int64_t o = p.group_starts[g]; o < p.group_starts[g + 1]; ++o) {
      const int32_t* words = p.qweight + (t * octets + o) * kInt4TileN;
      for (int j = 0; j < 8; ++j) {
        const int64_t r = 8 * o + j;
        const int64_t k = p.perm ? p.perm[r] : r;
        if (k < 0) continue;  // padding row
        decode_row(words, 4 * kNibbleOfRow[j], s, z, row);
        a.cvt(row, a.wt + (k * a.ld + n0) * a.esz, width);
      }
    }
  }
}

#if defined(__x86_64__)
BITPRESS_TARGET_AVX512 void decode_tile_avx512(const DecodeArgs& a, int64_t t) {
  decode_tile_body(a, t);
}
BITPRESS_TARGET_AVX2 void decode_tile_avx2(const DecodeArgs& a, int64_t t) {
  decode_tile_body(a, t);
}
#endif
void decode_tile_scalar(const DecodeArgs& a, int64_t t) { decode_tile_body(a, t); }

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
  void (*tile)(const DecodeArgs&, int64_t) = decode_tile_scalar;
#if defined(__x86_64__)
  if (isa >= CpuIsa::kAvx512) {
    tile = decode_tile_avx512;
  } else if (isa >= CpuIsa::kAvx2) {
    tile = decode_tile_avx2;
  }
#endif
  const int64_t Nt = (p.N + kInt4TileN - 1) / kInt4TileN;
  parallel_for(pool, 0, Nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) tile(args, t);
  });
  return Status::kSuccess;
}

}  // namespace bitpress
