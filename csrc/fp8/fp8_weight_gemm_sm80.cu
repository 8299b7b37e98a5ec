// CUDA kernels of fp8_weight_gemm (contract: bitpress/fp8/fp8_weight_gemm_cuda.h; decode and index
// math: bitpress/fp8/fp8_mma_dequant.h, unit-tested on the CPU by tests/cpp/test_fp8_mma.cpp;
// PTX wrappers: bitpress/cuda/primitives.cuh). The structure of the INT4 kernel
// (csrc/int4/int4_gemm_sm80.cu) with an E4M3 decode, reading W [N, K] rows as checkpoints hold
// them: a row of W is K-major, which is the "col" B operand of mma.sync as it is, so no repacked
// layout is needed (the mma's k order inside a 16-k step is permuted instead, in A and B alike).
//
//   * block = 256 threads, tile BM x BN = 16 MT x 128 (MT = 1, 2, 4 m16 tiles, by M), stages of
//     BK = 128; grid (ceil(N/128), ceil(M/BM), S splits of K).
//   * every stage (W: 128 rows x 128 bytes = 16 KiB, x: BM x 128 halves) is copied global -> shared
//     with 16-byte cp.async.cg (L2 only: each weight byte is used by one block), kStages deep, so
//     that HBM reads of the next stages overlap the decode and tensor-core work of this one. At
//     M <= 64 the kernel is bound by the weight stream (1 byte per weight): 4 stages x 16 KiB
//     keep ~64 KiB in flight per block.
//   * warp (wn, wk): 64 columns wn of the block, k-slice wk (32 k) of each stage. B: one LDS.64
//     per n8-block (8 codes of one weight row), decoded by fp8_mma_decode4 (prmt, shift, lop3,
//     one packed multiply); A: one LDS.128 per row g and g + 8 of each m16 tile; 2 x 8 x MT
//     mma.sync.m16n8k16 per warp and stage, fp32 accumulators.
//   * scales: tensor / channel multiply the fp32 sums once in the epilogue; 128 x 128 blocks:
//     a stage of a block is exactly one scale block (BN = BK = 128, both aligned), so each warp
//     sums a stage's two k16 steps into a temporary and adds it times the block's scale (fp32,
//     DeepSeek-V3's promotion, without decoded values ever being rescaled).
//   * the 4 k-warps of an n-half add their accumulators through shared memory at the end; the
//     result gets bias and one rounding (S == 1), or goes to fp32 partials for the reduction
//     kernel (S > 1).
// Shared memory: MT = 1: 80 KiB (4 stages; two blocks per SM on sm_80 / sm_90), MT = 2: 96 KiB
// (4 stages), MT = 4: 96 KiB (3 stages), under the 99 KiB per-block limit of sm_86 / sm_89.
#include <cuda_runtime.h>

#include <atomic>

#include "bitpress/cuda/primitives.cuh"
#include "bitpress/fp8/fp8_mma_dequant.h"
#include "bitpress/fp8/fp8_weight_gemm_cuda.h"

