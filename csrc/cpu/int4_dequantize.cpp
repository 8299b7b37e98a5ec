// CPU kernel of int4_dequantize (see bitpress/int4_dequantize.h for the formula and layouts).
//
// One body, compiled three times: plain, and inside functions with the AVX2 and AVX-512 target
// attributes, so that the compiler vectorizes the N loop for each ISA; the run-time choice comes
// from active_cpu_isa(). Work is split over packed rows (8 rows of K each).
#include <cmath>

#include "bitpress/int4.h"
#include "bitpress/int4_dequantize.h"

namespace bitpress {
namespace {

template <DType T>
struct Elem;
template <>
struct Elem<DType::kFloat32> {
  using type = float;
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};
template <>
struct Elem<DType::kFloat16> {
  using type = uint16_t;
  static inline float load(uint16_t v) { return half_bits_to_float(v); }
  static inline uint16_t store(float v) { return float_to_half_bits(v); }
};
template <>
struct Elem<DType::kBFloat16> {
  using type = uint16_t;
  static inline float load(uint16_t v) { return bf16_bits_to_float(v); }
  static inline uint16_t store(float v) { return float_to_bf16_bits(v); }
};

template <DType S, DType O>
__attribute__((always_inline)) inline void dequant_rows(const Int4DequantizeParams& p,
                                                        int64_t r0, int64_t r1) {
  using ST = typename Elem<S>::type;
  using OT = typename Elem<O>::type;
  const ST* scales = static_cast<const ST*>(p.scales);
  OT* out = static_cast<OT*>(p.out);
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* qrow = reinterpret_cast<const uint32_t*>(p.qweight + r * p.qweight_row_stride);
    for (int j = 0; j < 8; ++j) {
      const int64_t k = 8 * r + j;
      const int64_t g = int4_group_of(k, p.g_idx, p.group_size);
      const ST* srow = scales + g * p.scales_row_stride;
      const uint32_t* zrow =
          p.qzeros ? reinterpret_cast<const uint32_t*>(p.qzeros + g * p.qzeros_row_stride) : nullptr;
      OT* orow = out + k * p.out_row_stride;
      for (int64_t n = 0; n < p.N; ++n) {
        const int q = unpack_nibble(qrow[n], j);
        const int z = zrow ? unpack_nibble(zrow[n >> 3], int(n & 7)) : kInt4SymmetricZero;
        orow[n] = Elem<O>::store(float(q - z) * Elem<S>::load(srow[n]));
      }
    }
  }
}

using RowsFn = void (*)(const Int4DequantizeParams&, int64_t, int64_t);

template <DType S, DType O>
void rows_scalar(const Int4DequantizeParams& p, int64_t r0, int64_t r1) {
  dequant_rows<S, O>(p, r0, r1);
}
#if defined(__x86_64__)
template <DType S, DType O>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const Int4DequantizeParams& p, int64_t r0,
                                                       int64_t r1) {
  dequant_rows<S, O>(p, r0, r1);
}
template <DType S, DType O>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void rows_avx512(
    const Int4DequantizeParams& p, int64_t r0, int64_t r1) {
  dequant_rows<S, O>(p, r0, r1);
}
#endif

template <DType S, DType O>
RowsFn pick(CpuIsa isa) {
#if defined(__x86_64__)
  if (isa == CpuIsa::kAvx512) return rows_avx512<S, O>;
  if (isa == CpuIsa::kAvx2) return rows_avx2<S, O>;
#endif
  (void)isa;
  return rows_scalar<S, O>;
}

template <DType S>
RowsFn pick_out(DType out, CpuIsa isa) {
  switch (out) {
    case DType::kFloat32:
      return pick<S, DType::kFloat32>(isa);
    case DType::kFloat16:
      return pick<S, DType::kFloat16>(isa);
    case DType::kBFloat16:
      return pick<S, DType::kBFloat16>(isa);
  }
  return nullptr;
}

bool valid_dtype(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

}  // namespace

Status int4_dequantize_check(const Int4DequantizeParams& p) {
  if (p.K < 0 || p.N < 0 || p.K % 8 != 0) return Status::kInvalidArgument;
  if (!valid_dtype(p.scales_dtype) || !valid_dtype(p.out_dtype)) return Status::kInvalidArgument;
  if (p.K == 0 || p.N == 0) return Status::kSuccess;
  if (!p.qweight || !p.scales || !p.out || p.num_groups <= 0) return Status::kInvalidArgument;
  if (p.qweight_row_stride < p.N || p.scales_row_stride < p.N || p.out_row_stride < p.N) {
    return Status::kInvalidArgument;
  }
  if (p.qzeros && p.qzeros_row_stride < (p.N + 7) / 8) return Status::kInvalidArgument;
  if (!p.g_idx) {
    if (p.group_size <= 0 || (p.K + p.group_size - 1) / p.group_size != p.num_groups) {
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
  RowsFn fn = nullptr;
  switch (p.scales_dtype) {
    case DType::kFloat32:
      fn = pick_out<DType::kFloat32>(p.out_dtype, isa);
      break;
    case DType::kFloat16:
      fn = pick_out<DType::kFloat16>(p.out_dtype, isa);
      break;
    case DType::kBFloat16:
      fn = pick_out<DType::kBFloat16>(p.out_dtype, isa);
      break;
  }
  // ~32 KiB of output per task at N = 4096 bf16: big enough to amortize the pool's overhead.
  const int64_t rows = p.K / 8;
  const int64_t grain = p.N >= 4096 ? 1 : (4096 + p.N - 1) / p.N;
  parallel_for(pool, 0, rows, grain, [&](int64_t r0, int64_t r1) { fn(p, r0, r1); });
  return Status::kSuccess;
}

}  // namespace bitpress
