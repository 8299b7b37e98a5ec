// CUDA kernels of fp8_quantize (contract and formula: bitpress/fp8/fp8_quantize_cuda.h and
// bitpress/fp8/fp8_quantize.h). Memory-bound elementwise work: every kernel reads x once from
// HBM (a segment's second read, for the codes after its amax, hits L1) and writes one byte per
// element.
//
// Encoding: sm_89 and newer have cvt.rn.satfinite.e4m3x2.f32 (round to nearest even, saturate to
// +-448), used on the sm_90a image, with the NaN sign fixed up (fp8.h keeps a NaN's sign, as
// torch's cast does); the sm_80 image (which sm_86 / sm_89 run too) uses fp8.h's float_to_e4m3,
// bit-exact software RNE and saturation (tested on the CPU against torch by branch fp8's tests).
// The GPU tests (tests/fp8/test_fp8_quantize_cuda.py) compare both images' codes with the
// reference bit for bit.
#include <cuda_runtime.h>

#include "bitpress/cuda/primitives.cuh"
#include "bitpress/fp8/fp8.h"
#include "bitpress/fp8/fp8_quantize_cuda.h"

namespace bitpress {
namespace {

constexpr int kThreads = 256;

template <DType X>
__device__ __forceinline__ float load_x(const void* x, int64_t i) {
  if constexpr (X == DType::kFloat32) {
    return static_cast<const float*>(x)[i];
  } else if constexpr (X == DType::kFloat16) {
    return half_bits_to_float(static_cast<const uint16_t*>(x)[i]);
  } else {
    return bf16_bits_to_float(static_cast<const uint16_t*>(x)[i]);
  }
}

__device__ __forceinline__ uint8_t encode(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.f), "f"(v));
  const uint8_t code = uint8_t(pair & 0xFFu);
  // NaN in, NaN out; keep its sign.
  return v != v ? uint8_t((float_bits(v) >> 24 & 0x80u) | kE4M3NaNCode) : code;
#else
  return float_to_e4m3(v);
#endif
}

// |x| as ordered bits (see the header): max over them is a NaN-propagating amax.
__device__ __forceinline__ uint32_t abs_bits(float v) { return float_bits(v) & 0x7FFFFFFFu; }

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

__device__ __forceinline__ float scale_from_amax_bits(uint32_t amax) {
  const float s = bits_float(amax) / kE4M3Max;
  return s < kFp8MinScale ? kFp8MinScale : s;  // a NaN amax keeps its NaN scale
}

// One warp per segment: segment i is row r = i / nseg_per_row, columns [c0, c0 + len) with c0 =
// (i % nseg_per_row) * seg_cols. kRow: seg_cols = K (one segment a row); kBlock 1 x bc: seg_cols
// = bc, the scale index r * scale_row_stride + i % nseg_per_row.
template <DType X>
__global__ void __launch_bounds__(kThreads)
    fp8_quantize_rows_kernel(const Fp8QuantizeParams p, int64_t seg_cols, int64_t nseg_per_row) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  const int64_t nseg = p.R * nseg_per_row;
  for (int64_t i = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5); i < nseg;
       i += warps) {
    const int64_t r = i / nseg_per_row, sb = i - r * nseg_per_row;
    const int64_t c0 = sb * seg_cols;
    const int64_t c1 = c0 + seg_cols < p.K ? c0 + seg_cols : p.K;
    const int64_t xo = r * p.x_row_stride;
    float* sp = p.scale + r * p.scale_row_stride + (nseg_per_row > 1 ? sb : 0);
    float s;
    if (p.static_scale) {
      s = *sp;
    } else {
      uint32_t m = 0;
      for (int64_t c = c0 + lane; c < c1; c += 32) m = max(m, abs_bits(load_x<X>(p.x, xo + c)));
      s = scale_from_amax_bits(warp_max(m));
      if (lane == 0) *sp = s;
    }
    uint8_t* q = p.q + r * p.q_row_stride;
    for (int64_t c = c0 + lane; c < c1; c += 32) q[c] = encode(load_x<X>(p.x, xo + c) / s);
  }
}

