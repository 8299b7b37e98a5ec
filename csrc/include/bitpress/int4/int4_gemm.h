// int4_gemm: y = x · Wᵀ (+ bias) with W an INT4 weight in the bitpress CPU tile layout.
//
//   W[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n]
//   y[m, n] = sum_k x[m, k] W[n, k] + bias[n]
//
// Layout (python/bitpress/formats/int4_layout.py has the full description and the repack):
//   qweight      int32   [Nt, Kp/8, 64]  Nt = ceil(N/64); word [t, o, c] holds rows 8o..8o+7 of
//                                       column 64t+c, row 8o+j in nibble position NIBBLE_OF_ROW[j]
//                                       (nibble i holds row (0,2,4,6,1,3,5,7)[i])
//   scales       float32 [Nt, G, 64]
//   zeros        uint8   [Nt, G, 64]    or null: every zero point is 8
//   group_starts int32   [G+1]          first octet of each group; groups are contiguous
//   perm         int32   [Kp]           source column of x for each packed row, -1 = zero row;
//                                       null: the identity (Kp == K)
//   x            [M, K]  float32 / float16 / bfloat16, unit stride along K
//   bias         [N]     optional, any of the three dtypes
//   out          [M, N]  float32 / float16 / bfloat16, unit stride along N
//
// Kernels (chosen by active_cpu_isa() and the x dtype):
//   * kAmx, x in bf16/fp16, M >= 3, every group start a multiple of 4 octets (group sizes multiple
//     of 32): the panels of (128 + q) bf16 pairs below go to the AMX tiles of the shared GEMM
//     microkernel (bitpress/cpu/gemm_microkernel.h, tdpbf16ps, 32 x 64 blocks); each group's
//     float32 partial sums are folded in as on the AVX-512 path. Other shapes on kAmx run the
//     AVX-512 code.
//   * AVX-512 + AVX512_BF16, x in bf16/fp16: vdpbf16ps on (128 + q) bf16 pairs; fp16 x is split
//     into two bf16 terms hi + lo (exact for fp16). The 128 offset and the zero points are removed
//     per group with the group sum of x.
//   * otherwise (fp32 x, AVX2, the portable path): unpacked q as float32, FMA with x in float32.
// Results are accumulated in float32 and rounded once to the output dtype.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/common/status.h"
#include "bitpress/int4/int4_mma_layout.h"