namespace bitpress {
namespace {

constexpr int kThreads = kFp8GemmThreads;

template <int MT>
struct TileConfig {
  static constexpr int kStages = MT == 4 ? 3 : 4;
  static constexpr int kBChunks = kFp8GemmBN * kFp8GemmBK / kFp8GemmChunk;  // 1024: 16 KiB
  static constexpr int kAChunks = 16 * MT * 16;                             // BM x 256 B
  static constexpr int kSlotChunks = kBChunks + kAChunks;
  static constexpr int kSmemBytes = kStages * kSlotChunks * kFp8GemmChunk;
  static constexpr int kAccPerLane = MT * 8 * 4;
  // Two reduction buffers of (2 n-halves x 32 lanes x kAccPerLane) floats reuse the stages.
  static constexpr int kRedBytes = 2 * 2 * 32 * kAccPerLane * 4;
  static_assert(kRedBytes <= kSmemBytes, "reduction buffers must fit in the pipeline's smem");
  static_assert(kBChunks == 4 * kThreads, "W loader: four chunks per thread");
  static_assert(kSmemBytes <= 99 * 1024, "sm_86 / sm_89 allow 99 KiB per block");
};

struct GemmArgs {
  const uint16_t* x;
  int64_t x_row_stride, M;
  const uint8_t* w;
  int64_t w_row_stride;
  const float* w_scale;
  int64_t scale_n_stride;  // channel: 1, tensor: 0 (epilogue scale w_scale[n * stride])
  int64_t scale_kb;        // block: scale blocks along K (row length of w_scale)
  const void* bias;
  DType bias_dtype;
  uint16_t* out;
  int64_t out_row_stride;
  float* partials;  // [S, M, N] when S > 1
  int64_t N, K, stages;
  int splits;
};

template <DType T, int MT, bool kBlock>
__device__ __forceinline__ void gemm_body(const GemmArgs& a) {
  using Cfg = TileConfig<MT>;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ int4 smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp & 1, wk = warp >> 1;
  const int64_t nb = blockIdx.x;
  const int64_t n0 = nb * kFp8GemmBN;
  const int64_t m0 = int64_t(blockIdx.y) * 16 * MT;
  const int split = blockIdx.z;
  int64_t st_begin, st_end;
  fp8_gemm_split_range(a.stages, a.splits, split, &st_begin, &st_end);
  const int n_iters = int(st_end - st_begin);
  const bool warp_has_n = n0 + 64 * wn < a.N;

  auto load_stage = [&](int64_t st, int slot) {
    int4* sB = smem + slot * Cfg::kSlotChunks;
    int4* sA = sB + Cfg::kBChunks;
    const int64_t k0 = st * kFp8GemmBK;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int row, ch;
      fp8_gemm_b_load_coords(tid + kThreads * j, &row, &ch);
      const int64_t n = n0 + row, k = k0 + 16 * ch;
      const bool valid = n < a.N && k < a.K;
      const uint8_t* src = valid ? a.w + n * a.w_row_stride + k : a.w;
      cp_async16(sB + fp8_gemm_b_smem_chunk(row, ch), src, valid);
    }
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      int row, ch;
      fp8_gemm_a_load_coords(tid + kThreads * j, &row, &ch);
      const int64_t m = m0 + row, k = k0 + 8 * ch;
      const bool valid = m < a.M && k < a.K;
      const uint16_t* src = valid ? a.x + m * a.x_row_stride + k : a.x;
      cp_async16(sA + fp8_gemm_a_smem_chunk(row, ch), src, valid);
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][j][i] = 0.f;