// One block per block_rows x block_cols scale block.
template <DType X>
__global__ void __launch_bounds__(kThreads)
    fp8_quantize_blocks_kernel(const Fp8QuantizeParams p, int64_t nbc) {
  __shared__ uint32_t red[kThreads / 32];
  __shared__ float s_sh;
  const int64_t b = blockIdx.x;
  const int64_t br = b / nbc, bc = b - br * nbc;
  const int64_t r0 = br * p.block_rows, c0 = bc * p.block_cols;
  const int64_t r1 = r0 + p.block_rows < p.R ? r0 + p.block_rows : p.R;
  const int64_t c1 = c0 + p.block_cols < p.K ? c0 + p.block_cols : p.K;
  // A warp per row of the block, its lanes along the row: no 64-bit division in the loops.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* sp = p.scale + br * p.scale_row_stride + bc;
  if (p.static_scale) {
    if (threadIdx.x == 0) s_sh = *sp;
  } else {
    uint32_t m = 0;
    for (int64_t r = r0 + warp; r < r1; r += kThreads / 32) {
      for (int64_t c = c0 + lane; c < c1; c += 32) {
        m = max(m, abs_bits(load_x<X>(p.x, r * p.x_row_stride + c)));
      }
    }
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
      m = threadIdx.x < kThreads / 32 ? red[threadIdx.x] : 0u;
      m = warp_max(m);
      if (threadIdx.x == 0) {
        s_sh = scale_from_amax_bits(m);
        *sp = s_sh;
      }
    }
  }
  __syncthreads();
  const float s = s_sh;
  const int nr = int(r1 - r0), nc = int(c1 - c0);
  for (int rr = warp; rr < nr; rr += kThreads / 32) {
    const int64_t r = r0 + rr;
    const void* xr = static_cast<const char*>(p.x) + (r * p.x_row_stride + c0) * dtype_size(X);
    uint8_t* qr = p.q + r * p.q_row_stride + c0;
    for (int cc = lane; cc < nc; cc += 32) qr[cc] = encode(load_x<X>(xr, cc) / s);
  }
}

// Tensor amax into scale[0] (as bits; zeroed before): one atomicMax per warp.
template <DType X>
__global__ void __launch_bounds__(kThreads) fp8_quantize_amax_kernel(const Fp8QuantizeParams p) {
  const int64_t total = p.R * p.K;
  uint32_t m = 0;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t r = i / p.K, c = i - r * p.K;
    m = max(m, abs_bits(load_x<X>(p.x, r * p.x_row_stride + c)));
  }
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0 && m != 0) {
    atomicMax(reinterpret_cast<unsigned int*>(p.scale), m);
  }
}

__global__ void fp8_quantize_finalize_kernel(float* scale) {
  *scale = scale_from_amax_bits(float_bits(*scale));
}

// q = encode(x / scale[0]) elementwise.
template <DType X>
__global__ void __launch_bounds__(kThreads) fp8_quantize_tensor_kernel(const Fp8QuantizeParams p) {
  const float s = *p.scale;
  const int64_t total = p.R * p.K;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t r = i / p.K, c = i - r * p.K;
    p.q[r * p.q_row_stride + c] = encode(load_x<X>(p.x, r * p.x_row_stride + c) / s);
  }
}

unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t b = (items + per_block - 1) / per_block;
  return unsigned(b < 1 ? 1 : b < 65535 * 16 ? b : 65535 * 16);
}

