// CUDA kernel of int4_dequantize (see bitpress/int4/int4_dequantize.h for the formula and layouts).
//
// One thread per packed word qweight[r, n]: it reads the word once and writes the 8 rows
// k = 8r..8r+7 of column n. Consecutive threads take consecutive n, so every load and store of a
// warp is coalesced. The arithmetic and the rounding are the shared helpers the CPU kernel uses,
// so both produce the same bits.
#include <cuda_runtime.h>

#include "bitpress/cuda/primitives.cuh"
#include "bitpress/int4/int4.h"
#include "bitpress/int4/int4_dequantize.h"

namespace bitpress {
namespace {

template <DType T>
struct Elem;
template <>
struct Elem<DType::kFloat32> {
  using type = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Elem<DType::kFloat16> {
  using type = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) { return half_bits_to_float(v); }
  static __device__ __forceinline__ uint16_t store(float v) { return float_to_half_bits(v); }
};
template <>
struct Elem<DType::kBFloat16> {
  using type = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) { return bf16_bits_to_float(v); }
  static __device__ __forceinline__ uint16_t store(float v) { return float_to_bf16_bits(v); }
};

constexpr int kThreads = 128;

template <DType S, DType O>
__global__ void __launch_bounds__(kThreads) int4_dequantize_kernel(const Int4DequantizeParams p) {
  using ST = typename Elem<S>::type;
  using OT = typename Elem<O>::type;
  const int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= p.N) return;
  const ST* scales = static_cast<const ST*>(p.scales);
  OT* out = static_cast<OT*>(p.out);
  const uint32_t* qzeros = reinterpret_cast<const uint32_t*>(p.qzeros);
  for (int64_t r = blockIdx.y; r < p.K / 8; r += gridDim.y) {
    const uint32_t word =
        __ldg(reinterpret_cast<const uint32_t*>(p.qweight) + r * p.qweight_row_stride + n);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t k = 8 * r + j;
      const int64_t g = int4_group_of(k, p.g_idx, p.group_size);
      float v;
      if (g < 0 || g >= p.num_groups) {
        v = __int_as_float(0x7fffffff);  // corrupt g_idx: NaN, never a plausible weight
      } else {
        const int z =
            qzeros ? unpack_nibble(__ldg(qzeros + g * p.qzeros_row_stride + (n >> 3)), int(n & 7))
                   : kInt4SymmetricZero;
        const float s = Elem<S>::load(__ldg(scales + g * p.scales_row_stride + n));
        v = float(unpack_nibble(word, j) - z) * s;
      }
      out[k * p.out_row_stride + n] = Elem<O>::store(v);
    }
  }
}

template <DType S, DType O>
Status launch(const Int4DequantizeParams& p, cudaStream_t stream) {
  const unsigned rows = unsigned(p.K / 8);
  const dim3 grid(unsigned((p.N + kThreads - 1) / kThreads), rows < 65535u ? rows : 65535u);
  int4_dequantize_kernel<S, O><<<grid, kThreads, 0, stream>>>(p);
  return cuda_launch_status();
}

template <DType S>
Status launch_out(const Int4DequantizeParams& p, cudaStream_t stream) {
  switch (p.out_dtype) {
    case DType::kFloat32:
      return launch<S, DType::kFloat32>(p, stream);
    case DType::kFloat16:
      return launch<S, DType::kFloat16>(p, stream);
    case DType::kBFloat16:
      return launch<S, DType::kBFloat16>(p, stream);
    default:
      return Status::kInvalidArgument;
  }
}

}  // namespace

Status int4_dequantize_cuda(const Int4DequantizeParams& p, void* stream) {
  const Status s = int4_dequantize_check(p);
  if (s != Status::kSuccess || p.K == 0 || p.N == 0) return s;
  if ((p.N + kThreads - 1) / kThreads > 0x7fffffff) return Status::kInvalidArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (p.scales_dtype) {
    case DType::kFloat32:
      return launch_out<DType::kFloat32>(p, st);
    case DType::kFloat16:
      return launch_out<DType::kFloat16>(p, st);
    case DType::kBFloat16:
      return launch_out<DType::kBFloat16>(p, st);
    default:
      return Status::kInvalidArgument;
  }
}

}  // namespace bitpress
