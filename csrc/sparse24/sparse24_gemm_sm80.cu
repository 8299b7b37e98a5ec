// CUDA kernels of sparse24_gemm on the mma.sp layout (contract: bitpress/sparse24/
// sparse24_gemm_cuda.h; layout and index math: bitpress/sparse24/sparse24_mma_layout.h, emulated
// on the CPU by tests/cpp/test_sparse24_mma.cpp; PTX wrappers and the swizzle:
// bitpress/cuda/primitives.cuh). "sm80" = the mma.sp generation; the same code runs on sm_90a.
//
// y^T = W x^T: W [N, K] (2:4 along K) is the sparse A operand of mma.sp.m16n8k32 (16 output
// features x 32 K), x^T is B (8 rows of x per mma), so a decode step (M <= 16) issues one or two
// mma per 16 x 32 weight tile and wastes nothing on padding M up to 16 rows.
//   * block = 256 threads = 8 warps, 64 output features (4 n16 tiles) x BM = 8 MT rows of x
//     (MT = 1, 2, 4, 8 by M), stages of 128 K; grid (ceil(M/BM), N/64, S splits of K).
//   * each stage (8 KiB of kept values, 1 KiB of metadata, BM x 256 B of x) is copied global ->
//     shared with 16-byte cp.async.cg (L2 only: every weight byte is used by one block), kStages
//     deep, so that the HBM reads of the next stages overlap this one's tensor-core work. At
//     M <= 16 the kernel is bound by the weight stream: 1.125 bytes per dense weight (bf16 values
//     at 50 % + 2-bit indices) against 2 for a dense GEMM.
//   * warp (wn, wk): tile row wn of the block, metadata pair wk of the stage (k-tiles 2wk,
//     2wk + 1). A fragment: one LDS.128 per lane per tile (the layout stores the lane's 8 values
//     contiguously); metadata: one 32-bit LDS per lane per pair, used by both mma.sp (selector 0
//     for the even k-tile, 1 for the odd one); B by ldmatrix.x4 from an XOR-swizzled x tile
//     (conflict-free).
//   * the two k-warps of a tile row add their accumulators through shared memory; S == 1: bias
//     and one rounding in the kernel; S > 1: fp32 partials for the reduction kernel.
// Shared memory per block: MT = 1, 2, 4: 4 stages of 11 / 13 / 17 KiB; MT = 8: 3 of 25 KiB; all
// under the 99 KiB per-block limit of sm_86 / sm_89, which run this sm_80 code as well.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>

#include "bitpress/cuda/primitives.cuh"
#include "bitpress/sparse24/sparse24_gemm_cuda.h"
#include "bitpress/sparse24/sparse24_mma_layout.h"

