// fp8_gemm on Hopper: E4M3 x E4M3 -> fp32 with wgmma (QGMMA), per-tensor / per-row / block scales.
// Contract in bitpress/fp8/fp8_gemm_cuda.h; index maps in bitpress/fp8/fp8_wgmma_layout.h; host
// emulation of this kernel in tests/cpp/test_fp8_wgmma.cpp. Built for sm_90a only (by its name).
//
// Design (and why):
//   * Block tile BM x 128 x 128 (M x N x K): BM = 128 (two consumer warpgroups, each its own m64
//     half, both reading the same B tile) when M > 64, else BM = 64 (one warpgroup). N = 128 is one
//     128-row block of B's block scales, so a block tile needs one B scale per K tile; K = 128 is
//     one A / B scale block and one promotion interval.
//   * Operands go global -> shared with 16-byte cp.async (zero-fill past M, N and K) into the
//     128-byte-swizzled K-major layout the wgmma descriptors read; a kStages-deep ring overlaps the
//     copies of the next tiles with the MMAs of the current one (the refill is issued between the
//     wgmma issue and its wait). TMA would free the threads from address math, but a tensor map
//     needs the driver API (cuTensorMapEncodeTiled) at run time; the cp.async pipeline keeps the
//     library free of libcuda. Not warp-specialized either (every thread loads and computes):
//     fewer moving parts to get right without a GPU to test on.
//   * Per K tile: 4 chained wgmma.m64n128k32 into a "partial" accumulator (the first with
//     scale-d = 0, restarting the tensor core's chain), then partial x (block scales) is added to
//     an fp32 register accumulator: promotion every 128 K. Hopper's FP8 MMA adds products into a
//     ~14-bit-mantissa running sum (DeepSeek-V3 §3.3.2); a chain of 128 keeps that error at the
//     bf16-output level, a chain of 4096 does not.
//   * Decode (M <= 16): ceil(N/128) tiles leave most SMs idle; split-K over S blocks per tile
//     (fp8_gemm_cuda_splits) writes fp32 partials to the workspace and a second kernel sums them in
//     split order (deterministic), adds bias and rounds once. S == 1: the GEMM kernel finishes.
//   * Large M: blocks take tiles in grouped order (fp8_gemm_tile_of_block) so that the resident
//     blocks share a few A row panels and B column panels in L2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>

#include "bitpress/cuda/primitives.cuh"
#include "bitpress/fp8/fp8_gemm_cuda.h"
#include "bitpress/fp8/fp8_wgmma_layout.h"

namespace bitpress {
namespace {

template <int kWG>
struct Fp8TileConfig {
  static constexpr int kThreads = 128 * kWG;
  static constexpr int kBlockM = kFp8WgmmaM * kWG;
  static constexpr int kABytes = kBlockM * kFp8TileK;
  static constexpr int kBBytes = kFp8TileN * kFp8TileK;
  static constexpr int kStageBytes = kABytes + kBBytes;  // multiple of 1024: tiles stay aligned
  // 4 x 32 KiB (BM = 128) or 6 x 24 KiB (BM = 64): deep enough to cover global latency with
  // 128 K per stage, within the 227 KiB of shared memory of one block.
  static constexpr int kStages = kWG == 2 ? 4 : 6;
  // +1024: the dynamic shared memory base is aligned up to the 1024 bytes a 128-byte swizzle
  // atom needs (the descriptors' base offset field is 0).
  static constexpr int kSmemBytes = kStages * kStageBytes + kFp8AtomBytes;
  static constexpr int kARounds = kBlockM * 8 / kThreads;
  static constexpr int kBRounds = kFp8TileN * 8 / kThreads;
  static_assert(kStageBytes % kFp8AtomBytes == 0 && kABytes % kFp8AtomBytes == 0);
};

template <DType T>
__device__ __forceinline__ void store_out(void* out, int64_t i, float v) {
  if constexpr (T == DType::kFloat32) {
    static_cast<float*>(out)[i] = v;
  } else if constexpr (T == DType::kFloat16) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  }
}

// out[i], out[i + 1] in one store; i even and out aligned to two elements.
template <DType T>
__device__ __forceinline__ void store_out_pair(void* out, int64_t i, float v0, float v1) {
  if constexpr (T == DType::kFloat32) {
    *reinterpret_cast<float2*>(static_cast<float*>(out) + i) = make_float2(v0, v1);
  } else if constexpr (T == DType::kFloat16) {
    *reinterpret_cast<__half2*>(static_cast<__half*>(out) + i) = __floats2half2_rn(v0, v1);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + i) =
        __floats2bfloat162_rn(v0, v1);
  }
}

