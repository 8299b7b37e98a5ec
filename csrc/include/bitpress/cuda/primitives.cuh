// Device primitives shared by every CUDA kernel (PTX ISA: cp.async, ldmatrix, mma), and the
// shared-memory swizzles. Torch-free.
//
// The index math (swizzles) is __host__ __device__ and compiles as plain C++: the host emulations
// of the kernels (tests/cpp/test_int4_mma.cpp) call these very functions. The PTX wrappers exist
// only when compiling with nvcc (__CUDACC__); they need sm_80 or newer (cp.async, ldmatrix,
// mma.m16n8k16 with bf16).
#pragma once

#include <stdint.h>

#include "bitpress/common/dtype.h"
#include "bitpress/common/macros.h"
#include "bitpress/common/status.h"

#if defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace bitpress {

// ---------------------------------------------------------------------------------------------
// Swizzles (host and device)
// ---------------------------------------------------------------------------------------------

// XOR swizzle of 16-byte chunks: chunk `chunk` of row `row` is stored at chunk
// chunk ^ (row % 8) of that row. ldmatrix reads an 8x8 b16 matrix as 8 row addresses (16 bytes
// each) in one phase; with a row pitch that is a multiple of 128 bytes the 8 rows of one logical
// chunk would fall in the same 4 banks (an 8-way conflict). After the XOR the 8 rows land in 8
// distinct 16-byte bank groups (conflict-free), and a row's chunks stay a permutation of the row
// (the XOR touches only the low 3 bits, so rows need a multiple of 8 chunks).
BITPRESS_INLINE int swizzle_chunk_xor8(int row, int chunk) { return chunk ^ (row & 7); }

// Chunk index in a tile of `row_chunks` 16-byte chunks per row (row_chunks % 8 == 0), swizzled.
BITPRESS_INLINE int swizzled_chunk_index(int row, int chunk, int row_chunks) {
  return row * row_chunks + swizzle_chunk_xor8(row, chunk);
}

#if defined(__CUDACC__)

// ---------------------------------------------------------------------------------------------
// Host-side status of CUDA calls
// ---------------------------------------------------------------------------------------------

// The status of the kernel launches issued since the last check. A launch that fails (bad
// configuration, no kernel image for the device, too much shared memory) records a non-sticky
// error that cudaGetLastError returns once and then clears: call this exactly once after each
// launch and keep its result. Reading it a second time returns success and loses the failure
// (the caller would then use an output no kernel wrote). tests/int4/test_int4_gemm_cuda.py checks
// every launch site of csrc for that pattern.
inline Status cuda_launch_status() {
  return cudaGetLastError() == cudaSuccess ? Status::kSuccess : Status::kCudaError;
}

// The status of a CUDA runtime call (cudaFuncSetAttribute, cudaGetDevice, ...). A failed call
// also records its error as the thread's last error; left there, the next unrelated check
// (cuda_launch_status, torch's C10_CUDA_KERNEL_LAUNCH_CHECK) would report it. Clear it here: the
// error is returned as this call's status instead.
inline Status cuda_call_status(cudaError_t e) {
  if (e == cudaSuccess) return Status::kSuccess;
  (void)cudaGetLastError();
  return Status::kCudaError;
}

// ---------------------------------------------------------------------------------------------
// PTX wrappers (device only)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1. src-size 0 zero-fills the destination without
// reading: out-of-range rows and k-tiles become zeros in smem.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N of this thread's committed cp.async groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices from shared memory; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem))
               : "memory");
}

// ----- mma.sp (2:4 sparse A): begin section -----
// c += a * b with A 2:4 sparse, mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col, fp16 or
// bf16 inputs (T), fp32 accumulators. a: the 16 x 16 kept values of the 16 x 32 A tile (the dense
// m16n8k16 A fragment over the compressed columns), b: the k32 x n8 B fragment (4 registers),
// e: this lane's metadata word, Sel: the sparsity selector (0: lanes 4g, 4g+1 supply the
// metadata, 1: lanes 4g+2, 4g+3; an immediate in PTX, hence a template argument). Register and
// metadata layouts: bitpress/sparse24/sparse24_mma_layout.h. ::ordered_metadata (PTX ISA 8.5)
// requires idx0 < idx1 in every nibble; it is the form sm_90 and later document for mma.sp.
template <DType T, int Sel>
__device__ __forceinline__ void mma_sp_m16n8k32(float (&c)[4], const uint32_t (&a)[4],
                                                const uint32_t (&b)[4], uint32_t e) {
  static_assert(T == DType::kFloat16 || T == DType::kBFloat16, "mma_sp_m16n8k32: fp16 or bf16");
  static_assert(Sel == 0 || Sel == 1, "mma_sp_m16n8k32: selector 0 or 1 for m16n8k32 f16/bf16");
  if constexpr (T == DType::kFloat16) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "r"(e), "n"(Sel));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "r"(e), "n"(Sel));
  }
}
// ----- mma.sp (2:4 sparse A): end section -----

// c += a * b, mma.sync.m16n8k16 (row.col), fp16 or bf16 inputs (T), fp32 accumulators.
template <DType T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
  static_assert(T == DType::kFloat16 || T == DType::kBFloat16, "mma_m16n8k16: fp16 or bf16");
  if constexpr (T == DType::kFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

#endif  // __CUDACC__

}  // namespace bitpress
