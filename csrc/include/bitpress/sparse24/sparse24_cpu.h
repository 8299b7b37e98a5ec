// The 2:4 sparse CPU kernels (torch-free): compress / decompress of the interchange format,
// sparse24_gemm and sparse24_int4_gemm on the ROW layout (bitpress/sparse24/sparse24.h has the
// format; python/bitpress/sparse24/layout.py the full description).
//
//   values  [N, K/2]    the kept weights (sparse24_gemm: x's dtype), rows contiguous
//   meta    uint8 [N, K/8]  nibbles idx0 | idx1 << 2, idx0 < idx1
//   qvalues int32 [N, K/16] 4-bit codes of the kept values (sparse24_int4_gemm)
//   x       [M, K]      float32 / float16 / bfloat16, unit stride along K, row stride x_row_stride
//   out     [M, N]      x's dtype, row stride out_row_stride
//
// sparse24_gemm paths (the dispatch; Sparse24GemmPath forces one, for tests):
//   * kDirect, M <= kSparse24DirectMaxRows (bf16 on AMX: kSparse24DirectMaxRowsAmx; the
//     environment variable BITPRESS_SPARSE24_DIRECT_ROWS overrides both for bf16): a read stream.
//     Each thread takes whole weight rows n and decodes 16 or 32 values at a time straight from the
//     compressed row: the metadata word gives every value's dense column with one variable shift
//     per lane, a permute gathers the matching x entries from registers, and the products go into
//     per-row accumulators.
//       - bf16 x on AVX512-BF16: 32 values per step, x pairs gathered with vpermt2w and
//         multiplied by vdpbf16ps (exact bf16 products, float32 sums; DAZ/FTZ as the microkernel).
//       - otherwise (fp16 / fp32 x, or no AVX512-BF16) AVX2 + FMA on float32: 8 values per step
//         (vpermps from two registers of x and a blend); x widened exactly to float32 once per
//         call, values widened per step (fp16 by F16C).
//       - the scalar path (any CPU): the same sums in C++.
//     The weight row (values + metadata, 4.5 KiB at K = 4096 bf16) stays in L1 while the rows
//     of x are swept, so the weights are read from memory once per call.
//   * kPanels, bf16 x above that: the transposed product C^T = W x^T on the
//     shared microkernel (bitpress/cpu/gemm_microkernel.h). A thread expands 32 weight rows at a
//     time into a dense bf16 panel [32, Kp] (the microkernel's A operand: one contiguous row per
//     output column, no transpose; AVX512-VBMI2 vpexpandw where the CPU has it), and x is
//     transposed once per call into VNNI pairs [Kp/2, Mp] (the B operand, Mp = M rounded up to
//     16, Kp = K rounded up to 32). The panel serves every row of x. Variant: the active ISA's
//     (AMX, AVX512-BF16, AVX2), or the one forced (emulations included).
//   fp16 / fp32 x with M > kSparse24DirectMaxRows are for the caller: the torch glue decompresses
//   to a dense float32 weight and calls the dense GEMM (documented in the glue).
//
// Status: kInvalidArgument for a bad pointer / size / dtype or an unordered metadata nibble
// (sparse24_find_bad_meta names the first one); kOutOfMemory when a thread buffer cannot grow.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/common/status.h"