namespace bitpress {
namespace {

constexpr int kThreads = kSparse24GemmThreads;
constexpr int kNT = kSparse24GemmBlockNTiles;                          // tile rows per block
constexpr int kStageKTiles = kSparse24GemmStageK / kSparse24MmaTileK;  // 4 k32 tiles per stage
constexpr int kXRowChunks = kSparse24GemmStageK * 2 / 16;              // 16 chunks per row of x
static_assert(kThreads / 32 == kNT * kSparse24GemmStagePairs, "one warp per (tile row, pair)");

template <int MT>
struct TileConfig {
  static constexpr int kStages = MT == 8 ? 3 : 4;
  static constexpr int kVChunks = kNT * kStageKTiles * 32;            // 512: 8 KiB of values
  static constexpr int kMChunks = kNT * kSparse24GemmStagePairs * 8;  // 64: 1 KiB of metadata
  static constexpr int kXChunks = 8 * MT * kXRowChunks;               // BM rows x 256 B
  static constexpr int kSlotChunks = kVChunks + kMChunks + kXChunks;
  static constexpr int kSmemBytes = kStages * kSlotChunks * 16;
  static constexpr int kRedBytes = kNT * MT * 4 * 32 * 4;
  static_assert(kRedBytes <= kSmemBytes, "the reduction buffer reuses the pipeline's smem");
  static_assert(kVChunks == 2 * kThreads, "values loader: two chunks per thread");
  static_assert(kMChunks <= kThreads, "metadata loader: one chunk per thread");
};

struct GemmArgs {
  const uint16_t* x;
  int64_t x_row_stride, M, K;
  const int4* values;    // values_mma as 16-byte chunks: (nt, kt, lane)
  const uint32_t* meta;  // meta_mma words: (nt, kp, lane)
  const void* bias;
  DType bias_dtype;
  uint16_t* out;
  int64_t out_row_stride;
  float* partials;  // [S, M, N] when S > 1
  int64_t N, Nt, KT, KP, stages;
  int splits;
};

template <DType T>
__device__ __forceinline__ uint16_t float_to_bits(float v) {
  if constexpr (T == DType::kFloat16) {
    return __half_as_ushort(__float2half_rn(v));
  } else {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

__device__ __forceinline__ float bias_at(const void* bias, DType dt, int64_t n) {
  if (bias == nullptr) return 0.f;
  switch (dt) {
    case DType::kFloat16:
      return __half2float(__ushort_as_half(static_cast<const uint16_t*>(bias)[n]));
    case DType::kBFloat16:
      return __bfloat162float(__ushort_as_bfloat16(static_cast<const uint16_t*>(bias)[n]));
    default:
      return static_cast<const float*>(bias)[n];
  }
}

// Split s of S covers stages [begin, end) of `stages`, as evenly as possible.
__device__ __forceinline__ void split_range(int64_t stages, int splits, int s, int64_t* begin,
                                            int64_t* end) {
  const int64_t q = stages / splits, r = stages % splits;
  *begin = s * q + (s < r ? s : r);
  *end = *begin + q + (s < r ? 1 : 0);
}

// One k32 tile of one warp: A fragment (16 B per lane), B by ldmatrix from the swizzled x tile.
template <DType T, int MT, int Sel>
__device__ __forceinline__ void mma_tile(float (&acc)[MT][4], const int4* sV, const int4* sX,
                                         int wn, int kk, int lane, uint32_t e) {
  const int4 av = sV[(wn * kStageKTiles + kk) * 32 + lane];
  const uint32_t a[4] = {uint32_t(av.x), uint32_t(av.y), uint32_t(av.z), uint32_t(av.w)};
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
    // ldmatrix.x4: lane l gives the address of row l % 8 of matrix l / 8 = columns
    // 8 (l / 8) .. +7 of k-tile kk; register j of lane (g, t) is then x[g][8j + 2t .. +1], the
    // B fragment b_{2j}, b_{2j+1} (sparse24_mma_b_coords).
    uint32_t b[4];
    const int row = 8 * mi + (lane & 7);
    ldmatrix_x4(b, sX + swizzled_chunk_index(row, kk * 4 + (lane >> 3), kXRowChunks));
    mma_sp_m16n8k32<T, Sel>(acc[mi], a, b, e);
  }
}

template <DType T, int MT>
__device__ __forceinline__ void gemm_body(const GemmArgs& a) {
  using Cfg = TileConfig<MT>;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ int4 smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % kNT, wk = warp / kNT;
  // m-blocks vary fastest: the blocks of one weight strip (all rows of x) run side by side, so
  // that for M > BM the strip is read from HBM once and from L2 by the other m-blocks.
  const int64_t nb = blockIdx.y;
  const int64_t m0 = int64_t(blockIdx.x) * 8 * MT;
  const int split = blockIdx.z;
  int64_t st_begin, st_end;
  split_range(a.stages, a.splits, split, &st_begin, &st_end);
  const int n_iters = int(st_end - st_begin);
  const int64_t nt_warp = nb * kNT + wn;
  const bool warp_has_n = nt_warp < a.Nt;

  auto load_stage = [&](int64_t st, int slot) {
    int4* sV = smem + slot * Cfg::kSlotChunks;
    int4* sM = sV + Cfg::kVChunks;
    int4* sX = sM + Cfg::kMChunks;
    const int64_t kt0 = st * kStageKTiles;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = tid + kThreads * j;  // (tile row, k-tile, lane): 2 KiB contiguous per row
      const int ntl = c / (kStageKTiles * 32), kk = (c / 32) % kStageKTiles, ln = c % 32;
      const int64_t nt = nb * kNT + ntl, kt = kt0 + kk;
      const bool valid = nt < a.Nt && kt < a.KT;
      const int4* src = valid ? a.values + (nt * a.KT + kt) * 32 + ln : a.values;
      cp_async16(sV + c, src, valid);
    }
    if (tid < Cfg::kMChunks) {
      const int ntl = tid / 16, pp = (tid / 8) % 2, q = tid % 8;
      const int64_t nt = nb * kNT + ntl, kp = st * kSparse24GemmStagePairs + pp;
      const bool valid = nt < a.Nt && kp < a.KP;
      const uint32_t* src = valid ? a.meta + sparse24_mma_meta_index(nt, kp, 4 * q, a.KP) : a.meta;
      cp_async16(sM + tid, src, valid);
    }
#pragma unroll
    for (int j = 0; j < (Cfg::kXChunks + kThreads - 1) / kThreads; ++j) {
      const int c = tid + kThreads * j;
      if (Cfg::kXChunks % kThreads == 0 || c < Cfg::kXChunks) {
        const int row = c / kXRowChunks, ch = c % kXRowChunks;
        const int64_t m = m0 + row, k = st * kSparse24GemmStageK + 8 * ch;
        // K % 32 == 0: a chunk is wholly inside or past K; past K (the last stage's missing
        // k-tiles) it is zero-filled and never read by an mma.
        const bool valid = m < a.M && k < a.K;
        const uint16_t* src = valid ? a.x + m * a.x_row_stride + k : a.x;
        cp_async16(sX + swizzled_chunk_index(row, ch, kXRowChunks), src, valid);
      }
    }
  };

  float acc[MT][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mi][i] = 0.f;

  auto compute_stage = [&](int64_t st, int slot) {
    const int4* sV = smem + slot * Cfg::kSlotChunks;
    const uint32_t* sM = reinterpret_cast<const uint32_t*>(sV + Cfg::kVChunks);
    const int4* sX = sV + Cfg::kVChunks + Cfg::kMChunks;
    const int64_t kp = st * kSparse24GemmStagePairs + wk;
    if (kp >= a.KP || !warp_has_n) return;  // warp-uniform
    const uint32_t e = sM[(wn * kSparse24GemmStagePairs + wk) * 32 + lane];
    mma_tile<T, MT, 0>(acc, sV, sX, wn, 2 * wk, lane, e);
    // K / 32 odd: the last pair has one k-tile (its selector-1 metadata is padding).
    if (2 * kp + 1 < a.KT) mma_tile<T, MT, 1>(acc, sV, sX, wn, 2 * wk + 1, lane, e);
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

  // wk = 1 -> wk = 0 through shared memory, lane-minor (consecutive lanes, consecutive banks).
  float* red = reinterpret_cast<float*>(smem) + wn * MT * 4 * 32 + lane;
  if (wk == 1) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[(mi * 4 + i) * 32] = acc[mi][i];
  }
  __syncthreads();
  if (wk != 0 || !warp_has_n) return;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float v = acc[mi][i] + red[(mi * 4 + i) * 32];
      int r, mm;
      sparse24_mma_c_coords(lane, i, &r, &mm);
      const int64_t m = m0 + 8 * mi + mm, n = nt_warp * kSparse24MmaTileN + r;
      if (m >= a.M) continue;
      if (a.splits == 1) {
        a.out[m * a.out_row_stride + n] = float_to_bits<T>(v + bias_at(a.bias, a.bias_dtype, n));
      } else {
        a.partials[(int64_t(split) * a.M + m) * a.N + n] = v;
      }
    }
  }
}

