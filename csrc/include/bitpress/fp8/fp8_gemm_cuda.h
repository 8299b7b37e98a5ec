// fp8_gemm on Hopper (sm_90a): y = (a · scale_a)(b · scale_b)ᵀ (+ bias), E4M3 operands on the FP8
// tensor cores (wgmma), fp32 accumulation. Kernel and design notes in csrc/fp8/fp8_gemm_sm90a.cu,
// index maps in bitpress/fp8/fp8_wgmma_layout.h. Torch-free.
//
//   a        E4M3 [M, K]   row-major (K-major), row stride a_row_stride bytes
//   b        E4M3 [N, K]   row-major (K-major: a Linear's weight as it is; Hopper's FP8 wgmma
//                          reads only K-major operands), row stride b_row_stride bytes
//   scale_a  fp32          kTensor: [1]; kRow: [M] (one per row); kBlock: [M, KB] (1 x 128
//                          blocks along K), KB = ceil(K / 128), contiguous
//   scale_b  fp32          kTensor: [1]; kRow: [N]; kBlock: [ceil(N/128), KB] (128 x 128 blocks)
//   bias     fp32 [N]      optional
//   out      [M, N]        bf16 / fp16 / fp32, row stride out_row_stride elements
//
//   y[m, n] = sum_kb sa(m, kb) sb(n, kb) sum_{k in block kb} a[m, k] b[n, k] + bias[n]
//
// with sa / sb the operand's scale for that row and K block (the same for every kb unless kBlock).
// The sum over one K block of 128 is one wgmma chain (4 x k32, the tensor core's own accumulator),
// then scaled and added to an fp32 register accumulator ("promotion", DeepSeek-V3 §3.3.2: Hopper's
// FP8 MMA keeps ~14 bits of the running sum, so the chain is never longer than 128 K).
//
// Requirements (kInvalidArgument otherwise; the torch glue zero-pads K to a multiple of 16 and
// copies misaligned operands): K % 16 == 0 (rows are copied in 16-byte chunks),
// a, b 16-byte aligned, row strides multiples of 16 bytes and >= K; out_row_stride >= N. M and N
// are arbitrary: rows past M / N are zero-filled in shared memory and not stored. The device must
// be compute capability 9.0 (the sm_90a image runs nowhere else).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "bitpress/common/macros.h"
#include "bitpress/common/status.h"
#include "bitpress/fp8/fp8_wgmma_layout.h"