namespace bitpress {

// Rows of x up to which sparse24_gemm streams the weights directly (above: panels for bf16 x, the
// dense fallback of the glue for fp16 / fp32 x); with AMX, bf16 x takes the panels from
// kSparse24DirectMaxRowsAmx + 1 rows on: the direct path's cost grows with M (one vpermt2w and
// one vdpbf16ps per row of x per 64 weights), the panel's hardly (the expansion is per weight, the
// tiles multiply 16 rows of x at once). Measured at 4096 x 14336 (loaded machine): direct ahead up
// to M = 4, even at 8, behind at 16.
constexpr int64_t kSparse24DirectMaxRows = 16;
constexpr int64_t kSparse24DirectMaxRowsAmx = 8;

enum class Sparse24GemmPath : int {
  kAuto = 0,
  kDirect = 1,  // any M (tests)
  kPanels = 2,  // bf16 x only
};

// The microkernel variant of the panel path: -1 = the active ISA's, else a cpu::GemmKernel value.
struct Sparse24GemmParams {
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;
  int64_t x_row_stride = 0;
  int64_t M = 0, K = 0, N = 0;
  const void* values = nullptr;   // [N, K/2], x_dtype
  const uint8_t* meta = nullptr;  // [N, K/8]
  const void* bias = nullptr;     // optional [N]
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;  // [M, N], x_dtype
  int64_t out_row_stride = 0;
  Sparse24GemmPath path = Sparse24GemmPath::kAuto;
  int gemm_kernel = -1;
};

Status sparse24_gemm_cpu(const Sparse24GemmParams& p, const CpuThreadPool* pool);

// The path sparse24_gemm_cpu takes for these parameters (kDirect or kPanels), and its name.
Sparse24GemmPath sparse24_gemm_cpu_path(const Sparse24GemmParams& p);
const char* sparse24_gemm_cpu_path_name(const Sparse24GemmParams& p);

// y = x Wᵀ + bias with W = (q - z) * s at the kept positions (layout.py, "2:4 + INT4"); the direct
// path (decode + float32 FMA, AVX-512 / AVX2 / scalar), any M.
struct Sparse24Int4GemmParams {
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;
  int64_t x_row_stride = 0;
  int64_t M = 0, K = 0, N = 0;
  const int32_t* qvalues = nullptr;  // [N, K/16]
  const uint8_t* meta = nullptr;     // [N, K/8]
  const void* scales = nullptr;      // [G, N]
  DType scales_dtype = DType::kFloat32;
  const void* zeros = nullptr;  // optional [G, N]; null: z = 8
  DType zeros_dtype = DType::kFloat32;
  int64_t G = 0, group_size = 0;  // group_size > 0, a multiple of 8 (the caller maps -1 to K)
  const void* bias = nullptr;
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;
  int64_t out_row_stride = 0;
};

Status sparse24_int4_gemm_cpu(const Sparse24Int4GemmParams& p, const CpuThreadPool* pool);

// The kept values of a 2:4 + INT4 weight dequantized to bf16, [N, K/2] in the order of qvalues
// ((q - z) s in float32, rounded once): with the same meta, a bf16 2:4 weight for
// sparse24_gemm_cpu (the path of bf16 x at M > kSparse24Int4ViaValuesMinRows).
Status sparse24_int4_values_cpu(const Sparse24Int4GemmParams& p, uint16_t* values,
                                const CpuThreadPool* pool);
// From this many rows on, bf16 x takes the sparse24_gemm path through sparse24_int4_values_cpu:
// the direct path's cost grows with M (a decode and an FMA per value and row), the panel path of
// sparse24_gemm runs on the microkernel (AMX tiles where there are some).
constexpr int64_t kSparse24Int4ViaValuesMinRows = 5;

// The same product for bf16 x without a full-size workspace: each task dequantizes blocks of
// kSparse24Int4ValuesBlockRows weight rows into a per-thread buffer (1 MiB at K = 4096: it stays
// in L2) and runs sparse24_gemm_cpu on the block on its own thread (the values of the whole
// weight, 1 byte per dense weight, written and read back cost more than the product at M = 16).
// x, out, bias as in sparse24_int4_gemm_cpu; kInvalidArgument for other x dtypes or on an
// unordered nibble.
Status sparse24_int4_gemm_via_values_cpu(const Sparse24Int4GemmParams& p,
                                         const CpuThreadPool* pool);
constexpr int64_t kSparse24Int4ValuesBlockRows = 256;
// Up to this many rows of x: at M = 128 and 512 the panel path's x^T conversion, repeated per
// block, measured 1.25x and 2.2x slower than one weight-size workspace.
constexpr int64_t kSparse24Int4ValuesBlockMaxM = 16;

// The dense float32 weight [N, K] of a 2:4 + INT4 weight (the dense fallback for large M).
Status sparse24_int4_dequantize_cpu(const Sparse24Int4GemmParams& p, float* w,
                                    const CpuThreadPool* pool);

// Dense w [N, K] (rows w_row_stride elements apart, elem_size 1, 2 or 4 bytes of any float type:
// a weight is "zero" when its bits other than the sign are 0) -> values [N, K/2] (same element
// size) and meta [N, K/8]. On a group with more than 2 nonzeros: kInvalidArgument and the first
// such (row, group, count) in row-major order in *bad_row, *bad_group, *bad_count.
Status sparse24_compress_cpu(const void* w, int elem_size, int64_t N, int64_t K,
                             int64_t w_row_stride, void* values, uint8_t* meta, int64_t* bad_row,
                             int64_t* bad_group, int* bad_count, const CpuThreadPool* pool);

// 16-bit values [N, K/2] + meta [N, K/8] -> dense [N, K], vectorized (vpexpandw where the CPU
// has AVX512-VBMI2): the dense fallback of sparse24_gemm for bf16 x at large M. Unordered
// nibbles: kInvalidArgument (rows before the bad one may be written).
Status sparse24_expand16_cpu(const uint16_t* values, const uint8_t* meta, int64_t N, int64_t K,
                             uint16_t* w, const CpuThreadPool* pool);

// values [N, K/2] + meta [N, K/8] -> dense [N, K] (same element size; each value placed at its
// column, the others +0). Unordered nibbles: kInvalidArgument (nothing defined is written).
Status sparse24_decompress_cpu(const void* values, int elem_size, const uint8_t* meta, int64_t N,
                               int64_t K, void* w, const CpuThreadPool* pool);

// The first unordered nibble of meta [N, K/8] (row-major): true and its (row, group, nibble).
bool sparse24_find_bad_meta(const uint8_t* meta, int64_t N, int64_t K, int64_t* row, int64_t* group,
                            int* nibble);

}  // namespace bitpress