// Accumulators are few (MT x 4 floats), so two blocks per SM (<= 128 registers per thread) keep
// 2 x (kStages - 1) stages of the weight stream in flight per SM.
template <int MT>
__global__ void __launch_bounds__(kThreads, 2) sm80_f16_sparse24_gemm_kernel(const GemmArgs a) {
  gemm_body<DType::kFloat16, MT>(a);
}
template <int MT>
__global__ void __launch_bounds__(kThreads, 2) sm80_bf16_sparse24_gemm_kernel(const GemmArgs a) {
  gemm_body<DType::kBFloat16, MT>(a);
}

// Split-K reduction: y[m, n] = round(sum_s partials[s, m, n] + bias[n]), s in order.
template <DType T>
__global__ void __launch_bounds__(kThreads)
    sparse24_gemm_reduce_kernel(const float* partials, int splits, int64_t M, int64_t N,
                                const void* bias, DType bias_dtype, uint16_t* out,
                                int64_t out_row_stride) {
  const int64_t total = M * N;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t m = i / N, n = i - m * N;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partials[(s * M + m) * N + n];
    out[m * out_row_stride + n] = float_to_bits<T>(v + bias_at(bias, bias_dtype, n));
  }
}

// Dense W from the mma layout: one thread per (tile, lane). A lane's values v and v ^ 1 are the
// two kept values of one group (sparse24_mma_a_coords), so it writes whole groups of 4.
__global__ void __launch_bounds__(kThreads)
    sparse24_decompress_kernel(const uint16_t* values, const uint32_t* meta, int64_t N, int64_t KT,
                               int64_t KP, uint16_t* out, int64_t out_row_stride) {
  const int64_t tiles = N / kSparse24MmaTileN * KT;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < tiles * 32;
       i += int64_t(gridDim.x) * kThreads) {
    const int lane = int(i % 32);
    const int64_t tile = i / 32, nt = tile / KT, kt = tile % KT;
#pragma unroll
    for (int v = 0; v < 8; v += 2) {
      int r, j;
      uint16_t g4[4];
      sparse24_mma_expand_group(values, meta, nt, kt, lane, v, KT, KP, &r, &j, g4);
      uint16_t* dst =
          out + (nt * kSparse24MmaTileN + r) * out_row_stride + kt * kSparse24MmaTileK + 4 * j;
#pragma unroll
      for (int q = 0; q < 4; ++q) dst[q] = g4[q];
    }
  }
}

