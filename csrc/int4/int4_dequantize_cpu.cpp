// CPU kernel of int4_dequantize (see bitpress/int4/int4_dequantize.h for the formula and layouts).
//
// Work is split over packed rows (8 rows of K each). Per row k, the scales and zero points of its
// group are widened once into float / int32 buffers (reused while consecutive rows share the group,
// i.e. 128 rows at a time without act-order), so the inner loop over N is branch-free:
//   t[n] = float(((qweight[k/8, n] >> 4(k%8)) & 15) - z[n]) * s[n]
// which the compiler vectorizes for each ISA path (same body, compiled under the AVX2 / AVX-512
// target attributes); the rounding to fp16/bf16 is an explicit SIMD conversion (convert.cpp).
#include <algorithm>
#include <vector>

#include "bitpress/int4/int4.h"
#include "bitpress/int4/int4_dequantize.h"
#include "common/convert.h"
#include "common/isa.h"

namespace bitpress {
namespace {

constexpr int64_t kChunk = 1024;  // columns per inner pass: the float tile stays in L1

struct RowBuffers {
  std::vector<float> scale, tmp;
  std::vector<int32_t> zero;
  int64_t group = -1;
};

inline void load_group(const Int4DequantizeParams& p, int64_t g, RowBuffers& b) {
  for (int64_t n = 0; n < p.N; ++n) {
    b.scale[n] = load_as_float(p.scales, p.scales_dtype, g * p.scales_row_stride + n);
  }
  if (p.qzeros) {
    const uint32_t* zrow = reinterpret_cast<const uint32_t*>(p.qzeros + g * p.qzeros_row_stride);
    for (int64_t n = 0; n < p.N; ++n) b.zero[n] = unpack_nibble(zrow[n >> 3], int(n & 7));
  }
  b.group = g;
}

__attribute__((always_inline)) inline void dequant_chunk(const uint32_t* __restrict q,
                                                         const int32_t* __restrict z,
                                                         const float* __restrict s,
                                                         float* __restrict t, int shift,
                                                         int64_t n) {
  for (int64_t i = 0; i < n; ++i) t[i] = float(int32_t((q[i] >> shift) & 15u) - z[i]) * s[i];
}

__attribute__((always_inline)) inline void dequant_rows(const Int4DequantizeParams& p, int64_t r0,
                                                        int64_t r1, cpu::ConvertFn convert) {
  RowBuffers b;
  b.scale.resize(p.N);
  b.zero.assign(p.N, kInt4SymmetricZero);
  b.tmp.resize(std::min(p.N, kChunk));
  const int out_size = dtype_size(p.out_dtype);
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* qrow = reinterpret_cast<const uint32_t*>(p.qweight + r * p.qweight_row_stride);
    for (int j = 0; j < 8; ++j) {
      const int64_t k = 8 * r + j;
      const int64_t g = int4_group_of(k, p.g_idx, p.group_size);
      if (g != b.group) load_group(p, g, b);
      char* orow = static_cast<char*>(p.out) + k * p.out_row_stride * out_size;
      for (int64_t n0 = 0; n0 < p.N; n0 += kChunk) {
        const int64_t n = std::min(kChunk, p.N - n0);
        if (p.out_dtype == DType::kFloat32) {  // no rounding step: write the floats in place
          dequant_chunk(qrow + n0, b.zero.data() + n0, b.scale.data() + n0,
                        reinterpret_cast<float*>(orow) + n0, 4 * j, n);
        } else {
          dequant_chunk(qrow + n0, b.zero.data() + n0, b.scale.data() + n0, b.tmp.data(), 4 * j, n);
          convert(b.tmp.data(), orow + n0 * out_size, n);
        }
      }
    }
  }
}

using RowsFn = void (*)(const Int4DequantizeParams&, int64_t, int64_t, cpu::ConvertFn);

void rows_scalar(const Int4DequantizeParams& p, int64_t r0, int64_t r1, cpu::ConvertFn c) {
  dequant_rows(p, r0, r1, c);
}
#if defined(__x86_64__)
BITPRESS_TARGET_AVX2 void rows_avx2(const Int4DequantizeParams& p, int64_t r0, int64_t r1,
                                    cpu::ConvertFn c) {
  dequant_rows(p, r0, r1, c);
}
BITPRESS_TARGET_AVX512 void rows_avx512(const Int4DequantizeParams& p, int64_t r0, int64_t r1,
                                        cpu::ConvertFn c) {
  dequant_rows(p, r0, r1, c);
}
#endif

RowsFn pick(CpuIsa isa) {
#if defined(__x86_64__)
  if (isa >= CpuIsa::kAvx512) return rows_avx512;  // kAmx: the AVX-512 code
  if (isa == CpuIsa::kAvx2) return rows_avx2;
#endif
  (void)isa;
  return rows_scalar;
}

}  // namespace

Status int4_dequantize_check(const Int4DequantizeParams& p) {
  if (p.K < 0 || p.N < 0 || p.K % 8 != 0) return Status::kInvalidArgument;
  if (!dtype_valid(p.scales_dtype) || !dtype_valid(p.out_dtype)) return Status::kInvalidArgument;
  if (p.K == 0 || p.N == 0) return Status::kSuccess;
  if (!p.qweight || !p.scales || !p.out || p.num_groups <= 0) return Status::kInvalidArgument;
  if (p.qweight_row_stride < p.N || p.scales_row_stride < p.N || p.out_row_stride < p.N) {
    return Status::kInvalidArgument;
  }
  if (p.qzeros && p.qzeros_row_stride < (p.N + 7) / 8) return Status::kInvalidArgument;
  if (!p.g_idx) {
    // (K - 1) / gs + 1, not (K + gs - 1) / gs: the latter overflows for a group_size near 2^63.
    if (p.group_size <= 0 || (p.K - 1) / p.group_size + 1 != p.num_groups) {
      return Status::kInvalidArgument;
    }
  }
  return Status::kSuccess;
}

Status int4_dequantize_cpu(const Int4DequantizeParams& p, const CpuThreadPool* pool) {
  const Status s = int4_dequantize_check(p);
  if (s != Status::kSuccess || p.K == 0 || p.N == 0) return s;
  if (p.g_idx) {
    for (int64_t k = 0; k < p.K; ++k) {
      if (p.g_idx[k] < 0 || p.g_idx[k] >= p.num_groups) return Status::kInvalidArgument;
    }
  }
  const CpuIsa isa = active_cpu_isa();
  const RowsFn fn = pick(isa);
  const cpu::ConvertFn convert = cpu::converter(p.out_dtype, isa);
  // At least 16 packed rows (128 rows of K: one group) per task, so each task widens the scales
  // of a group once; more for narrow matrices so that a task is worth the pool's overhead.
  const int64_t rows = p.K / 8;
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(p.N, 1));
  parallel_for(pool, 0, rows, grain, [&](int64_t r0, int64_t r1) { fn(p, r0, r1, convert); });
  return Status::kSuccess;
}

}  // namespace bitpress