  auto compute_stage = [&](int64_t st, int slot) {
    if (!warp_has_n || st * kFp8GemmBK + 32 * wk >= a.K) return;  // warp-uniform
    const int4* sB = smem + slot * Cfg::kSlotChunks;
    const int4* sA = sB + Cfg::kBChunks;
    uint32_t af[MT][2][4];  // [m-tile][k16 step][a0a1, a2a3, a4a5, a6a7]
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      const int ch = fp8_gemm_a_lane_chunk(wk, lane);
      const uint4 lo =
          *reinterpret_cast<const uint4*>(sA + fp8_gemm_a_smem_chunk(16 * mi + (lane >> 2), ch));
      const uint4 hi = *reinterpret_cast<const uint4*>(
          sA + fp8_gemm_a_smem_chunk(16 * mi + (lane >> 2) + 8, ch));
      af[mi][0][0] = lo.x;
      af[mi][0][1] = hi.x;
      af[mi][0][2] = lo.y;
      af[mi][0][3] = hi.y;
      af[mi][1][0] = lo.z;
      af[mi][1][1] = hi.z;
      af[mi][1][2] = lo.w;
      af[mi][1][3] = hi.w;
    }
    float bscale = 1.f;
    if constexpr (kBlock) bscale = __ldg(a.w_scale + nb * a.scale_kb + st);
    const char* sBb = reinterpret_cast<const char*>(sB);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint2 wv =
          *reinterpret_cast<const uint2*>(sBb + fp8_gemm_b_lane_offset(wn, wk, j, lane));
      uint32_t b[2][2];
      fp8_mma_decode4<T>(wv.x, b[0]);
      fp8_mma_decode4<T>(wv.y, b[1]);
      if constexpr (kBlock) {
        float tmp[MT][4];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
          for (int i = 0; i < 4; ++i) tmp[mi][i] = 0.f;
#pragma unroll
          for (int s = 0; s < 2; ++s) mma_m16n8k16<T>(tmp[mi], af[mi][s], b[s][0], b[s][1]);
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mi][j][i] = fmaf(bscale, tmp[mi][i], acc[mi][j][i]);
        }
      } else {
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int s = 0; s < 2; ++s) mma_m16n8k16<T>(acc[mi][j], af[mi][s], b[s][0], b[s][1]);
      }
    }
  };

  // Pipeline: kStages - 1 stages in flight while one is computed. The slot refilled at iteration
  // it was computed at it - 1; the __syncthreads after the wait orders every warp's reads of it
  // before the new cp.async writes. Empty groups are committed past the end so that wait_group
  // always counts the same.
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < n_iters) load_stage(st_begin + i, i);
    cp_async_commit();
  }
  int slot_c = 0, slot_l = kStages - 1;
  for (int it = 0; it < n_iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < n_iters) load_stage(st_begin + it + kStages - 1, slot_l);
    cp_async_commit();
    compute_stage(st_begin + it, slot_c);
    slot_c = slot_c + 1 == kStages ? 0 : slot_c + 1;
    slot_l = slot_l + 1 == kStages ? 0 : slot_l + 1;
  }
  cp_async_wait<0>();
  __syncthreads();

  // Sum of the 4 k-warps of each n-half: wk 2, 3 -> wk 0, 1, then wk 1 -> wk 0. Lane-minor
  // layout: consecutive lanes hit consecutive banks.
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kPer = Cfg::kAccPerLane;
  auto buf = [&](int b) { return red + (b * 2 + wn) * kPer * 32 + lane; };
  auto store_acc = [&](float* dst) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[((mi * 8 + j) * 4 + i) * 32] = acc[mi][j][i];
  };
  auto add_acc = [&](const float* src) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mi][j][i] += src[((mi * 8 + j) * 4 + i) * 32];
  };
  if (wk >= 2) store_acc(buf(wk - 2));
  __syncthreads();
  if (wk < 2) add_acc(buf(wk));
  __syncthreads();
  if (wk == 1) store_acc(buf(0));
  __syncthreads();
  if (wk != 0 || !warp_has_n) return;
  add_acc(buf(0));

#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int row, col;
      fp8_gemm_c_coords(lane, j, i, &row, &col);
      const int64_t n = n0 + 64 * wn + col;
      if (n >= a.N) continue;
      const float s = kBlock ? 1.f : __ldg(a.w_scale + n * a.scale_n_stride);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        const int64_t m = m0 + 16 * mi + row;
        if (m >= a.M) continue;
        const float v = kBlock ? acc[mi][j][i] : acc[mi][j][i] * s;
        if (a.splits == 1) {
          a.out[m * a.out_row_stride + n] = fp8_gemm_epilogue<T>(v, a.bias, a.bias_dtype, n);
        } else {
          a.partials[(int64_t(split) * a.M + m) * a.N + n] = v;
        }
      }
    }
  }
}

