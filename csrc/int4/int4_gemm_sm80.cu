// CUDA kernels of int4_gemm on the GPU mma layout (contract: the CUDA section of
// bitpress/int4/int4_gemm.h; layout: bitpress/int4/int4_mma_layout.h; index math and
// dequantization: bitpress/int4/int4_mma_dequant.h, unit-tested on the CPU by
// tests/cpp/test_int4_mma.cpp; PTX wrappers and the A swizzle: bitpress/cuda/primitives.cuh).
//
// GEMM kernel (Marlin-style, "sm80" = the mma.sync generation; the same code runs on sm_90a):
//   * block = 256 threads, tile BM x BN = 16 MT x 128 (MT = 1, 2, 4 m16 tiles, by M), stages of
//     BK = 128 K-rows; grid (ceil(N/128), ceil(M/BM), S splits of K).
//   * every stage (B: 8 KiB of weights, A: BM x 128 activations, that stage's group scales and
//     zeros) is copied global -> shared with 16-byte cp.async.cg (L2 only: each byte is used by
//     one block), kStages deep (commit_group / wait_group), so that HBM reads of the next stages
//     overlap the tensor-core work of this one: at M <= 64 the kernel is bound by the weight
//     stream (0.5 byte per weight), and 4 stages x 8 KiB per SM keeps ~32 KiB in flight per SM.
//   * warp (wn, wk): n-tile wn of the block, k-tiles wk and wk + 4 of each stage. A fragments
//     by ldmatrix.x4 from an XOR-swizzled tile (conflict-free), B by one LDS.128 per k16 x n64
//     tile (the layout stores exactly the lane's fragments), dequantized in registers with the
//     lop3 / magic-number trick, mma.sync.m16n8k16 with fp32 accumulators.
//   * the 4 k-warps of an n-tile add their accumulators through shared memory at the end; the
//     result gets bias and one rounding (S == 1), or goes to fp32 partials for the reduction
//     kernel (S > 1).
// Shared memory: MT = 1: 68 KiB, MT = 2: 84 KiB (4 stages), MT = 4: 87 KiB (3 stages), under the
// 99 KiB per-block limit of sm_86/sm_89, which run this sm_80 code as well.
#include <cuda_runtime.h>

#include <atomic>

#include "bitpress/cuda/primitives.cuh"
#include "bitpress/int4/int4.h"
#include "bitpress/int4/int4_gemm.h"
#include "bitpress/int4/int4_mma_dequant.h"
#include "bitpress/int4/int4_mma_layout.h"