// One tile of 128-byte rows: rows [row0, row0 + rows) of an operand, K bytes [k0, k0 + 128).
// Rows >= nrows and K chunks >= K are zero-filled (src-size 0; the address stays in bounds).
template <int kRounds, int kThreads>
__device__ __forceinline__ void load_tile(uint8_t* tile, const uint8_t* src, int64_t stride,
                                          int64_t row0, int64_t nrows, int64_t k0, int64_t K,
                                          int tid) {
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const Fp8LoadChunk c = fp8_load_chunk(tid, r, kThreads);
    const int64_t row = row0 + c.row, k = k0 + 16 * c.chunk;
    const bool valid = row < nrows && k < K;
    cp_async16(tile + c.smem, valid ? src + row * stride + k : src, valid);
  }
}

// grid (tiles, 1, S): blockIdx.x the tile (fp8_gemm_tile_of_block), blockIdx.z the split. S == 1:
// out written with bias; S > 1: the split's scaled partial sums to ws [S, M, N].
template <int kWG, DType kOut>
__global__ void __launch_bounds__(Fp8TileConfig<kWG>::kThreads, 1)
    sm90_e4m3_fp8_gemm_kernel(const Fp8GemmCudaParams p, int S) {
#if BITPRESS_SM90A_DEVICE_PASS
  using C = Fp8TileConfig<kWG>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  uint8_t* smem =
      smem_raw + (((raw_addr + kFp8AtomBytes - 1) & ~uint32_t(kFp8AtomBytes - 1)) - raw_addr);
  const uint32_t smem_base = smem_addr(smem);

  const int tid = threadIdx.x, wg = tid / 128, t = tid % 128;
  const Fp8TileIndex tile = fp8_gemm_tile_of_block(blockIdx.x, (p.M + C::kBlockM - 1) / C::kBlockM,
                                                   (p.N + kFp8TileN - 1) / kFp8TileN);
  const int64_t n0 = tile.n * kFp8TileN, m0 = tile.m * C::kBlockM;
  const int split = blockIdx.z;
  const int64_t KT = (p.K + kFp8TileK - 1) / kFp8TileK;
  const int64_t kt0 = fp8_gemm_split_begin(KT, split, S);
  const int n_kt = int(fp8_gemm_split_begin(KT, split + 1, S) - kt0);

  auto load_stage = [&](int i) {
    uint8_t* st = smem + (i % C::kStages) * C::kStageBytes;
    const int64_t k0 = (kt0 + i) * kFp8TileK;
    load_tile<C::kARounds, C::kThreads>(st, p.a, p.a_row_stride, m0, p.M, k0, p.K, tid);
    load_tile<C::kBRounds, C::kThreads>(st + C::kABytes, p.b, p.b_row_stride, n0, p.N, k0, p.K,
                                        tid);
  };

  // Rows of this thread's accumulator (fp8_wgmma_acc_coord): h = 0, 1.
  const int64_t row_h[2] = {m0 + 64 * wg + fp8_wgmma_acc_row(t, 0),
                            m0 + 64 * wg + fp8_wgmma_acc_row(t, 1)};
  const bool a_block = p.scale_a_mode == Fp8ScaleMode::kBlock;
  const bool b_block = p.scale_b_mode == Fp8ScaleMode::kBlock;

  float acc[64], part[64];
#pragma unroll
  for (int r = 0; r < 64; ++r) acc[r] = part[r] = 0.f;

#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < n_kt) load_stage(s);
    cp_async_commit();
  }

  for (int i = 0; i < n_kt; ++i) {
    // Block scales of this K tile, loaded before the MMAs so that their latency hides under them.
    const int64_t kb = kt0 + i;
    float sa[2] = {1.f, 1.f}, sb = 1.f;
    if (a_block) {
#pragma unroll
      for (int h = 0; h < 2; ++h) sa[h] = row_h[h] < p.M ? p.scale_a[row_h[h] * KT + kb] : 0.f;
    }
    if (b_block) sb = p.scale_b[(n0 / kFp8TileN) * KT + kb];

    // Stage i has landed (this thread's copies), is visible to the async proxy (wgmma reads
    // through it), and every thread's copies are done; every warpgroup has also finished the MMAs
    // of stage i - 1 (wait_group 0 below), whose slot the refill overwrites.
    cp_async_wait<C::kStages - 2>();
    fence_proxy_async_shared();
    __syncthreads();
    const uint32_t st = smem_base + (i % C::kStages) * C::kStageBytes;
#pragma unroll
    for (int r = 0; r < 64; ++r) wgmma_fence_operand(part[r]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kFp8TileK / kFp8WgmmaK; ++ks) {
      wgmma_m64n128k32_e4m3(part, fp8_tile_desc(st, 64 * wg, ks),
                            fp8_tile_desc(st + C::kABytes, 0, ks), ks > 0);
    }
    wgmma_commit_group();
    // The refill is issued while the tensor core works on this stage (wgmma is asynchronous): its
    // address math and LDGSTS cost no MMA time.
    if (i + C::kStages - 1 < n_kt) load_stage(i + C::kStages - 1);
    cp_async_commit();
    wgmma_wait_group<0>();
#pragma unroll
    for (int r = 0; r < 64; ++r) wgmma_fence_operand(part[r]);

    // Promotion: the tensor core's 128-K chain, block-scaled, into the fp32 accumulator.
#pragma unroll
    for (int r = 0; r < 64; ++r) acc[r] = fmaf(part[r], sa[(r >> 1) & 1] * sb, acc[r]);
  }
  cp_async_wait<0>();

  // Epilogue: the scales that do not vary along K, then bias and rounding (S == 1) or the fp32
  // partial (S > 1).
  float ra[2], rb[64 / 2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    ra[h] = a_block                                   ? 1.f
            : p.scale_a_mode == Fp8ScaleMode::kTensor ? p.scale_a[0]
            : row_h[h] < p.M                          ? p.scale_a[row_h[h]]
                                                      : 0.f;
  }
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int64_t col = n0 + fp8_wgmma_acc_coord(t, (j >> 1) * 4 + (j & 1)).col;
    rb[j] = b_block                                   ? 1.f
            : p.scale_b_mode == Fp8ScaleMode::kTensor ? p.scale_b[0]
            : col < p.N                               ? p.scale_b[col]
                                                      : 0.f;
  }
  float* ws = static_cast<float*>(p.workspace);
  // A thread holds column pairs (2c, 2c + 1) of a row (fp8_wgmma_acc_coord): one 4-byte (bf16 /
  // fp16) or 8-byte (fp32) store per pair where the row stride and base keep pairs aligned.
  const bool out_pairs =
      p.out_row_stride % 2 == 0 && reinterpret_cast<uintptr_t>(p.out) % (2 * dtype_size(kOut)) == 0;
  const bool ws_pairs = p.N % 2 == 0;  // the workspace is 256-byte aligned