namespace bitpress {

constexpr int kInt4TileN = 64;

struct Int4GemmParams {
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;
  int64_t x_row_stride = 0;
  int64_t M = 0, K = 0;
  const int32_t* qweight = nullptr;
  const float* scales = nullptr;
  const uint8_t* zeros = nullptr;         // optional
  const int32_t* group_starts = nullptr;  // [G+1]
  const int32_t* perm = nullptr;          // optional
  int64_t Kp = 0, G = 0, N = 0;
  const void* bias = nullptr;  // optional
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;
  DType out_dtype = DType::kBFloat16;
  int64_t out_row_stride = 0;
  // int4_gemm_cpu_workspace_size() bytes, 64-byte aligned; or null: the calling thread's own
  // reusable buffer (thread_local in the library, grown when a call needs more, kept for the next
  // calls: no allocation and no page faults per call in steady state; freed at thread exit).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Bytes of workspace int4_gemm_cpu needs for these sizes.
size_t int4_gemm_cpu_workspace_size(int64_t M, int64_t Kp, int64_t G);

// Checks sizes, pointers and group_starts (monotonic, ending at Kp/8) and perm values.
Status int4_gemm_check(const Int4GemmParams& p);

// Per-thread buffers (thread_local, grown when needed and reused across calls, so that steady-state
// calls neither allocate nor fault pages): the workspace when p.workspace is null (the calling
// thread's), and the panel paths' float32 accumulators (up to 256 KiB per pool thread; the AVX-512
// panel path falls back to one tile x 16 rows on the stack when that buffer cannot grow, the AMX
// path returns kOutOfMemory). The AMX tile configuration is per thread too (ldtilecfg once per
// thread and shape).
Status int4_gemm_cpu(const Int4GemmParams& p, const CpuThreadPool* pool = nullptr);

// The dense path's arithmetic without its workspace, on AMX: per chunk of 512 rows of K, the
// weight of 4 tiles decoded to bf16 pairs of (q - z) s (float32 product, rounded once to bf16:
// the values int4_gemm_decode_cpu writes for bf16) and multiplied by bf16 x on the tiles, the
// float32 C accumulated across the chunks (no per-group fold: the scale is in the weight). bf16 x
// only, Kp a multiple of 32, AMX active (int4_gemm_dequant_amx_supported); else kUnsupported.
// Threads: the pool; per-thread buffers as int4_gemm_cpu's.
bool int4_gemm_dequant_amx_supported(const Int4GemmParams& p);
Status int4_gemm_cpu_dequant_amx(const Int4GemmParams& p, const CpuThreadPool* pool = nullptr);

// Dense decode (the dense path of int4_gemm: decode once into a reused workspace, then a dense
// GEMM): Wt[k, n] = W[n, k] = (q - z) * s for every row k of x, computed in float32 and rounded
// once to wt_dtype (float32, float16 or bfloat16). Wt is [K, N] with row stride wt_row_stride
// elements (>= N); rows of x that perm does not name are zero. Uses p's weight fields and K, N
// (not x, bias or out).
Status int4_gemm_decode_cpu(const Int4GemmParams& p, void* wt, DType wt_dtype,
                            int64_t wt_row_stride, const CpuThreadPool* pool = nullptr);

// ---------------------------------------------------------------------------------------------
// W4A8 (opt-in): x quantized per row to int8 on the fly, int8 x int4 products summed exactly in
// int32 per group, then folded in float32 (csrc/int4/int4_gemm_w4a8_cpu.cpp has the formula):
//   sx[m] = amax_k |x[m, k]| / 127 (float32; 1 when the row is all zeros),
//   xq = round_half_even(x / sx) in float32, clamped to [-127, 127],
//   y[m, n] = sx[m] sum_g s[g, n] (sum_{k in g} xq[m, k] q[k, n] - z[g, n] sum_{k in g} xq[m, k])
//             + bias[n]
// Same parameters as int4_gemm_cpu (any x dtype, any output dtype); p.workspace is not used (the
// calling thread's reusable buffer holds xq). Non-finite x gives unspecified output.
// ---------------------------------------------------------------------------------------------

enum class Int4W4A8Kernel : int {
  kAuto = -1,
  kAmx = 0,          // tdpbssd (AMX-INT8); every group start a multiple of 8 octets (64 rows)
  kVnni = 1,         // vpdpbusd (AVX512-VNNI): q unsigned, xq signed
  kScalar = 2,       // portable
  kAmxEmulated = 3,  // the AMX variant's loop nest with a scalar model of the tiles (tests)
};

const char* int4_w4a8_kernel_name(Int4W4A8Kernel k);
bool int4_w4a8_kernel_available(Int4W4A8Kernel k);
// kAmx on kAmx ISA with amx_int8 (M >= 2, groups of whole 64-row steps), else kVnni at ISA >=
// kAvx512 with avx512_vnni, else kScalar. BITPRESS_CPU_ISA caps it like the bf16 path.
Int4W4A8Kernel int4_w4a8_kernel_for(const Int4GemmParams& p);
// kUnsupported when this CPU cannot run `kernel`; kInvalidArgument as int4_gemm_check, or for
// kAmx / kAmxEmulated with a group start that is not a multiple of 8 octets. Every variant gives
// the same output bit for bit (same int32 sums, same float32 fold order).
Status int4_gemm_w4a8_cpu(const Int4GemmParams& p, const CpuThreadPool* pool = nullptr,
                          Int4W4A8Kernel kernel = Int4W4A8Kernel::kAuto);

// ---------------------------------------------------------------------------------------------
// Repack: GPTQ tensors -> the tile layout above (what python/bitpress/formats/int4_layout.py
// does at load time), for runtimes that load checkpoints without Python.
// ---------------------------------------------------------------------------------------------

struct Int4PackParams {
  const int32_t* qweight = nullptr;  // [K/8, N], packed along K (GPTQ)
  int64_t qweight_row_stride = 0;
  const int32_t* qzeros = nullptr;  // [G, ceil(N/8)] real zero points ("gptq_v2"), or null: 8
  int64_t qzeros_row_stride = 0;
  const void* scales = nullptr;  // [G, N]
  DType scales_dtype = DType::kFloat16;
  int64_t scales_row_stride = 0;
  const int32_t* g_idx = nullptr;  // [K] group of each row, or null: k / group_size
  int64_t K = 0, N = 0, G = 0, group_size = 0;
};

// Kp of the packed layout: K with each group's rows padded to whole octets.
Status int4_gemm_pack_size(const Int4PackParams& p, int64_t* Kp);

// Writes qweight_tiles [Nt, Kp/8, 64], scales_tiles [Nt, G, 64], zeros_tiles [Nt, G, 64] (skipped
// when null; with qzeros null it is filled with 8), group_starts [G+1] and perm [Kp]. Rows of a
// group keep their order; padding rows and columns past N are zero (perm -1).
Status int4_gemm_pack(const Int4PackParams& p, int32_t* qweight_tiles, float* scales_tiles,
                      uint8_t* zeros_tiles, int32_t* group_starts, int32_t* perm);

// ---------------------------------------------------------------------------------------------
// Repack to the GPU mma layout (bitpress/int4/int4_mma_layout.h): the qweight the CUDA int4_gemm
// reads.
//
//   qweight  int32 [K/8, N]           GPTQ packing: q[k, n] = (qweight[k/8, n] >> 4(k%8)) & 0xF
//   perm     int32 [Kp]               source row of each packed row, -1: a zero (padding) row;
//                                     null: the identity (Kp == K). Kp % 16 == 0.
//   out      int32 [Kp/16, Nt*128]    Nt = ceil(N/64); word (kt, nt*128 + 4*lane + w), nibble i,
//                                     holds q[perm[16kt + kk], 64nt + nn] with (kk, nn) =
//                                     int4_mma_value_coords(lane, w, kInt4MmaRowOfNibble[i]);
//                                     0 for perm -1 and for columns >= N.
// ---------------------------------------------------------------------------------------------

struct Int4RepackParams {
  const int32_t* qweight = nullptr;  // [K/8, N], unit stride along N
  int64_t qweight_row_stride = 0;    // words, >= N
  const int32_t* perm = nullptr;     // [Kp], or null: the identity
  int64_t K = 0, N = 0, Kp = 0;      // K % 8 == 0, Kp % 16 == 0
  int32_t* out = nullptr;            // [Kp/16, out_row_stride], every word of a row written
  int64_t out_row_stride = 0;        // words, >= Nt * 128
};

// Sizes, strides and pointers (where there is work) of a repack; not the perm values. Shared by
// the CPU and CUDA entry points.
inline Status int4_gemm_repack_check_sizes(const Int4RepackParams& p) {
  if (p.K < 0 || p.N < 0 || p.Kp < 0 || p.K % 8 || p.Kp % kInt4MmaTileK) {
    return Status::kInvalidArgument;
  }
  if (!p.perm && p.Kp != p.K) return Status::kInvalidArgument;
  const int64_t Nt = (p.N + kInt4MmaTileN - 1) / kInt4MmaTileN;
  if (p.Kp == 0 || Nt == 0) return Status::kSuccess;
  if (!p.out || p.out_row_stride < Nt * kInt4MmaTileWords) return Status::kInvalidArgument;
  if (p.K > 0 && (!p.qweight || p.qweight_row_stride < p.N)) return Status::kInvalidArgument;
  return Status::kSuccess;
}

// kInvalidArgument for bad sizes, strides, null pointers (where there is work) and perm values
// outside [-1, K).
Status int4_gemm_repack_cpu(const Int4RepackParams& p, const CpuThreadPool* pool = nullptr);

// Asynchronous on `stream` (a cudaStream_t; null: the legacy default stream). Sizes and pointers
// are checked on the host; perm lives on the device and is not checked (that would need a host
// sync): a perm value outside [-1, K) is written as a padding row (zeros), and nothing outside
// qweight is read. kUnsupported in a build without CUDA.
Status int4_gemm_repack_cuda(const Int4RepackParams& p, void* stream);

}  // namespace bitpress

// ---------------------------------------------------------------------------------------------
// CUDA int4_gemm: the same formula, weights in the GPU mma layout
// (bitpress/int4/int4_mma_layout.h); kernel and design notes in csrc/int4/int4_gemm_sm80.cu, index
// math in bitpress/int4/int4_mma_dequant.h.
//
//   x        [M, K]        float16 / bfloat16, unit stride along K; without perm the rows are
//                          read by 16-byte cp.async: x 16-byte aligned, x_row_stride % 8 == 0
//   qweight  int32 [Kp/16, Nt*128]   Nt = ceil(N/64), Kp % 16 == 0
//   scales   float32 [G, Np]         Np = 64 Nt; rounded once to x's type per group
//   zeros    uint8 [G, Np]           or null: every zero point is 8
//   perm     int32 [Kp]              or null: the identity (K == Kp). Packed row k multiplies
//                                    x[:, perm[k]]; -1: padding row (x gathered as 0)
//   bias     [N]                     optional, float32 / float16 / bfloat16
//   out      [M, N]                  x's dtype, unit stride along N
// Groups are uniform (the layout pads every group to the same number of k-tiles): the group of
// k-tile kt is kt / ((Kp/16) / G); group_starts is not needed.
//
// Steps, all on `stream`, no host synchronization, no allocation:
//   1. perm: gather x into the workspace x_perm [M, Kp] (0 for -1; NaN for a perm value outside
//      [-1, K), which is not checked on the host: that would need a device-to-host copy).
//   2. the GEMM kernel (mma.sync.m16n8k16, fp32 accumulation), split along K over S blocks when
//      the M x N tiles underfill the GPU (S = int4_gemm_cuda_splits); S == 1: bias added and
//      rounded once to x's type in the kernel; S > 1: fp32 partials [S, M, Np] in the workspace,
//   3. then a reduction kernel sums them in split order (deterministic), adds bias, rounds once.
// Any M (the torch glue sends large M to cuBLAS instead, see csrc/int4/int4_gemm_cuda_torch.cpp),
// any N (columns >= N are not stored), any K (k-tiles past Kp are skipped).
// ---------------------------------------------------------------------------------------------

namespace bitpress {

struct Int4GemmCudaParams {
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;  // kFloat16 or kBFloat16; out has the same type
  int64_t x_row_stride = 0;          // elements
  int64_t M = 0, K = 0;
  const int32_t* qweight = nullptr;  // 16-byte aligned, as are scales and zeros
  const float* scales = nullptr;
  const uint8_t* zeros = nullptr;  // optional
  const int32_t* perm = nullptr;   // optional
  int64_t Kp = 0, G = 0, N = 0;
  const void* bias = nullptr;  // optional
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;
  int64_t out_row_stride = 0;  // elements
  // Multiprocessors of the device (cudaDevAttrMultiProcessorCount): sets S, hence the workspace.
  int num_sms = 0;
  void* workspace = nullptr;  // int4_gemm_cuda_workspace_size(*this) bytes, 256-byte aligned
  size_t workspace_bytes = 0;
};

// Rows of x per block: 16 * int4_gemm_cuda_m_tiles(M) (one, two or four m16 tiles).
inline int int4_gemm_cuda_m_tiles(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

// Split-K factor S: enough blocks to cover num_sms once the ceil(N/128) x ceil(M/BM) output tiles
// underfill the GPU, with at least 2 stages of 128 K-rows per split (the cp.async pipeline needs
// a few stages in flight to pay off) and at most 64 (workspace).
inline int int4_gemm_cuda_splits(int64_t M, int64_t Kp, int64_t N, int num_sms) {
  const int64_t stages = (Kp / 16 + 7) / 8;
  const int64_t bm = 16 * int64_t(int4_gemm_cuda_m_tiles(M));
  const int64_t blocks = ((N + 127) / 128) * ((M + bm - 1) / bm);
  if (num_sms <= 0 || stages < 4 || blocks <= 0 || blocks >= num_sms) return 1;
  int64_t s = num_sms / blocks;
  if (s > stages / 2) s = stages / 2;
  if (s > 64) s = 64;
  return s < 1 ? 1 : int(s);
}

// Workspace bytes: x_perm [M, Kp] in x's type when perm is set (rounded up to 256), then the
// split-K partials [S, M, Np] float32 when S > 1.
inline size_t int4_gemm_cuda_workspace_size(const Int4GemmCudaParams& p) {
  if (p.M <= 0 || p.N <= 0) return 0;
  size_t bytes = 0;
  if (p.perm) bytes += (size_t(p.M) * size_t(p.Kp) * 2 + 255) / 256 * 256;
  const int S = int4_gemm_cuda_splits(p.M, p.Kp, p.N, p.num_sms);
  if (S > 1) bytes += size_t(S) * size_t(p.M) * size_t((p.N + 63) / 64 * 64) * 4;
  return bytes;
}

// kInvalidArgument for bad sizes, strides, dtypes, alignment or a small workspace; kCudaError
// when a launch fails; kUnsupported in a build without CUDA.
Status int4_gemm_cuda(const Int4GemmCudaParams& p, void* stream);

// The dense weight W [N, K] in the original row order (W[n, perm[k]] = dequantized packed row k;
// padding rows dropped): the large-M path of the torch glue, which then calls cuBLAS. Rows of W
// that no packed row maps to are not written (the caller zeroes W when perm is set); a perm value
// outside [-1, K) turns column 0 of W into NaN. out: float32 / float16 / bfloat16, computed as
// float (q - z) * s rounded once.
struct Int4GemmDequantizeCudaParams {
  const int32_t* qweight = nullptr;  // [Kp/16, Nt*128]
  const float* scales = nullptr;     // [G, Np]
  const uint8_t* zeros = nullptr;    // [G, Np] or null
  const int32_t* perm = nullptr;     // [Kp] or null (K == Kp)
  int64_t K = 0, Kp = 0, G = 0, N = 0;
  void* out = nullptr;  // [N, K]
  DType out_dtype = DType::kBFloat16;
  int64_t out_row_stride = 0;  // elements, >= K
};

Status int4_gemm_dequantize_cuda(const Int4GemmDequantizeCudaParams& p, void* stream);

}  // namespace bitpress