namespace bitpress {
namespace {

constexpr int kThreads = kInt4GemmThreads;

template <int MT>
struct TileConfig {
  static constexpr int kStages = MT == 4 ? 3 : 4;
  static constexpr int kBChunks = kInt4GemmStageKTiles * kInt4GemmBlockNTiles * 32;  // 8 KiB
  static constexpr int kAChunks = 16 * MT * 16;                                      // BM x 256 B
  static constexpr int kSChunks = kInt4GemmStageKTiles * 32;  // <= 8 groups x 128 float
  static constexpr int kZChunks = kInt4GemmStageKTiles * 8;   // <= 8 groups x 128 uint8
  static constexpr int kSlotChunks = kBChunks + kAChunks + kSChunks + kZChunks;
  static constexpr int kSmemBytes = kStages * kSlotChunks * kInt4GemmChunk;
  static constexpr int kAccPerLane = MT * 8 * 4;
  // Two reduction buffers of (2 n-tiles x 32 lanes x kAccPerLane) floats reuse the stages.
  static constexpr int kRedBytes = 2 * kInt4GemmBlockNTiles * 32 * kAccPerLane * 4;
  static_assert(kRedBytes <= kSmemBytes, "reduction buffers must fit in the pipeline's smem");
  static_assert(kBChunks == 2 * kThreads, "B loader: two chunks per thread");
  static_assert(kSChunks <= kThreads, "scale loader: one chunk per thread");
};

struct GemmArgs {
  const uint16_t* x;  // [M, x_row_stride]: x, or x_perm from the workspace
  int64_t x_row_stride, M;
  const uint32_t* qweight;
  const float* scales;
  const uint8_t* zeros;
  const void* bias;
  DType bias_dtype;
  uint16_t* out;
  int64_t out_row_stride;
  float* partials;  // [S, M, Np] when S > 1
  int64_t N, Np, Nt, KT, tiles_per_group, stages;
  int splits;
};

// ----- the GEMM -----

template <DType T, int MT>
__device__ __forceinline__ void gemm_body(const GemmArgs& a) {
  using Cfg = TileConfig<MT>;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ int4 smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % kInt4GemmBlockNTiles, wk = warp / kInt4GemmBlockNTiles;
  const int64_t nb = blockIdx.x;
  const int64_t m0 = int64_t(blockIdx.y) * 16 * MT;
  const int split = blockIdx.z;
  int64_t st_begin, st_end;
  int4_gemm_split_range(a.stages, a.splits, split, &st_begin, &st_end);
  const int n_iters = int(st_end - st_begin);
  const int64_t nt_warp = nb * kInt4GemmBlockNTiles + wn;
  const bool warp_has_n = nt_warp < a.Nt;

  auto load_stage = [&](int64_t st, int slot) {
    int4* sB = smem + slot * Cfg::kSlotChunks;
    int4* sA = sB + Cfg::kBChunks;
    int4* sS = sA + Cfg::kAChunks;
    int4* sZ = sS + Cfg::kSChunks;
    const int64_t kt0 = st * kInt4GemmStageKTiles;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = tid + kThreads * j;
      int kk, ntl, ln;
      int4_gemm_b_load_coords(c, &kk, &ntl, &ln);
      const int64_t kt = kt0 + kk, nt = nb * kInt4GemmBlockNTiles + ntl;
      const bool valid = kt < a.KT && nt < a.Nt;
      const uint32_t* src =
          valid ? a.qweight + int4_mma_word_index(kt, nt, ln, 0, a.Nt) : a.qweight;
      cp_async16(sB + int4_gemm_b_smem_chunk(kk, ntl, ln), src, valid);
    }
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int c = tid + kThreads * j;
      int row, ch;
      int4_gemm_a_load_coords(c, &row, &ch);
      const int64_t m = m0 + row, kt = kt0 + (ch >> 1);
      const bool valid = m < a.M && kt < a.KT;
      const uint16_t* src = valid ? a.x + m * a.x_row_stride + kt0 * kInt4MmaTileK + 8 * ch : a.x;
      cp_async16(sA + int4_gemm_a_smem_chunk(row, ch), src, valid);
    }
    // Groups of the stage's first and last k-tile; a stage touches at most 8 (one per k-tile).
    const int g0 = int4_gemm_group_of_ktile(kt0, a.tiles_per_group);
    const int64_t kt_last =
        kt0 + kInt4GemmStageKTiles - 1 < a.KT ? kt0 + kInt4GemmStageKTiles - 1 : a.KT - 1;
    const int ng = int4_gemm_group_of_ktile(kt_last, a.tiles_per_group) - g0 + 1;
    const int64_t col0 = nb * kInt4GemmBlockNTiles * kInt4MmaTileN;
    if (tid < 32 * ng) {
      int gi, col;
      int4_gemm_s_load_coords(tid, &gi, &col);
      const bool valid = col0 + col < a.Np;
      const float* src = valid ? a.scales + (g0 + gi) * a.Np + col0 + col : a.scales;
      cp_async16(reinterpret_cast<float*>(sS) + int4_gemm_sz_smem_index(gi, col), src, valid);
    }
    if (a.zeros != nullptr && tid < 8 * ng) {
      int gi, col;
      int4_gemm_z_load_coords(tid, &gi, &col);
      const bool valid = col0 + col < a.Np;
      const uint8_t* src = valid ? a.zeros + (g0 + gi) * a.Np + col0 + col : a.zeros;
      cp_async16(reinterpret_cast<uint8_t*>(sZ) + int4_gemm_sz_smem_index(gi, col), src, valid);
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][j][i] = 0.f;
  // Scales and zero points of the current group, as half2 pairs, per n8-block of the warp.
  uint32_t s2[8], z2[8];
  int cur_g = -1;