#pragma unroll
  for (int r = 0; r < 64; r += 2) {
    const int h = (r >> 1) & 1;
    const int64_t row = row_h[h];
    const int64_t col = n0 + fp8_wgmma_acc_coord(t, r).col;  // even; col + 1 holds acc[r + 1]
    if (row >= p.M || col >= p.N) continue;
    const int j = (r >> 2) * 2;
    float v0 = acc[r] * ra[h] * rb[j], v1 = acc[r + 1] * ra[h] * rb[j + 1];
    const bool pair = col + 1 < p.N;
    if (S == 1) {
      if (p.bias) {
        v0 += p.bias[col];
        if (pair) v1 += p.bias[col + 1];
      }
      const int64_t i = row * p.out_row_stride + col;
      if (pair && out_pairs) {
        store_out_pair<kOut>(p.out, i, v0, v1);
      } else {
        store_out<kOut>(p.out, i, v0);
        if (pair) store_out<kOut>(p.out, i + 1, v1);
      }
    } else {
      float* w = ws + (int64_t(split) * p.M + row) * p.N + col;
      if (pair && ws_pairs) {
        *reinterpret_cast<float2*>(w) = make_float2(v0, v1);
      } else {
        w[0] = v0;
        if (pair) w[1] = v1;
      }
    }
  }
