// CUDA kernel of sparse24_int4_gemm on the mma.sp layout (contract: bitpress/sparse24/
// sparse24_int4_gemm_cuda.h; layout, decode and index math: bitpress/sparse24/sparse24_int4_mma.h,
// emulated on the CPU by tests/cpp/test_sparse24_int4_mma.cpp; PTX wrappers and the swizzle:
// bitpress/cuda/primitives.cuh). "sm80" = the mma.sp generation; the same code runs on sm_90a.
//
// The 2:4 kernel (csrc/sparse24/sparse24_gemm_sm80.cu) with its kept values as INT4 codes
// (Sparse-Marlin's format class): y^T = W x^T, W the sparse A operand of mma.sp.m16n8k32, x^T the
// B operand (8 rows of x per mma). The A fragment is not loaded but decoded: one 32-bit word per
// lane per 16 x 32 tile holds its 8 codes, and 4 x (lop3, sub, fma) on half2 registers turn them
// into the 4 A registers with the group's scale and zero point (sparse24_int4_mma.h).
//   * block = 256 threads = 8 warps, 64 output features (4 n16 tiles) x BM = 8 MT rows of x
//     (MT = 1, 2, 4 by M); stages of 256 K; grid (ceil(M/BM), N/64, S splits of K).
//   * a stage (4 KiB of codes, 2 KiB of metadata, the scale / zero rows of its <= 8 groups, BM x
//     512 B of x) is copied global -> shared by 16-byte cp.async.cg (L2 only), kStages deep. At
//     M <= 16 the kernel is bound by the weight stream: 0.25 (codes) + 0.125 (metadata) + the
//     group constants (2 / 128 bytes for fp16 scales, group 128) per dense weight, against 2 for
//     a dense bf16 GEMM and 0.52 for dense INT4 with the same groups.
//   * warp (wn, wk): tile row wn, metadata pairs wk and wk + 2 of the stage (k-tiles 2 pp and
//     2 pp + 1, selectors 0 and 1). Codes: one LDS.32 per lane per tile; metadata: one LDS.32 per
//     lane per pair; B by ldmatrix.x4 from an XOR-swizzled x tile (conflict-free).
//   * the two k-warps of a tile row add their accumulators through shared memory; S == 1: bias
//     and one rounding in the kernel; S > 1: fp32 partials for the reduction kernel.
// Shared memory per block: MT = 1, 2: 4 stages of 14 / 18 KiB; MT = 4: 3 of 26 KiB (under the
// 99 KiB per-block limit of sm_86 / sm_89, which run this sm_80 code as well).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>

#include "bitpress/cuda/primitives.cuh"
#include "bitpress/sparse24/sparse24_int4_gemm_cuda.h"
#include "bitpress/sparse24/sparse24_int4_mma.h"
#include "bitpress/sparse24/sparse24_mma_layout.h"