  auto compute_stage = [&](int64_t st, int slot) {
    const int4* sB = smem + slot * Cfg::kSlotChunks;
    const int4* sA = sB + Cfg::kBChunks;
    const float* sS = reinterpret_cast<const float*>(sA + Cfg::kAChunks);
    const uint8_t* sZ = reinterpret_cast<const uint8_t*>(sA + Cfg::kAChunks + Cfg::kSChunks);
    const int64_t kt0 = st * kInt4GemmStageKTiles;
    const int g0 = int4_gemm_group_of_ktile(kt0, a.tiles_per_group);
#pragma unroll
    for (int r = 0; r < kInt4GemmStageKTiles / kInt4GemmKWarps; ++r) {
      const int kk = wk + kInt4GemmKWarps * r;
      const int64_t kt = kt0 + kk;
      if (kt >= a.KT || !warp_has_n) continue;  // warp-uniform
      const int g = int4_gemm_group_of_ktile(kt, a.tiles_per_group);
      if (g != cur_g) {  // once per group: groups are >= 16 rows and usually 8 k-tiles
        cur_g = g;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int col =
              int4_gemm_sz_smem_index(g - g0, wn * kInt4MmaTileN + int4_gemm_b_col(lane, j));
          s2[j] = int4_mma_scale_pair<T>(sS[col]);
          z2[j] = int4_mma_zero_pair<T>(a.zeros != nullptr ? uint32_t(sZ[col])
                                                           : uint32_t(kInt4SymmetricZero));
        }
      }
      uint32_t af[MT][4];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        int row, ch;
        int4_gemm_a_ldmatrix_coords(lane, kk, &row, &ch);
        ldmatrix_x4(af[mi], sA + int4_gemm_a_smem_chunk(16 * mi + row, ch));
      }
      const uint4 wv = *reinterpret_cast<const uint4*>(sB + int4_gemm_b_smem_chunk(kk, wn, lane));
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int hb = 0; hb < 2; ++hb) {
          const int j = int4_mma_block_of_reg(w, 2 * hb);
          uint32_t b[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int p = 2 * hb + h;
            b[int4_mma_half_of_reg(p)] =
                int4_mma_sub_mul<T>(int4_mma_offset_pair<T>(words[w], p), z2[j], s2[j]);
          }
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) mma_m16n8k16<T>(acc[mi][j], af[mi], b[0], b[1]);
        }
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

  // Sum of the 4 k-warps of each n-tile: wk 2, 3 -> wk 0, 1, then wk 1 -> wk 0. Lane-minor
  // layout: consecutive lanes hit consecutive banks.
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kPer = Cfg::kAccPerLane;
  auto buf = [&](int b) { return red + (b * kInt4GemmBlockNTiles + wn) * kPer * 32 + lane; };
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
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int row, col;
        int4_gemm_c_coords(lane, j, i, &row, &col);
        const int64_t m = m0 + 16 * mi + row, n = nt_warp * kInt4MmaTileN + col;
        if (m >= a.M || n >= a.N) continue;
        if (a.splits == 1) {
          a.out[m * a.out_row_stride + n] =
              int4_gemm_epilogue<T>(acc[mi][j][i], a.bias, a.bias_dtype, n);
        } else {
          a.partials[(int64_t(split) * a.M + m) * a.Np + n] = acc[mi][j][i];
        }
      }
    }
  }
}

// MT = 2, 4 (64 / 128 fp32 accumulators per thread, 84 / 87 KiB of smem) run one block per SM
// and may use up to 255 registers; MT = 1 (68 KiB) fits two blocks per SM on sm_80 / sm_90
// (164 / 228 KiB), which needs <= 128 registers (64 K registers / 512 threads).
template <int MT>
__global__ void __launch_bounds__(kThreads, MT == 1 ? 2 : 1)
    sm80_f16_int4_gemm_kernel(const GemmArgs a) {
  gemm_body<DType::kFloat16, MT>(a);
}
template <int MT>
__global__ void __launch_bounds__(kThreads, MT == 1 ? 2 : 1)
    sm80_bf16_int4_gemm_kernel(const GemmArgs a) {
  gemm_body<DType::kBFloat16, MT>(a);
}

// Split-K reduction: y[m, n] = round(sum_s partials[s, m, n] + bias[n]), s in order.
template <DType T>
__global__ void __launch_bounds__(kThreads)
    int4_gemm_reduce_kernel(const float* partials, int splits, int64_t M, int64_t N, int64_t Np,
                            const void* bias, DType bias_dtype, uint16_t* out,
                            int64_t out_row_stride) {
  const int64_t total = M * N;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t m = i / N, n = i - m * N;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partials[(s * M + m) * Np + n];
    out[m * out_row_stride + n] = int4_gemm_epilogue<T>(v, bias, bias_dtype, n);
  }
}

