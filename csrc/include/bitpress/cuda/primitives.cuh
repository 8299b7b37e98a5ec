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

// =============================================================================================
// Hopper wgmma (sm_90a): warpgroup-wide asynchronous MMA from shared-memory descriptors, and the
// fences it needs. Used by csrc/fp8/fp8_gemm_sm90a.cu; descriptor and fragment index math in
// bitpress/fp8/fp8_wgmma_layout.h (host-tested). The instructions exist only for sm_90a (arch-
// specific: no compute_90 / sm_100 equivalent): in any other device pass the wrappers are empty,
// and the kernels that call them compile their bodies for sm_90a only
// (BITPRESS_SM90A_DEVICE_PASS).
// =============================================================================================
#if defined(__CUDACC__)

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BITPRESS_SM90A_DEVICE_PASS 1
#else
#define BITPRESS_SM90A_DEVICE_PASS 0
#endif

namespace bitpress {

// Orders this thread's earlier generic-proxy writes to shared memory (cp.async, st.shared) before
// later async-proxy reads (wgmma operands): without it the tensor core may read stale bytes.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if BITPRESS_SM90A_DEVICE_PASS
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Makes the accumulator registers and shared-memory operands written before it visible to the
// next wgmma.mma_async of the warpgroup (required before the first wgmma and whenever registers
// it accumulates into were touched by other instructions).
__device__ __forceinline__ void wgmma_fence() {
#if BITPRESS_SM90A_DEVICE_PASS
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit_group() {
#if BITPRESS_SM90A_DEVICE_PASS
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed wgmma groups of the warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
#if BITPRESS_SM90A_DEVICE_PASS
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// The compiler sees a wgmma's accumulators written when the instruction is issued, not when it
// completes: this empty asm "rewrites" a register so that no read of it is moved above the
// wgmma_wait_group (or write below the wgmma_fence) it is placed after (before), as CUTLASS's
// warpgroup_fence_operand.
__device__ __forceinline__ void wgmma_fence_operand(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}

// d (+)= A · Bᵀ on E4M3 (fp32 accumulator), m64 n128 k32, both operands K-major in shared memory
// through descriptors (fp8 wgmma has no transpose: K-major only). accumulate == false: d = A · Bᵀ
// (the scale-d predicate; the tensor core's chain restarts, which is how the kernel promotes every
// 128 K). Fragment of d: fp8_wgmma_acc_coord.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a,
                                                      uint64_t desc_b, bool accumulate) {
#if BITPRESS_SM90A_DEVICE_PASS
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
#endif
}

}  // namespace bitpress

#endif  // __CUDACC__
// =============================================================================================
// end of the Hopper wgmma section
// =============================================================================================