#endif  // BITPRESS_SM90A_DEVICE_PASS
}

// out[m, n] = sum_s ws[s, m, n] (split order) + bias[n], rounded once. S == 0 (K == 0): bias or 0.
template <DType kOut>
__global__ void __launch_bounds__(256)
    sm90_fp8_gemm_reduce_kernel(const Fp8GemmCudaParams p, int S) {
  const float* ws = static_cast<const float*>(p.workspace);
  const int64_t MN = p.M * p.N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < MN;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / p.N, n = i % p.N;
    float v = 0.f;
    for (int s = 0; s < S; ++s) v += ws[s * MN + i];
    if (p.bias) v += p.bias[n];
    store_out<kOut>(p.out, m * p.out_row_stride + n, v);
  }
}

template <int kWG, DType kOut>
Status launch_gemm(const Fp8GemmCudaParams& p, int S, cudaStream_t stream) {
  using C = Fp8TileConfig<kWG>;
  auto* kernel = sm90_e4m3_fp8_gemm_kernel<kWG, kOut>;
  const Status s = cuda_call_status(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
  if (s != Status::kSuccess) return s;
  const int64_t tiles = ((p.N + kFp8TileN - 1) / kFp8TileN) * ((p.M + C::kBlockM - 1) / C::kBlockM);
  if (tiles >= (int64_t(1) << 31)) return Status::kInvalidArgument;
  const dim3 grid(unsigned(tiles), 1, unsigned(S));
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p, S);
  return cuda_launch_status();
}

template <DType kOut>
Status launch_reduce(const Fp8GemmCudaParams& p, int S, cudaStream_t stream) {
  const int64_t blocks =
      std::min<int64_t>((p.M * p.N + 255) / 256, int64_t(p.num_sms > 0 ? p.num_sms : 132) * 8);
  sm90_fp8_gemm_reduce_kernel<kOut><<<unsigned(blocks), 256, 0, stream>>>(p, S);
  return cuda_launch_status();
}

template <DType kOut>
Status run(const Fp8GemmCudaParams& p, cudaStream_t stream) {
  if (p.K == 0) return launch_reduce<kOut>(p, 0, stream);
  const int S = fp8_gemm_cuda_splits(p.M, p.N, p.K, p.num_sms);
  const Status s = fp8_gemm_cuda_block_m(p.M) == 64 ? launch_gemm<1, kOut>(p, S, stream)
                                                    : launch_gemm<2, kOut>(p, S, stream);
  if (s != Status::kSuccess || S == 1) return s;
  return launch_reduce<kOut>(p, S, stream);
}

}  // namespace

Status fp8_gemm_cuda(const Fp8GemmCudaParams& p, void* stream) {
  const Status s = fp8_gemm_cuda_check(p);
  if (s != Status::kSuccess) return s;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (p.out_dtype) {
    case DType::kFloat32:
      return run<DType::kFloat32>(p, st);
    case DType::kFloat16:
      return run<DType::kFloat16>(p, st);
    default:
      return run<DType::kBFloat16>(p, st);
  }
}

}  // namespace bitpress