// Act-order: x_perm[m, k] = x[m, perm[k]] (0 for -1, NaN for a perm value outside [-1, K);
// int4_gemm_gather_value).
// Consecutive threads take consecutive k: coalesced writes, gathered reads of a row of x that
// stays in L1/L2.
__global__ void __launch_bounds__(kThreads)
    int4_gemm_gather_kernel(const uint16_t* x, int64_t x_row_stride, int64_t M, int64_t K,
                            const int32_t* perm, int64_t Kp, uint16_t nan_bits, uint16_t* xp) {
  const int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= Kp) return;
  const int32_t src = perm[k];
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    xp[m * Kp + k] = int4_gemm_gather_value(x + m * x_row_stride, K, src, nan_bits);
  }
}

// ----- dense dequantization (large-M path) -----

template <DType O>
struct DenseOut {
  using type = uint16_t;
  static __device__ __forceinline__ uint16_t store(float v) {
    return uint16_t(int4_mma_float_to_half<O>(v));
  }
  static __device__ __forceinline__ uint16_t nan() {
    return O == DType::kFloat16 ? 0x7E00 : 0x7FC0;
  }
};
template <>
struct DenseOut<DType::kFloat32> {
  using type = float;
  static __device__ __forceinline__ float store(float v) { return v; }
  static __device__ __forceinline__ float nan() { return __int_as_float(0x7fffffff); }
};

// One thread per layout word (8 weights). W[n, perm[k]] = (q - z) * s in float, rounded once.
template <DType O>
__global__ void __launch_bounds__(kThreads)
    int4_gemm_dequantize_kernel(const Int4GemmDequantizeCudaParams p, int64_t Nt,
                                int64_t tiles_per_group) {
  using OT = typename DenseOut<O>::type;
  const int64_t words = p.Kp / kInt4MmaTileK * Nt * kInt4MmaTileWords;
  const int64_t Np = Nt * kInt4MmaTileN;
  OT* out = static_cast<OT*>(p.out);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < words;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t kt = i / (Nt * kInt4MmaTileWords);
    const int64_t r = i - kt * Nt * kInt4MmaTileWords;
    const int64_t nt = r / kInt4MmaTileWords;
    const int lane = int(r % kInt4MmaTileWords) / 4, w = int(r % 4);
    const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(p.qweight) + i);
    const int64_t g = kt / tiles_per_group;
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      int kk, nn;
      int4_mma_value_coords(lane, w, v, &kk, &nn);
      const int64_t n = nt * kInt4MmaTileN + nn, kp = kt * kInt4MmaTileK + kk;
      if (n >= p.N) continue;
      const int64_t k = p.perm != nullptr ? int64_t(__ldg(p.perm + kp)) : kp;
      if (k < 0 || k >= p.K) continue;
      const int q = int((word >> (4 * int4_mma_nibble_of_value(v))) & 0xFu);
      const int z = p.zeros != nullptr ? int(__ldg(p.zeros + g * Np + n)) : kInt4SymmetricZero;
      out[n * p.out_row_stride + k] =
          DenseOut<O>::store(float(q - z) * __ldg(p.scales + g * Np + n));
    }
  }
}

// Runs after the dequantization (stream order): a perm value outside [-1, K) poisons column 0.
template <DType O>
__global__ void __launch_bounds__(kThreads)
    int4_gemm_dequantize_poison_kernel(const Int4GemmDequantizeCudaParams p) {
  using OT = typename DenseOut<O>::type;
  const int64_t kp = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (kp >= p.Kp) return;
  const int32_t k = p.perm[kp];
  if (k >= -1 && k < p.K) return;
  OT* out = static_cast<OT*>(p.out);
  for (int64_t n = 0; n < p.N; ++n) out[n * p.out_row_stride] = DenseOut<O>::nan();
}

// ----- host side -----

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <DType T, int MT>
Status launch_gemm(const GemmArgs& a, int64_t n_blocks, int64_t m_blocks, cudaStream_t stream) {
  using Cfg = TileConfig<MT>;
  auto* kernel =
      T == DType::kFloat16 ? sm80_f16_int4_gemm_kernel<MT> : sm80_bf16_int4_gemm_kernel<MT>;
  // Above 48 KiB of dynamic shared memory needs the opt-in (CUDA C++ Programming Guide, "Shared
  // Memory"), a per-device function attribute: set once per device, so that a captured call
  // (CUDA graphs) after a warm-up issues nothing but the launches.
  static std::atomic<uint64_t> opted_in{0};
  int device = 0;
  if (cuda_call_status(cudaGetDevice(&device)) != Status::kSuccess) return Status::kCudaError;
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit == 0 || (opted_in.load(std::memory_order_relaxed) & bit) == 0) {
    // A failure (e.g. a device whose per-block opt-in limit is below kSmemBytes) is cleared
    // and returned: left pending, an unrelated later launch check would raise it.
    const Status s = cuda_call_status(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
    if (s != Status::kSuccess) return s;
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  const dim3 grid(unsigned(n_blocks), unsigned(m_blocks), unsigned(a.splits));
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
    default:
      return launch_gemm<T, 4>(a, n_blocks, m_blocks, stream);
  }
}

