// Torch glue of int4_gemm_repack: checks, then the CPU or CUDA kernel (bitpress/int4/int4_gemm.h).
#include "bitpress/int4/int4_gemm.h"
#include "bitpress/int4/int4_mma_layout.h"
#include "torch/glue.h"

#if defined(BITPRESS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace bitpress {
namespace {

constexpr const char* kOp = "int4_gemm_repack";

// qweight [K/8, N] int32 (GPTQ, packed along K); perm [Kp] int32 (Kp % 16 == 0, values in
// [-1, K)) or None (the identity; K % 16 == 0). Returns [Kp/16, ceil(N/64) * 128] int32.
struct Prepared {
  at::Tensor qweight, perm, out;
  Int4RepackParams p;
};

Prepared prepare(const at::Tensor& qweight_in, const std::optional<at::Tensor>& perm_in) {
  using namespace glue;
  check_dtype(qweight_in, kOp, "qweight", {at::kInt});
  check_dim(qweight_in, kOp, "qweight", 2, "[K/8, N]");
  const int64_t K = qweight_in.size(0) * 8, N = qweight_in.size(1);
  Prepared r;
  int64_t Kp = K;
  if (perm_in) {
    check_dtype(*perm_in, kOp, "perm", {at::kInt});
    check_dim(*perm_in, kOp, "perm", 1, "[Kp]");
    check_same_device(*perm_in, qweight_in, kOp, "perm", "qweight");
    Kp = perm_in->size(0);
    TORCH_CHECK(Kp % kInt4MmaTileK == 0, kOp,
                ": perm.size(0) must be a multiple of 16 (the mma k-tile), got ", Kp);
    r.perm = perm_in->contiguous();
    if (r.perm.is_cpu()) {  // on CUDA this would cost a host sync: the kernel writes zeros instead
      const int32_t* pp = r.perm.data_ptr<int32_t>();
      for (int64_t i = 0; i < Kp; ++i) {
        TORCH_CHECK(pp[i] >= -1 && pp[i] < K, kOp, ": perm values must lie in [-1, ", K,
                    ") (K = 8 * qweight.size(0)), got perm[", i, "] = ", pp[i]);
      }
    }
  } else {
    TORCH_CHECK(K % kInt4MmaTileK == 0, kOp,
                ": K = 8 * qweight.size(0) (no perm) must be a multiple of 16 (the mma k-tile), "
                "got ",
                K);
  }
  const int64_t Nt = (N + kInt4MmaTileN - 1) / kInt4MmaTileN;
  r.qweight = rows_contiguous(qweight_in);
  r.out = new_output({Kp / kInt4MmaTileK, Nt * kInt4MmaTileWords}, qweight_in.options());

  Int4RepackParams& p = r.p;
  p.qweight = r.qweight.data_ptr<int32_t>();
  p.qweight_row_stride = row_stride(r.qweight);
  p.perm = r.perm.defined() ? r.perm.data_ptr<int32_t>() : nullptr;
  p.K = K;
  p.N = N;
  p.Kp = Kp;
  p.out = r.out.data_ptr<int32_t>();
  p.out_row_stride = Nt * kInt4MmaTileWords;
  return r;
}

at::Tensor int4_gemm_repack_cpu_impl(const at::Tensor& qweight,
                                     const std::optional<at::Tensor>& perm) {
  Prepared r = prepare(qweight, perm);
  if (r.out.numel() == 0) return r.out;  // no rows (an empty perm) or no columns: nothing to pack
  glue::check_status(int4_gemm_repack_cpu(r.p, glue::torch_thread_pool()), kOp);
  return r.out;
}

#if defined(BITPRESS_WITH_CUDA)
at::Tensor int4_gemm_repack_cuda_impl(const at::Tensor& qweight,
                                      const std::optional<at::Tensor>& perm) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  Prepared r = prepare(qweight, perm);
  if (r.out.numel() == 0) return r.out;
  glue::check_status(int4_gemm_repack_cuda(
                         r.p, c10::cuda::getCurrentCUDAStream(qweight.device().index()).stream()),
                     kOp);
  return r.out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // qweight [K/8, N] int32 (GPTQ, packed along K); perm [Kp] int32 (source row of each packed
  // row, -1 = zero row) or None (identity; K % 16 == 0). Returns the GPU mma layout's qweight
  // [Kp/16, ceil(N/64)*128] int32 (bitpress/int4/int4_mma_layout.h).
  m.def("int4_gemm_repack(Tensor qweight, Tensor? perm) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("int4_gemm_repack", &int4_gemm_repack_cpu_impl); }

#if defined(BITPRESS_WITH_CUDA)
TORCH_LIBRARY_IMPL(bitpress, CUDA, m) { m.impl("int4_gemm_repack", &int4_gemm_repack_cuda_impl); }
#endif

}  // namespace bitpress