// MT = 2, 4 (64 / 128 fp32 accumulators per thread, 96 KiB of smem) run one block per SM and may
// use up to 255 registers; MT = 1 (80 KiB) fits two blocks per SM on sm_80 / sm_90 (164 / 228
// KiB), which needs <= 128 registers (64 K registers / 512 threads).
template <int MT, bool kBlock>
__global__ void __launch_bounds__(kThreads, MT == 1 ? 2 : 1)
    sm80_f16_fp8_weight_gemm_kernel(const GemmArgs a) {
  gemm_body<DType::kFloat16, MT, kBlock>(a);
}
template <int MT, bool kBlock>
__global__ void __launch_bounds__(kThreads, MT == 1 ? 2 : 1)
    sm80_bf16_fp8_weight_gemm_kernel(const GemmArgs a) {
  gemm_body<DType::kBFloat16, MT, kBlock>(a);
}

// Split-K reduction: y[m, n] = round(sum_s partials[s, m, n] + bias[n]), s in order.
template <DType T>
__global__ void __launch_bounds__(kThreads)
    fp8_weight_gemm_reduce_kernel(const float* partials, int splits, int64_t M, int64_t N,
                                  const void* bias, DType bias_dtype, uint16_t* out,
                                  int64_t out_row_stride) {
  const int64_t total = M * N;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t m = i / N, n = i - m * N;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partials[int64_t(s) * total + i];
    out[m * out_row_stride + n] = fp8_gemm_epilogue<T>(v, bias, bias_dtype, n);
  }
}

// ----- dense dequantization (large-M path) -----

// One thread per 16 codes of a row (one 16-byte load): decoded exactly (to bf16, a superset of
// E4M3, then widened), times the scale in fp32, rounded once to O.
template <DType O>
__global__ void __launch_bounds__(kThreads)
    fp8_weight_dequantize_kernel(const Fp8WeightDequantizeCudaParams p) {
  const int64_t per_row = p.K / 16, total = p.N * per_row;
  const int64_t kb = (p.K + 127) / 128;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t n = i / per_row, k0 = (i - n * per_row) * 16;
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p.w + n * p.w_row_stride + k0));
    const float s = p.scale_layout == Fp8ScaleLayout::kTensor ? __ldg(p.w_scale)
                    : p.scale_layout == Fp8ScaleLayout::kRow
                        ? __ldg(p.w_scale + n)
                        : __ldg(p.w_scale + (n / 128) * kb + k0 / 128);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    float f[16];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      float g[4];
      fp8_dequant4_float(words[q], s, g);