Status check(const Int4GemmCudaParams& p) {
  if (p.x_dtype != DType::kFloat16 && p.x_dtype != DType::kBFloat16) {
    return Status::kInvalidArgument;
  }
  if (p.M < 0 || p.K < 0 || p.N < 0 || p.Kp < 0 || p.G < 0 || p.Kp % kInt4MmaTileK != 0) {
    return Status::kInvalidArgument;
  }
  if (p.bias != nullptr && !dtype_valid(p.bias_dtype)) return Status::kInvalidArgument;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  if (p.num_sms <= 0 || p.out == nullptr || p.out_row_stride < p.N) {
    return Status::kInvalidArgument;
  }
  const int64_t KT = p.Kp / kInt4MmaTileK;
  if (KT > 0) {
    if (p.G <= 0 || KT % p.G != 0) return Status::kInvalidArgument;
    if (p.qweight == nullptr || p.scales == nullptr || p.x == nullptr) {
      return Status::kInvalidArgument;
    }
    if (!aligned16(p.qweight) || !aligned16(p.scales) ||
        (p.zeros != nullptr && !aligned16(p.zeros))) {
      return Status::kInvalidArgument;
    }
    if (p.perm == nullptr &&
        (!aligned16(p.x) || p.x_row_stride % 8 != 0 || (p.M > 1 && p.x_row_stride < p.K))) {
      return Status::kInvalidArgument;
    }
    if (p.perm != nullptr && p.M > 1 && p.x_row_stride < p.K) return Status::kInvalidArgument;
  }
  if (p.perm == nullptr && p.K != p.Kp) return Status::kInvalidArgument;
  if (p.perm != nullptr && p.K > 0x7fffffff) return Status::kInvalidArgument;
  const int64_t bm = 16 * int64_t(int4_gemm_cuda_m_tiles(p.M));
  if ((p.M + bm - 1) / bm > 65535 || (p.N + 127) / 128 > 0x7fffffff) {
    return Status::kInvalidArgument;
  }
  const size_t ws = int4_gemm_cuda_workspace_size(p);
  if (ws > 0 && (p.workspace == nullptr || p.workspace_bytes < ws ||
                 (reinterpret_cast<uintptr_t>(p.workspace) & 255u) != 0)) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

}  // namespace