namespace bitpress {
namespace {

constexpr int kThreads = kSparse24Int4GemmThreads;
constexpr int kNT = kSparse24Int4BlockNTiles;              // tile rows per block
constexpr int kKT = kSparse24Int4StageKTiles;              // 8 k32 tiles per stage
constexpr int kPairs = kSparse24Int4StagePairs;            // 4 metadata pairs per stage
constexpr int kXRowChunks = kSparse24Int4StageK * 2 / 16;  // 32 chunks per row of x
static_assert(kThreads / 32 == kNT * 2, "one warp per (tile row, k-warp)");

template <int MT>
struct TileConfig {
  static constexpr int kStages = MT == 4 ? 3 : 4;
  static constexpr int kQChunks = kNT * kKT * 32 * 4 / 16;     // 256: 4 KiB of codes
  static constexpr int kMChunks = kNT * kPairs * 32 * 4 / 16;  // 128: 2 KiB of metadata
  static constexpr int kSChunks = kSparse24Int4StageGroups * kSparse24Int4GroupRowBytes / 16;
  static constexpr int kZChunks = kSChunks;              // 128 each: 2 KiB
  static constexpr int kXChunks = 8 * MT * kXRowChunks;  // BM rows x 512 B
  static constexpr int kSlotChunks = kQChunks + kMChunks + kSChunks + kZChunks + kXChunks;
  static constexpr int kSmemBytes = kStages * kSlotChunks * 16;
  static constexpr int kRedBytes = kNT * MT * 4 * 32 * 4;
  static_assert(kRedBytes <= kSmemBytes, "the reduction buffer reuses the pipeline's smem");
  static_assert(kQChunks == kThreads, "codes loader: one chunk per thread");
  static_assert(kMChunks + kSChunks == kThreads, "metadata and scales: one chunk per thread");
  static_assert(kZChunks <= kThreads, "zeros loader: one chunk per thread");
  static_assert(kSmemBytes <= 99 * 1024, "fits the sm_86 / sm_89 per-block limit");
};

struct GemmArgs {
  const uint16_t* x;
  int64_t x_row_stride, M, K;
  const uint32_t* qvalues;  // qvalues_mma words: (nt, kt, lane)
  const uint32_t* meta;     // meta_mma words: (nt, kp, lane)
  const unsigned char* scales;
  DType scales_dtype;
  int s_esize;
  const unsigned char* zeros;  // nullptr: symmetric
  DType zeros_dtype;
  int z_esize;
  int64_t gk;  // dense K per group
  int tpg;     // k-tiles per group: gk / 32
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

// A scale or zero point from the stage's rows in shared memory (dtype uniform over the grid).
__device__ __forceinline__ float smem_group_value(const unsigned char* base, int gi, int col,
                                                  DType dt, int esize) {
  const unsigned char* p = base + sparse24_int4_sz_smem_byte(gi, col, esize);
  switch (dt) {
    case DType::kFloat16:
      return __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(p)));
    case DType::kBFloat16:
      return __bfloat162float(__ushort_as_bfloat16(*reinterpret_cast<const uint16_t*>(p)));
    default:
      return *reinterpret_cast<const float*>(p);
  }
}

// Split s of S covers stages [begin, end) of `stages`, as evenly as possible.
__device__ __forceinline__ void split_range(int64_t stages, int splits, int s, int64_t* begin,
                                            int64_t* end) {
  const int64_t q = stages / splits, r = stages % splits;
  *begin = s * q + (s < r ? s : r);
  *end = *begin + q + (s < r ? 1 : 0);
}

// One k32 tile of one warp: decode the lane's 8 codes into the A fragment, then one mma.sp per
// m8 tile of x (B by ldmatrix from the swizzled x tile, as in sparse24_gemm).
template <DType T, int MT, int Sel>
__device__ __forceinline__ void mma_tile(float (&acc)[MT][4], uint32_t word,
                                         const uint32_t (&z2)[2], const uint32_t (&s2)[2],
                                         const uint32_t (&c2)[2], const int4* sX, int kk, int lane,
                                         uint32_t e) {
  uint32_t a[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    // Register p holds values a_2p, a_2p+1 of row g (p even) or g + 8 (p odd).
    a[p] = sparse24_int4_mma_decode<T>(sparse24_int4_mma_offset_pair<T>(word, p), z2[p & 1],
                                       s2[p & 1], c2[p & 1]);
  }
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
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
  // m-blocks vary fastest: the blocks of one weight strip run side by side and share it in L2.
  const int64_t nb = blockIdx.y;
  const int64_t m0 = int64_t(blockIdx.x) * 8 * MT;
  const int split = blockIdx.z;
  int64_t st_begin, st_end;
  split_range(a.stages, a.splits, split, &st_begin, &st_end);
  const int n_iters = int(st_end - st_begin);
  const int64_t nt_warp = nb * kNT + wn;
  const bool warp_has_n = nt_warp < a.Nt;

  auto load_stage = [&](int64_t st, int slot) {
    int4* sQ = smem + slot * Cfg::kSlotChunks;
    int4* sM = sQ + Cfg::kQChunks;
    int4* sS = sM + Cfg::kMChunks;
    int4* sZ = sS + Cfg::kSChunks;
    int4* sX = sZ + Cfg::kZChunks;
    {
      int ntl, kk, q;
      sparse24_int4_q_load_coords(tid, &ntl, &kk, &q);
      const int64_t nt = nb * kNT + ntl, kt = st * kKT + kk;
      const bool valid = nt < a.Nt && kt < a.KT;
      const uint32_t* src =
          valid ? a.qvalues + sparse24_int4_mma_word_index(nt, kt, 4 * q, a.KT) : a.qvalues;
      cp_async16(sQ + tid, src, valid);
    }
    int64_t g0, g1;
    sparse24_int4_stage_groups(st, a.K, a.gk, &g0, &g1);
    if (tid < Cfg::kMChunks) {
      int ntl, pp, q;
      sparse24_int4_m_load_coords(tid, &ntl, &pp, &q);
      const int64_t nt = nb * kNT + ntl, kp = st * kPairs + pp;
      const bool valid = nt < a.Nt && kp < a.KP;
      const uint32_t* src = valid ? a.meta + sparse24_mma_meta_index(nt, kp, 4 * q, a.KP) : a.meta;
      cp_async16(sM + tid, src, valid);
    } else {
      // Scales: the stage's group rows, the block's 64 columns (N % 16 == 0: a chunk of 4 or 8
      // columns is wholly inside or past N).
      const int c = tid - Cfg::kMChunks;
      int gi, col;
      sparse24_int4_sz_load_coords(c, a.s_esize, &gi, &col);
      if (gi < kSparse24Int4StageGroups) {
        const int64_t g = g0 + gi, n = nb * kSparse24Int4BlockN + col;
        const bool valid = g <= g1 && n < a.N;
        const unsigned char* src = valid ? a.scales + (g * a.N + n) * a.s_esize : a.scales;
        cp_async16(
            reinterpret_cast<unsigned char*>(sS) + sparse24_int4_sz_smem_byte(gi, col, a.s_esize),
            src, valid);
      }
    }
    if (a.zeros != nullptr && tid < Cfg::kZChunks) {
      int gi, col;
      sparse24_int4_sz_load_coords(tid, a.z_esize, &gi, &col);
      if (gi < kSparse24Int4StageGroups) {
        const int64_t g = g0 + gi, n = nb * kSparse24Int4BlockN + col;
        const bool valid = g <= g1 && n < a.N;
        const unsigned char* src = valid ? a.zeros + (g * a.N + n) * a.z_esize : a.zeros;
        cp_async16(
            reinterpret_cast<unsigned char*>(sZ) + sparse24_int4_sz_smem_byte(gi, col, a.z_esize),
            src, valid);
      }
    }
#pragma unroll
    for (int j = 0; j < (Cfg::kXChunks + kThreads - 1) / kThreads; ++j) {
      const int c = tid + kThreads * j;
      if (Cfg::kXChunks % kThreads == 0 || c < Cfg::kXChunks) {
        const int row = c / kXRowChunks, ch = c % kXRowChunks;
        const int64_t m = m0 + row, k = st * kSparse24Int4StageK + 8 * ch;
        // K % 32 == 0: a chunk is wholly inside or past K; past K it is zero-filled and never
        // read by an mma.
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

  // The decode constants of rows g and g + 8 of this warp's tile for k-tile kt of stage st.
  const int r0 = lane >> 2;
  auto group_consts = [&](const unsigned char* sS, const unsigned char* sZ, int64_t g0, int64_t kt,
                          uint32_t (&z2)[2], uint32_t (&s2)[2], uint32_t (&c2)[2]) {
    const int gi = sparse24_int4_group_of_ktile(int(kt), a.tpg) - int(g0);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = wn * kSparse24MmaTileN + r0 + 8 * h;
      const float s = smem_group_value(sS, gi, col, a.scales_dtype, a.s_esize);
      const float z =
          a.zeros != nullptr ? smem_group_value(sZ, gi, col, a.zeros_dtype, a.z_esize) : 8.f;
      uint32_t zb, sb, cb;
      sparse24_int4_mma_group_consts<T>(s, z, &zb, &sb, &cb);
      z2[h] = sparse24_int4_mma_splat(zb);
      s2[h] = sparse24_int4_mma_splat(sb);
      c2[h] = sparse24_int4_mma_splat(cb);
    }
  };

  auto compute_stage = [&](int64_t st, int slot) {
    const int4* sQ = smem + slot * Cfg::kSlotChunks;
    const uint32_t* sQw = reinterpret_cast<const uint32_t*>(sQ);
    const uint32_t* sM = reinterpret_cast<const uint32_t*>(sQ + Cfg::kQChunks);
    const unsigned char* sS =
        reinterpret_cast<const unsigned char*>(sQ + Cfg::kQChunks + Cfg::kMChunks);
    const unsigned char* sZ = sS + Cfg::kSChunks * 16;
    const int4* sX = sQ + Cfg::kQChunks + Cfg::kMChunks + Cfg::kSChunks + Cfg::kZChunks;
    if (!warp_has_n) return;  // warp-uniform
    int64_t g0, g1;
    sparse24_int4_stage_groups(st, a.K, a.gk, &g0, &g1);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int pp = wk + 2 * j;
      const int64_t kp = st * kPairs + pp;
      if (kp >= a.KP) break;  // warp-uniform; later pairs are past K too
      const uint32_t e = sM[(wn * kPairs + pp) * 32 + lane];
      uint32_t z2[2], s2[2], c2[2];
      const int kk0 = 2 * pp;
      const int64_t kt0 = st * kKT + kk0;
      group_consts(sS, sZ, g0, kt0, z2, s2, c2);
      mma_tile<T, MT, 0>(acc, sQw[(wn * kKT + kk0) * 32 + lane], z2, s2, c2, sX, kk0, lane, e);
      // K / 32 odd: the last pair has one k-tile (its selector-1 metadata is padding).
      if (kt0 + 1 < a.KT) {
        // group_size % 32 == 0: a group boundary may fall between the two k-tiles of a pair.
        if (sparse24_int4_group_of_ktile(int(kt0) + 1, a.tpg) !=
            sparse24_int4_group_of_ktile(int(kt0), a.tpg)) {
          group_consts(sS, sZ, g0, kt0 + 1, z2, s2, c2);
        }
        mma_tile<T, MT, 1>(acc, sQw[(wn * kKT + kk0 + 1) * 32 + lane], z2, s2, c2, sX, kk0 + 1,
                           lane, e);
      }
    }
  };

  // Pipeline: kStages - 1 stages in flight while one is computed (as in sparse24_gemm): the slot
  // refilled at iteration it was computed at it - 1, and the __syncthreads after the wait orders
  // every warp's reads of it before the new cp.async writes. Empty groups are committed past the
  // end so that wait_group always counts the same.
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

// Few accumulators (MT x 4 floats): two blocks per SM (<= 128 registers per thread) keep
// 2 x (kStages - 1) stages of the weight stream in flight per SM.
template <int MT>
__global__ void __launch_bounds__(kThreads, 2)
    sm80_f16_sparse24_int4_gemm_kernel(const GemmArgs a) {
  gemm_body<DType::kFloat16, MT>(a);
}
template <int MT>
__global__ void __launch_bounds__(kThreads, 2)
    sm80_bf16_sparse24_int4_gemm_kernel(const GemmArgs a) {
  gemm_body<DType::kBFloat16, MT>(a);
}

// Split-K reduction: y[m, n] = round(sum_s partials[s, m, n] + bias[n]), s in order.
template <DType T>
__global__ void __launch_bounds__(kThreads)
    sparse24_int4_gemm_reduce_kernel(const float* partials, int splits, int64_t M, int64_t N,
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

// ----- host side -----

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <DType T, int MT>
Status launch_gemm(const GemmArgs& a, int64_t n_blocks, int64_t m_blocks, cudaStream_t stream) {
  using Cfg = TileConfig<MT>;
  auto* kernel = T == DType::kFloat16 ? sm80_f16_sparse24_int4_gemm_kernel<MT>
                                      : sm80_bf16_sparse24_int4_gemm_kernel<MT>;
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
    default:
      return launch_gemm<T, 4>(a, n_blocks, m_blocks, stream);
  }
}

Status check(const Sparse24Int4GemmCudaParams& p) {
  if (p.x_dtype != DType::kFloat16 && p.x_dtype != DType::kBFloat16) {
    return Status::kInvalidArgument;
  }
  if (p.M < 0 || p.K < 0 || p.N < 0 || p.K % kSparse24MmaTileK != 0 ||
      p.N % kSparse24MmaTileN != 0) {
    return Status::kInvalidArgument;
  }
  if (p.group_size != -1 && (p.group_size <= 0 || p.group_size % kSparse24MmaTileK != 0)) {
    return Status::kInvalidArgument;
  }
  if (!dtype_valid(p.scales_dtype) || (p.zeros != nullptr && !dtype_valid(p.zeros_dtype))) {
    return Status::kInvalidArgument;
  }
  if (p.bias != nullptr && !dtype_valid(p.bias_dtype)) return Status::kInvalidArgument;
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  if (p.num_sms <= 0 || p.out == nullptr || p.out_row_stride < p.N) {
    return Status::kInvalidArgument;
  }
  if (p.K > 0) {
    if (p.qvalues == nullptr || p.meta == nullptr || p.x == nullptr || p.scales == nullptr) {
      return Status::kInvalidArgument;
    }
    if (!aligned16(p.qvalues) || !aligned16(p.meta) || !aligned16(p.x) || !aligned16(p.scales) ||
        (p.zeros != nullptr && !aligned16(p.zeros)) || p.x_row_stride % 8 != 0 ||
        (p.M > 1 && p.x_row_stride < p.K)) {
      return Status::kInvalidArgument;
    }
  }
  // k-tiles and group indices are 32-bit in the inner loop.
  if (p.K / kSparse24MmaTileK > 0x7fffffff ||
      sparse24_int4_group_k(p.group_size, p.K) > 0x7fffffff) {
    return Status::kInvalidArgument;
  }
  const int64_t bm = 8 * int64_t(sparse24_int4_gemm_cuda_m_tiles(p.M));
  if ((p.M + bm - 1) / bm > 0x7fffffff || (p.N / kSparse24MmaTileN + kNT - 1) / kNT > 65535) {
    return Status::kInvalidArgument;
  }
  const size_t ws = sparse24_int4_gemm_cuda_workspace_size(p);
  if (ws > 0 && (p.workspace == nullptr || p.workspace_bytes < ws ||
                 (reinterpret_cast<uintptr_t>(p.workspace) & 255u) != 0)) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

}  // namespace

Status sparse24_int4_gemm_cuda(const Sparse24Int4GemmCudaParams& p, void* stream) {
  const Status s = check(p);
  if (s != Status::kSuccess || p.M == 0 || p.N == 0 || p.K == 0) return s;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int S = sparse24_int4_gemm_cuda_splits(p.M, p.K, p.N, p.num_sms);

  GemmArgs a{};
  a.x = static_cast<const uint16_t*>(p.x);
  a.x_row_stride = p.x_row_stride;
  a.M = p.M;
  a.K = p.K;
  a.qvalues = reinterpret_cast<const uint32_t*>(p.qvalues);
  a.meta = reinterpret_cast<const uint32_t*>(p.meta);
  a.scales = static_cast<const unsigned char*>(p.scales);
  a.scales_dtype = p.scales_dtype;
  a.s_esize = dtype_size(p.scales_dtype);
  a.zeros = static_cast<const unsigned char*>(p.zeros);
  a.zeros_dtype = p.zeros_dtype;
  a.z_esize = p.zeros != nullptr ? dtype_size(p.zeros_dtype) : 4;
  a.gk = sparse24_int4_group_k(p.group_size, p.K);
  a.tpg = int(a.gk / kSparse24MmaTileK);
  a.bias = p.bias;
  a.bias_dtype = p.bias_dtype;
  a.out = static_cast<uint16_t*>(p.out);
  a.out_row_stride = p.out_row_stride;
  a.partials = S > 1 ? static_cast<float*>(p.workspace) : nullptr;
  a.N = p.N;
  a.Nt = p.N / kSparse24MmaTileN;
  a.KT = p.K / kSparse24MmaTileK;
  a.KP = sparse24_mma_padded_k(p.K) / kSparse24MmaPairK;
  a.stages = (p.K + kSparse24Int4StageK - 1) / kSparse24Int4StageK;
  a.splits = S;

  const int mt = sparse24_int4_gemm_cuda_m_tiles(p.M);
  const int64_t n_blocks = (a.Nt + kNT - 1) / kNT;
  const int64_t m_blocks = (p.M + 8 * mt - 1) / (8 * mt);
  const Status g = p.x_dtype == DType::kFloat16
                       ? launch_gemm_mt<DType::kFloat16>(a, mt, n_blocks, m_blocks, st)
                       : launch_gemm_mt<DType::kBFloat16>(a, mt, n_blocks, m_blocks, st);
  if (g != Status::kSuccess || S == 1) return g;

  const int64_t total = p.M * p.N;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = unsigned(blocks < 65535 ? blocks : 65535);
  auto* reduce = p.x_dtype == DType::kFloat16 ? sparse24_int4_gemm_reduce_kernel<DType::kFloat16>
                                              : sparse24_int4_gemm_reduce_kernel<DType::kBFloat16>;
  reduce<<<grid, kThreads, 0, st>>>(a.partials, S, p.M, p.N, p.bias, p.bias_dtype, a.out,
                                    p.out_row_stride);
  return cuda_launch_status();
}

}  // namespace bitpress