template <DType X>
Status launch(const Fp8QuantizeParams& p, cudaStream_t st) {
  const int64_t total = p.R * p.K;
  switch (p.granularity) {
    case Fp8Granularity::kRow: {
      fp8_quantize_rows_kernel<X>
          <<<grid_for(p.R, kThreads / 32), kThreads, 0, st>>>(p, p.K > 0 ? p.K : 1, 1);
      return cuda_launch_status();
    }
    case Fp8Granularity::kBlock: {
      const int64_t nbc = (p.K + p.block_cols - 1) / p.block_cols;
      if (nbc == 0) return Status::kSuccess;  // no columns: no scales, no codes
      if (p.block_rows == 1) {
        fp8_quantize_rows_kernel<X>
            <<<grid_for(p.R * nbc, kThreads / 32), kThreads, 0, st>>>(p, p.block_cols, nbc);
        return cuda_launch_status();
      }
      const int64_t nbr = (p.R + p.block_rows - 1) / p.block_rows;
      if (nbr * nbc > 0x7fffffff) return Status::kInvalidArgument;
      fp8_quantize_blocks_kernel<X><<<unsigned(nbr * nbc), kThreads, 0, st>>>(p, nbc);
      return cuda_launch_status();
    }
    default: {
      if (!p.static_scale) {
        const Status ms = cuda_call_status(cudaMemsetAsync(p.scale, 0, sizeof(float), st));
        if (ms != Status::kSuccess) return ms;
        if (total > 0) {
          fp8_quantize_amax_kernel<X><<<grid_for(total, kThreads), kThreads, 0, st>>>(p);
          const Status as = cuda_launch_status();
          if (as != Status::kSuccess) return as;
        }
        fp8_quantize_finalize_kernel<<<1, 1, 0, st>>>(p.scale);
        const Status fs = cuda_launch_status();
        if (fs != Status::kSuccess || total == 0) return fs;
      }
      if (total == 0) return Status::kSuccess;
      fp8_quantize_tensor_kernel<X><<<grid_for(total, kThreads), kThreads, 0, st>>>(p);
      return cuda_launch_status();
    }
  }
}

Status check(const Fp8QuantizeParams& p) {
  if (!dtype_valid(p.x_dtype) || p.R < 0 || p.K < 0) return Status::kInvalidArgument;
  if (p.granularity != Fp8Granularity::kTensor && p.granularity != Fp8Granularity::kRow &&
      p.granularity != Fp8Granularity::kBlock) {
    return Status::kInvalidArgument;
  }
  if (p.granularity == Fp8Granularity::kBlock && (p.block_rows <= 0 || p.block_cols <= 0)) {
    return Status::kInvalidArgument;
  }
  const bool has_scales = p.granularity == Fp8Granularity::kTensor ||
                          (p.granularity == Fp8Granularity::kRow && p.R > 0) ||
                          (p.granularity == Fp8Granularity::kBlock && p.R > 0 && p.K > 0);
  if (has_scales && p.scale == nullptr) return Status::kInvalidArgument;
  if (p.R > 0 && p.K > 0) {
    if (p.x == nullptr || p.q == nullptr) return Status::kInvalidArgument;
    if (p.R > 1 && (p.x_row_stride < p.K || p.q_row_stride < p.K)) {
      return Status::kInvalidArgument;
    }
  }
  if (p.granularity == Fp8Granularity::kBlock && p.R > 0 && p.K > 0 &&
      p.scale_row_stride < (p.K + p.block_cols - 1) / p.block_cols) {
    return Status::kInvalidArgument;
  }
  if (p.granularity == Fp8Granularity::kRow && p.R > 1 && p.scale_row_stride < 1) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

}  // namespace

Status fp8_quantize_cuda(const Fp8QuantizeParams& p, void* stream) {
  const Status s = check(p);
  if (s != Status::kSuccess) return s;
  if (p.granularity != Fp8Granularity::kTensor && p.R == 0) return Status::kSuccess;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (p.x_dtype) {
    case DType::kFloat32:
      return launch<DType::kFloat32>(p, st);
    case DType::kFloat16:
      return launch<DType::kFloat16>(p, st);
    default:
      return launch<DType::kBFloat16>(p, st);
  }
}

}  // namespace bitpress