namespace bitpress {

enum class Fp8ScaleMode : int {
  kTensor = 0,  // one scale for the whole operand
  kRow = 1,     // one per row (a: per token, b: per output channel)
  kBlock = 2,   // a: 1 x 128 blocks [M, KB]; b: 128 x 128 blocks [ceil(N/128), KB]
};

inline bool fp8_scale_mode_valid(Fp8ScaleMode m) {
  return m == Fp8ScaleMode::kTensor || m == Fp8ScaleMode::kRow || m == Fp8ScaleMode::kBlock;
}

struct Fp8GemmCudaParams {
  const uint8_t* a = nullptr;  // E4M3 bytes
  int64_t a_row_stride = 0;    // bytes
  const uint8_t* b = nullptr;
  int64_t b_row_stride = 0;  // bytes
  int64_t M = 0, N = 0, K = 0;
  const float* scale_a = nullptr;
  Fp8ScaleMode scale_a_mode = Fp8ScaleMode::kTensor;
  const float* scale_b = nullptr;
  Fp8ScaleMode scale_b_mode = Fp8ScaleMode::kTensor;
  const float* bias = nullptr;  // optional
  void* out = nullptr;
  DType out_dtype = DType::kBFloat16;  // kBFloat16, kFloat16 or kFloat32
  int64_t out_row_stride = 0;          // elements
  // Multiprocessors of the device (cudaDevAttrMultiProcessorCount): sets the split-K factor, hence
  // the workspace size.
  int num_sms = 0;
  void* workspace = nullptr;  // fp8_gemm_cuda_workspace_size(*this) bytes, 256-byte aligned
  size_t workspace_bytes = 0;
};

// Rows of one block tile: 64 (one consumer warpgroup) for M <= 64, else 128 (two warpgroups, each
// its own m64 half, sharing the B tile).
inline int fp8_gemm_cuda_block_m(int64_t M) { return M <= kFp8WgmmaM ? 64 : 128; }

// Split-K factor S. The M x N tiles alone fill the GPU at large M; at decode sizes (M <= 16, a few
// dozen 128-column tiles for a Llama layer) they would leave most of the 132 SMs idle while the
// GEMM is bound by reading b once. Then K is cut into S ranges of whole 128-K tiles. S minimizes a
// model of the critical path in units of one K tile's load: waves(S) x (ceil(KT / S) + the split's
// fp32 partial write and read back, 2 x 4 m / (m + 128) tiles for the m = min(M, BM) rows stored),
// waves(S) = ceil(tiles S / num_sms): a split count that leaves a last wave mostly empty loses to a
// smaller one. At least 2 K tiles per split (the cp.async ring has something to overlap) and at
// most 32 splits (workspace); the smallest S wins ties.
inline int fp8_gemm_cuda_splits(int64_t M, int64_t N, int64_t K, int num_sms) {
  const int64_t kt = (K + kFp8TileK - 1) / kFp8TileK;
  const int64_t bm = fp8_gemm_cuda_block_m(M);
  const int64_t tiles = ((N + kFp8TileN - 1) / kFp8TileN) * ((M + bm - 1) / bm);
  if (num_sms <= 0 || tiles <= 0 || kt < 4) return 1;
  const double m = double(M < bm ? M : bm);
  const double partial_cost = 2.0 * 4.0 * m / (m + 128.0);
  const int64_t max_s = kt / 2 < 32 ? kt / 2 : 32;
  int best = 1;
  // S = 1: the whole K per block, no partials. With many tiles (large M) every split only adds
  // waves and partial traffic, so S = 1 stays; at M <= 16 a count of tiles just above a multiple
  // of the SMs (224 tiles for N = 28672) is evened out by splitting.
  double best_t = double((tiles + num_sms - 1) / num_sms) * double(kt);
  for (int64_t s = 2; s <= max_s; ++s) {
    const int64_t waves = (tiles * s + num_sms - 1) / num_sms;
    const double t = double(waves) * (double((kt + s - 1) / s) + partial_cost);
    if (t < best_t) {
      best_t = t;
      best = int(s);
    }
  }
  return best;
}

// Block tile of the linear block index `block` (blockIdx.x) on a grid of tiles_m x tiles_n tiles:
// groups of kFp8GroupM tile rows, column-major inside a group (Triton's "grouped ordering"). The
// ~132 blocks resident at once then cover a few A row panels x a few dozen B column panels instead
// of one A panel x all of B: at M = 4096, N = 14336, K = 4096 B (58 MB) exceeds the 50 MB L2, and
// row-major order would read it from DRAM once per 128 rows of A; grouped, once per 8 x 128 rows.
constexpr int kFp8GroupM = 8;
struct Fp8TileIndex {
  int64_t m, n;
};
BITPRESS_INLINE constexpr Fp8TileIndex fp8_gemm_tile_of_block(int64_t block, int64_t tiles_m,
                                                              int64_t tiles_n) {
  const int64_t per_group = int64_t(kFp8GroupM) * tiles_n;
  const int64_t group = block / per_group, first_m = group * kFp8GroupM;
  const int64_t group_m = tiles_m - first_m < kFp8GroupM ? tiles_m - first_m : kFp8GroupM;
  const int64_t r = block % per_group;
  return {first_m + r % group_m, r / group_m};
}

// K tiles [begin, end) of split `split` out of S over kt tiles: as even as possible, the first
// kt % S splits one tile longer. Shared by the kernel and its emulation.
BITPRESS_INLINE constexpr int64_t fp8_gemm_split_begin(int64_t kt, int split, int S) {
  return (kt / S) * split + (split < kt % S ? split : kt % S);
}

// Workspace bytes: the split-K partials [S, M, N] fp32 when S > 1, else 0.
inline size_t fp8_gemm_cuda_workspace_size(const Fp8GemmCudaParams& p) {
  if (p.M <= 0 || p.N <= 0 || p.K <= 0) return 0;
  const int S = fp8_gemm_cuda_splits(p.M, p.N, p.K, p.num_sms);
  return S > 1 ? size_t(S) * size_t(p.M) * size_t(p.N) * sizeof(float) : 0;
}

// Sizes, strides, alignment, dtypes, pointers where there is work, and the workspace size; not
// the values on the device. Shared by the CUDA entry point and the build without it.
inline Status fp8_gemm_cuda_check(const Fp8GemmCudaParams& p) {
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.K % 16) return Status::kInvalidArgument;
  if (p.out_dtype != DType::kBFloat16 && p.out_dtype != DType::kFloat16 &&
      p.out_dtype != DType::kFloat32) {
    return Status::kInvalidArgument;
  }
  if (!fp8_scale_mode_valid(p.scale_a_mode) || !fp8_scale_mode_valid(p.scale_b_mode)) {
    return Status::kInvalidArgument;
  }
  if (p.M == 0 || p.N == 0) return Status::kSuccess;
  if (!p.out || p.out_row_stride < p.N) return Status::kInvalidArgument;
  if (p.K == 0) return Status::kSuccess;
  if (!p.a || !p.b || !p.scale_a || !p.scale_b) return Status::kInvalidArgument;
  if ((reinterpret_cast<uintptr_t>(p.a) | reinterpret_cast<uintptr_t>(p.b)) & 15) {
    return Status::kInvalidArgument;
  }
  if (p.a_row_stride < p.K || p.b_row_stride < p.K || p.a_row_stride % 16 || p.b_row_stride % 16) {
    return Status::kInvalidArgument;
  }
  const size_t ws = fp8_gemm_cuda_workspace_size(p);
  if (ws > 0 && (!p.workspace || p.workspace_bytes < ws ||
                 (reinterpret_cast<uintptr_t>(p.workspace) & 255))) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

// Asynchronous on `stream` (a cudaStream_t; null: the legacy default stream); no allocation, no
// host synchronization (CUDA-graph capturable). K == 0 writes bias (or zeros). kInvalidArgument as
// fp8_gemm_cuda_check; kUnsupported in a build without CUDA or without the sm_90a image;
// kCudaError when a launch fails (e.g. on a device that is not compute capability 9.0: the caller
// checks the device, as the torch glue does).
Status fp8_gemm_cuda(const Fp8GemmCudaParams& p, void* stream);

}  // namespace bitpress