// ----- host side -----

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <DType T, int MT>
Status launch_gemm(const GemmArgs& a, int64_t n_blocks, int64_t m_blocks, cudaStream_t stream) {
  using Cfg = TileConfig<MT>;
  auto* kernel =
      T == DType::kFloat16 ? sm80_f16_sparse24_gemm_kernel<MT> : sm80_bf16_sparse24_gemm_kernel<MT>;
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
  const dim3 grid(unsigned(m_blocks), unsigned(n_blocks), unsigned(a.splits));
  kernel<<<grid, kThreads, Cfg::kSmemBytes, stream>>>(a);
  return cuda_launch_status();
}

template <DType T>
Status launch_gemm_mt(const GemmArgs& a, int mt, int64_t n_blocks, int64_t m_blocks,
                      cudaStream_t stream) {
  switch (mt) {
    case 1:
      return launch_gemm<T, 1>(a, n_blocks, m_blocks, stream);
    case 2:
      return launch_gemm<T, 2>(a, n_blocks, m_blocks, stream);
    case 4:
      return launch_gemm<T, 4>(a, n_blocks, m_blocks, stream);
    default:
      return launch_gemm<T, 8>(a, n_blocks, m_blocks, stream);
  }
}

Status check(const Sparse24GemmCudaParams& p) {
  if (p.x_dtype != DType::kFloat16 && p.x_dtype != DType::kBFloat16) {
    return Status::kInvalidArgument;
  }
  if (p.M < 0 || p.K < 0 || p.N < 0 || p.K % kSparse24MmaTileK != 0 ||
      p.N % kSparse24MmaTileN != 0) {
    return Status::kInvalidArgument;
  }
  if (p.bias != nullptr && !dtype_valid(p.bias_dtype)) return Status::kInvalidArgument;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  if (p.num_sms <= 0 || p.out == nullptr || p.out_row_stride < p.N) {
    return Status::kInvalidArgument;
  }
  if (p.K > 0) {
    if (p.values == nullptr || p.meta == nullptr || p.x == nullptr) {
      return Status::kInvalidArgument;
    }
    if (!aligned16(p.values) || !aligned16(p.meta) || !aligned16(p.x) || p.x_row_stride % 8 != 0 ||
        (p.M > 1 && p.x_row_stride < p.K)) {
      return Status::kInvalidArgument;
    }
  }
  const int64_t bm = 8 * int64_t(sparse24_gemm_cuda_m_tiles(p.M));
  if ((p.M + bm - 1) / bm > 0x7fffffff || (p.N / kSparse24MmaTileN + kNT - 1) / kNT > 65535) {
    return Status::kInvalidArgument;
  }
  const size_t ws = sparse24_gemm_cuda_workspace_size(p);
  if (ws > 0 && (p.workspace == nullptr || p.workspace_bytes < ws ||
                 (reinterpret_cast<uintptr_t>(p.workspace) & 255u) != 0)) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

}  // namespace