#pragma unroll
      for (int h = 0; h < 4; ++h) f[4 * q + h] = g[h];
    }
    if constexpr (O == DType::kFloat32) {
      float4* dst =
          reinterpret_cast<float4*>(static_cast<float*>(p.out) + n * p.out_row_stride + k0);
#pragma unroll
      for (int q = 0; q < 4; ++q)
        dst[q] = make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
    } else {
      uint32_t h[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        h[q] = uint32_t(fp8_gemm_epilogue<O>(f[2 * q], nullptr, DType::kFloat32, 0)) |
               uint32_t(fp8_gemm_epilogue<O>(f[2 * q + 1], nullptr, DType::kFloat32, 0)) << 16;
      }
      uint4* dst =
          reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.out) + n * p.out_row_stride + k0);
      dst[0] = make_uint4(h[0], h[1], h[2], h[3]);
      dst[1] = make_uint4(h[4], h[5], h[6], h[7]);
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <DType T, int MT, bool kBlock>
Status launch_gemm(const GemmArgs& a, int64_t n_blocks, int64_t m_blocks, cudaStream_t stream) {
  using Cfg = TileConfig<MT>;
  auto* kernel = T == DType::kFloat16 ? sm80_f16_fp8_weight_gemm_kernel<MT, kBlock>
                                      : sm80_bf16_fp8_weight_gemm_kernel<MT, kBlock>;
  // Above 48 KiB of dynamic shared memory needs the opt-in, a per-device function attribute: set
  // once per device, so that a captured call (CUDA graphs) after a warm-up issues only launches.
  static std::atomic<uint64_t> opted_in{0};
  int device = 0;
  if (cuda_call_status(cudaGetDevice(&device)) != Status::kSuccess) return Status::kCudaError;
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit == 0 || (opted_in.load(std::memory_order_relaxed) & bit) == 0) {
    const Status s = cuda_call_status(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
    if (s != Status::kSuccess) return s;
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  const dim3 grid(unsigned(n_blocks), unsigned(m_blocks), unsigned(a.splits));
  kernel<<<grid, kThreads, Cfg::kSmemBytes, stream>>>(a);
  return cuda_launch_status();
}

template <DType T, bool kBlock>
Status launch_gemm_mt(const GemmArgs& a, int mt, int64_t n_blocks, int64_t m_blocks,
                      cudaStream_t stream) {
  switch (mt) {
    case 1:
      return launch_gemm<T, 1, kBlock>(a, n_blocks, m_blocks, stream);
    case 2:
      return launch_gemm<T, 2, kBlock>(a, n_blocks, m_blocks, stream);
    default:
      return launch_gemm<T, 4, kBlock>(a, n_blocks, m_blocks, stream);
  }
}

template <DType T>
Status launch_gemm_scale(const GemmArgs& a, bool block, int mt, int64_t n_blocks, int64_t m_blocks,
                         cudaStream_t stream) {
  return block ? launch_gemm_mt<T, true>(a, mt, n_blocks, m_blocks, stream)
               : launch_gemm_mt<T, false>(a, mt, n_blocks, m_blocks, stream);
}

Status check(const Fp8WeightGemmCudaParams& p) {
  if (p.x_dtype != DType::kFloat16 && p.x_dtype != DType::kBFloat16) {
    return Status::kInvalidArgument;
  }
  if (p.scale_layout != Fp8ScaleLayout::kTensor && p.scale_layout != Fp8ScaleLayout::kRow &&
      p.scale_layout != Fp8ScaleLayout::kBlock) {
    return Status::kInvalidArgument;
  }
  if (p.M < 0 || p.K < 0 || p.N < 0 || p.K % 16 != 0) return Status::kInvalidArgument;
  if (p.bias != nullptr && !dtype_valid(p.bias_dtype)) return Status::kInvalidArgument;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  if (p.num_sms <= 0 || p.out == nullptr || p.out_row_stride < p.N || p.w_scale == nullptr) {
    return Status::kInvalidArgument;
  }
  if (p.K > 0) {
    if (p.w == nullptr || p.x == nullptr || !aligned16(p.w) || !aligned16(p.x)) {
      return Status::kInvalidArgument;
    }
    if (p.w_row_stride < p.K || p.w_row_stride % 16 != 0 || p.x_row_stride % 8 != 0 ||
        (p.M > 1 && p.x_row_stride < p.K)) {
      return Status::kInvalidArgument;
    }
  }
  const int64_t bm = 16 * int64_t(fp8_weight_gemm_cuda_m_tiles(p.M));
  if ((p.M + bm - 1) / bm > 65535 || (p.N + 127) / 128 > 0x7fffffff) {
    return Status::kInvalidArgument;
  }
  const size_t ws = fp8_weight_gemm_cuda_workspace_size(p);
  if (ws > 0 && (p.workspace == nullptr || p.workspace_bytes < ws ||
                 (reinterpret_cast<uintptr_t>(p.workspace) & 255u) != 0)) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

}  // namespace

Status fp8_weight_gemm_cuda(const Fp8WeightGemmCudaParams& p, void* stream) {
  const Status s = check(p);
  if (s != Status::kSuccess || p.M == 0 || p.N == 0) return s;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int S = fp8_weight_gemm_cuda_splits(p.M, p.K, p.N, p.num_sms);

  GemmArgs a{};
  a.x = static_cast<const uint16_t*>(p.x);
  a.x_row_stride = p.x_row_stride;
  a.M = p.M;
  a.w = p.w;
  a.w_row_stride = p.w_row_stride;
  a.w_scale = p.w_scale;
  a.scale_n_stride = p.scale_layout == Fp8ScaleLayout::kRow ? 1 : 0;
  a.scale_kb = (p.K + 127) / 128;
  a.bias = p.bias;
  a.bias_dtype = p.bias_dtype;
  a.out = static_cast<uint16_t*>(p.out);
  a.out_row_stride = p.out_row_stride;
  a.partials = S > 1 ? static_cast<float*>(p.workspace) : nullptr;
  a.N = p.N;
  a.K = p.K;
  a.stages = (p.K + kFp8GemmBK - 1) / kFp8GemmBK;
  a.splits = S;

  const int mt = fp8_weight_gemm_cuda_m_tiles(p.M);
  const int64_t n_blocks = (p.N + kFp8GemmBN - 1) / kFp8GemmBN;
  const int64_t m_blocks = (p.M + 16 * mt - 1) / (16 * mt);
  const bool block = p.scale_layout == Fp8ScaleLayout::kBlock;
  const Status g = p.x_dtype == DType::kFloat16
                       ? launch_gemm_scale<DType::kFloat16>(a, block, mt, n_blocks, m_blocks, st)
                       : launch_gemm_scale<DType::kBFloat16>(a, block, mt, n_blocks, m_blocks, st);
  if (g != Status::kSuccess || S == 1) return g;

  const int64_t total = p.M * p.N;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = unsigned(blocks < 65535 ? blocks : 65535);
  auto* reduce = p.x_dtype == DType::kFloat16 ? fp8_weight_gemm_reduce_kernel<DType::kFloat16>
                                              : fp8_weight_gemm_reduce_kernel<DType::kBFloat16>;
  reduce<<<grid, kThreads, 0, st>>>(a.partials, S, p.M, p.N, p.bias, p.bias_dtype, a.out,
                                    p.out_row_stride);
  return cuda_launch_status();
}

namespace {

template <DType O>
Status launch_dequantize(const Fp8WeightDequantizeCudaParams& p, cudaStream_t st) {
  const int64_t total = p.N * (p.K / 16);
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  fp8_weight_dequantize_kernel<O>
      <<<unsigned(blocks < 1048576 ? blocks : 1048576), kThreads, 0, st>>>(p);
  return cuda_launch_status();
}

}  // namespace

Status fp8_weight_dequantize_cuda(const Fp8WeightDequantizeCudaParams& p, void* stream) {
  if (!dtype_valid(p.out_dtype) || p.N < 0 || p.K < 0 || p.K % 16 != 0) {
    return Status::kInvalidArgument;
  }
  if (p.scale_layout != Fp8ScaleLayout::kTensor && p.scale_layout != Fp8ScaleLayout::kRow &&
      p.scale_layout != Fp8ScaleLayout::kBlock) {
    return Status::kInvalidArgument;
  }
  if (p.N == 0 || p.K == 0) return Status::kSuccess;
  const int64_t align = p.out_dtype == DType::kFloat32 ? 4 : 8;  // 16 bytes of output
  if (p.w == nullptr || p.w_scale == nullptr || p.out == nullptr || !aligned16(p.w) ||
      !aligned16(p.out) || p.w_row_stride < p.K || p.w_row_stride % 16 != 0 ||
      p.out_row_stride < p.K || p.out_row_stride % align != 0) {
    return Status::kInvalidArgument;
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (p.out_dtype) {
    case DType::kFloat32:
      return launch_dequantize<DType::kFloat32>(p, st);
    case DType::kFloat16:
      return launch_dequantize<DType::kFloat16>(p, st);
    default:
      return launch_dequantize<DType::kBFloat16>(p, st);
  }
}

}  // namespace bitpress