Status int4_gemm_cuda(const Int4GemmCudaParams& p, void* stream) {
  const Status s = check(p);
  if (s != Status::kSuccess || p.M == 0 || p.N == 0) return s;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t KT = p.Kp / kInt4MmaTileK;
  const int64_t Nt = (p.N + kInt4MmaTileN - 1) / kInt4MmaTileN;
  const int S = int4_gemm_cuda_splits(p.M, p.Kp, p.N, p.num_sms);

  GemmArgs a{};
  a.x = static_cast<const uint16_t*>(p.x);
  a.x_row_stride = p.x_row_stride;
  a.M = p.M;
  char* ws = static_cast<char*>(p.workspace);
  if (p.perm != nullptr && KT > 0) {
    uint16_t* xp = reinterpret_cast<uint16_t*>(ws);
    ws += (size_t(p.M) * size_t(p.Kp) * 2 + 255) / 256 * 256;
    const unsigned rows = unsigned(p.M < 65535 ? p.M : 65535);
    const dim3 grid(unsigned((p.Kp + kThreads - 1) / kThreads), rows);
    int4_gemm_gather_kernel<<<grid, kThreads, 0, st>>>(a.x, p.x_row_stride, p.M, p.K, p.perm, p.Kp,
                                                       p.x_dtype == DType::kFloat16
                                                           ? int4_mma_nan_bits<DType::kFloat16>()
                                                           : int4_mma_nan_bits<DType::kBFloat16>(),
                                                       xp);
    const Status gs = cuda_launch_status();
    if (gs != Status::kSuccess) return gs;
    a.x = xp;
    a.x_row_stride = p.Kp;
  }
  a.qweight = reinterpret_cast<const uint32_t*>(p.qweight);
  a.scales = p.scales;
  a.zeros = p.zeros;
  a.bias = p.bias;
  a.bias_dtype = p.bias_dtype;
  a.out = static_cast<uint16_t*>(p.out);
  a.out_row_stride = p.out_row_stride;
  a.partials = S > 1 ? reinterpret_cast<float*>(ws) : nullptr;
  a.N = p.N;
  a.Nt = Nt;
  a.Np = Nt * kInt4MmaTileN;
  a.KT = KT;
  a.tiles_per_group = KT > 0 ? KT / p.G : 1;
  a.stages = (KT + kInt4GemmStageKTiles - 1) / kInt4GemmStageKTiles;
  a.splits = S;

  const int mt = int4_gemm_cuda_m_tiles(p.M);
  const int64_t n_blocks = (Nt + kInt4GemmBlockNTiles - 1) / kInt4GemmBlockNTiles;
  const int64_t m_blocks = (p.M + 16 * mt - 1) / (16 * mt);
  const Status g = p.x_dtype == DType::kFloat16
                       ? launch_gemm_mt<DType::kFloat16>(a, mt, n_blocks, m_blocks, st)
                       : launch_gemm_mt<DType::kBFloat16>(a, mt, n_blocks, m_blocks, st);
  if (g != Status::kSuccess || S == 1) return g;

  const int64_t total = p.M * p.N;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = unsigned(blocks < 65535 ? blocks : 65535);
  auto* reduce = p.x_dtype == DType::kFloat16 ? int4_gemm_reduce_kernel<DType::kFloat16>
                                              : int4_gemm_reduce_kernel<DType::kBFloat16>;
  reduce<<<grid, kThreads, 0, st>>>(a.partials, S, p.M, p.N, a.Np, p.bias, p.bias_dtype, a.out,
                                    p.out_row_stride);
  return cuda_launch_status();
}

namespace {

template <DType O>
Status launch_dequantize(const Int4GemmDequantizeCudaParams& p, cudaStream_t st) {
  const int64_t KT = p.Kp / kInt4MmaTileK;
  const int64_t Nt = (p.N + kInt4MmaTileN - 1) / kInt4MmaTileN;
  const int64_t words = KT * Nt * kInt4MmaTileWords;
  const int64_t blocks = (words + kThreads - 1) / kThreads;
  int4_gemm_dequantize_kernel<O>
      <<<unsigned(blocks < 1048576 ? blocks : 1048576), kThreads, 0, st>>>(p, Nt, KT / p.G);
  // One read of the launch error: a second cudaGetLastError would return success after a failed
  // launch, and the glue would multiply by a W that no kernel wrote.
  const Status s = cuda_launch_status();
  if (s != Status::kSuccess || p.perm == nullptr || p.K == 0) return s;
  int4_gemm_dequantize_poison_kernel<O>
      <<<unsigned((p.Kp + kThreads - 1) / kThreads), kThreads, 0, st>>>(p);
  return cuda_launch_status();
}

}  // namespace

Status int4_gemm_dequantize_cuda(const Int4GemmDequantizeCudaParams& p, void* stream) {
  if (!dtype_valid(p.out_dtype) || p.K < 0 || p.N < 0 || p.Kp < 0 || p.G < 0 ||
      p.Kp % kInt4MmaTileK != 0 || (p.perm == nullptr && p.K != p.Kp)) {
    return Status::kInvalidArgument;
  }
  const int64_t KT = p.Kp / kInt4MmaTileK;
  if (KT == 0 || p.N == 0) return Status::kSuccess;
  if (p.G <= 0 || KT % p.G != 0 || p.qweight == nullptr || p.scales == nullptr ||
      p.out == nullptr || p.out_row_stride < p.K || p.Kp / kThreads + 1 > 0x7fffffff) {
    return Status::kInvalidArgument;
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (p.out_dtype) {
    case DType::kFloat32:
      return launch_dequantize<DType::kFloat32>(p, st);
    case DType::kFloat16:
      return launch_dequantize<DType::kFloat16>(p, st);
    case DType::kBFloat16:
      return launch_dequantize<DType::kBFloat16>(p, st);
    default:
      return Status::kInvalidArgument;
  }
}

}  // namespace bitpress