Status sparse24_gemm_cuda(const Sparse24GemmCudaParams& p, void* stream) {
  const Status s = check(p);
  if (s != Status::kSuccess || p.M == 0 || p.N == 0) return s;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int S = sparse24_gemm_cuda_splits(p.M, p.K, p.N, p.num_sms);

  GemmArgs a{};
  a.x = static_cast<const uint16_t*>(p.x);
  a.x_row_stride = p.x_row_stride;
  a.M = p.M;
  a.K = p.K;
  a.values = static_cast<const int4*>(p.values);
  a.meta = reinterpret_cast<const uint32_t*>(p.meta);
  a.bias = p.bias;
  a.bias_dtype = p.bias_dtype;
  a.out = static_cast<uint16_t*>(p.out);
  a.out_row_stride = p.out_row_stride;
  a.partials = S > 1 ? static_cast<float*>(p.workspace) : nullptr;
  a.N = p.N;
  a.Nt = p.N / kSparse24MmaTileN;
  a.KT = p.K / kSparse24MmaTileK;
  a.KP = sparse24_mma_padded_k(p.K) / kSparse24MmaPairK;
  a.stages = (p.K + kSparse24GemmStageK - 1) / kSparse24GemmStageK;
  a.splits = S;

  const int mt = sparse24_gemm_cuda_m_tiles(p.M);
  const int64_t n_blocks = (a.Nt + kNT - 1) / kNT;
  const int64_t m_blocks = (p.M + 8 * mt - 1) / (8 * mt);
  const Status g = p.x_dtype == DType::kFloat16
                       ? launch_gemm_mt<DType::kFloat16>(a, mt, n_blocks, m_blocks, st)
                       : launch_gemm_mt<DType::kBFloat16>(a, mt, n_blocks, m_blocks, st);
  if (g != Status::kSuccess || S == 1) return g;

  const int64_t total = p.M * p.N;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = unsigned(blocks < 65535 ? blocks : 65535);
  auto* reduce = p.x_dtype == DType::kFloat16 ? sparse24_gemm_reduce_kernel<DType::kFloat16>
                                              : sparse24_gemm_reduce_kernel<DType::kBFloat16>;
  reduce<<<grid, kThreads, 0, st>>>(a.partials, S, p.M, p.N, p.bias, p.bias_dtype, a.out,
                                    p.out_row_stride);
  return cuda_launch_status();
}

Status sparse24_decompress_cuda(const Sparse24DecompressCudaParams& p, void* stream) {
  if ((p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) || p.N < 0 || p.K < 0 ||
      p.N % kSparse24MmaTileN != 0 || p.K % kSparse24MmaTileK != 0) {
    return Status::kInvalidArgument;
  }
  if (p.N == 0 || p.K == 0) return Status::kSuccess;
  if (p.values == nullptr || p.meta == nullptr || p.out == nullptr || p.out_row_stride < p.K) {
    return Status::kInvalidArgument;
  }
  const int64_t KT = p.K / kSparse24MmaTileK, KP = sparse24_mma_padded_k(p.K) / kSparse24MmaPairK;
  const int64_t threads = p.N / kSparse24MmaTileN * KT * 32;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  sparse24_decompress_kernel<<<unsigned(blocks < 1048576 ? blocks : 1048576), kThreads, 0,
                               static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint16_t*>(p.values), reinterpret_cast<const uint32_t*>(p.meta), p.N, KT,
      KP, static_cast<uint16_t*>(p.out), p.out_row_stride);
  return cuda_launch_status();
}

}  // namespace bitpress
