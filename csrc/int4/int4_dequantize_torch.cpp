// Torch glue of int4_dequantize: checks, then the CPU or CUDA kernel.
#include "bitpress/int4/int4_dequantize.h"
#include "torch/glue.h"

#if defined(BITPRESS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace bitpress {
namespace {

constexpr const char* kOp = "int4_dequantize";

// qweight [K/8, N] int32; scales [G, N] fp32/fp16/bf16; qzeros [G, ceil(N/8)] int32 or None;
// g_idx [K] int32 or None; group_size > 0 or -1 (one group over K); dtype: output dtype
// (default scales.dtype). Returns [K, N].
struct Prepared {
  at::Tensor qweight, scales, qzeros, g_idx, out;
  Int4DequantizeParams p;
};

Prepared prepare(const at::Tensor& qweight_in, const at::Tensor& scales_in,
                 const std::optional<at::Tensor>& qzeros_in,
                 const std::optional<at::Tensor>& g_idx_in, int64_t group_size,
                 std::optional<at::ScalarType> dtype) {
  using namespace glue;
  check_dtype(qweight_in, kOp, "qweight", {at::kInt});
  check_dim(qweight_in, kOp, "qweight", 2, "[K/8, N]");
  check_dtype(scales_in, kOp, "scales", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(scales_in, kOp, "scales", 2, "[G, N]");
  check_same_device(scales_in, qweight_in, kOp, "scales", "qweight");
  const int64_t K = qweight_in.size(0) * 8, N = qweight_in.size(1), G = scales_in.size(0);
  check_size(scales_in, kOp, "scales", 1, N, "N = qweight.size(1)");
  TORCH_CHECK(group_size > 0 || group_size == -1, kOp,
              ": group_size must be positive or -1 (one group over K), got ", group_size);
  const int64_t gs = group_size == -1 ? std::max<int64_t>(K, 1) : group_size;
  Prepared r;
  if (g_idx_in) {
    check_dtype(*g_idx_in, kOp, "g_idx", {at::kInt});
    check_dim(*g_idx_in, kOp, "g_idx", 1, "[K]");
    // g_idx [K] is the plain statement of K: a qweight whose rows disagree is the wrong one.
    const int64_t Kg = g_idx_in->size(0);
    TORCH_CHECK(Kg == K || Kg % 8 != 0, kOp, ": qweight.size(0) must be K/8 = ", Kg / 8,
                " (K = g_idx.size(0) = ", Kg, "), got shape ", qweight_in.sizes());
    check_size(*g_idx_in, kOp, "g_idx", 0, K, "K = 8 * qweight.size(0)");
    check_same_device(*g_idx_in, qweight_in, kOp, "g_idx", "qweight");
    TORCH_CHECK(G > 0 || K == 0, kOp, ": scales must have at least one group, got shape ",
                scales_in.sizes());
    r.g_idx = g_idx_in->contiguous();
    if (r.g_idx.is_cpu()) {  // on CUDA this would cost a host sync: the kernel writes NaN instead
      const int32_t* gi = r.g_idx.data_ptr<int32_t>();
      for (int64_t k = 0; k < K; ++k) {
        TORCH_CHECK(gi[k] >= 0 && gi[k] < G, kOp, ": g_idx values must lie in [0, ", G,
                    ") (G = scales.size(0)), got g_idx[", k, "] = ", gi[k]);
      }
    }
  } else {
    check_size(scales_in, kOp, "scales", 0, (K == 0 ? 0 : (K - 1) / gs + 1),
               "G = ceil(K / group_size)");
  }
  if (qzeros_in) {
    check_dtype(*qzeros_in, kOp, "qzeros", {at::kInt});
    check_dim(*qzeros_in, kOp, "qzeros", 2, "[G, ceil(N/8)]");
    check_size(*qzeros_in, kOp, "qzeros", 0, G, "G = scales.size(0)");
    check_size(*qzeros_in, kOp, "qzeros", 1, (N + 7) / 8, "ceil(N/8)");
    check_same_device(*qzeros_in, qweight_in, kOp, "qzeros", "qweight");
    r.qzeros = rows_contiguous(*qzeros_in);
  }
  const at::ScalarType out_dtype = dtype.value_or(scales_in.scalar_type());
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
                   kOp, ": dtype must be float32, float16 or bfloat16, got ",
                   glue::dtype_name(out_dtype));
  r.qweight = rows_contiguous(qweight_in);
  r.scales = rows_contiguous(scales_in);
  r.out = glue::new_output({K, N}, scales_in.options().dtype(out_dtype));

  Int4DequantizeParams& p = r.p;
  p.qweight = r.qweight.data_ptr<int32_t>();
  p.qweight_row_stride = glue::row_stride(r.qweight);
  p.scales = r.scales.data_ptr();
  p.scales_dtype = to_dtype(r.scales.scalar_type());
  p.scales_row_stride = glue::row_stride(r.scales);
  if (r.qzeros.defined()) {
    p.qzeros = r.qzeros.data_ptr<int32_t>();
    p.qzeros_row_stride = glue::row_stride(r.qzeros);
  }
  if (r.g_idx.defined()) p.g_idx = r.g_idx.data_ptr<int32_t>();
  p.out = r.out.data_ptr();
  p.out_dtype = to_dtype(out_dtype);
  p.out_row_stride = glue::row_stride(r.out);
  p.K = K;
  p.N = N;
  p.num_groups = G;
  p.group_size = gs;
  return r;
}

at::Tensor int4_dequantize_cpu_impl(const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& qzeros,
                                    const std::optional<at::Tensor>& g_idx, int64_t group_size,
                                    std::optional<at::ScalarType> dtype) {
  Prepared r = prepare(qweight, scales, qzeros, g_idx, group_size, dtype);
  glue::check_status(int4_dequantize_cpu(r.p, glue::torch_thread_pool()), kOp);
  return r.out;
}

#if defined(BITPRESS_WITH_CUDA)
at::Tensor int4_dequantize_cuda_impl(const at::Tensor& qweight, const at::Tensor& scales,
                                     const std::optional<at::Tensor>& qzeros,
                                     const std::optional<at::Tensor>& g_idx, int64_t group_size,
                                     std::optional<at::ScalarType> dtype) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  Prepared r = prepare(qweight, scales, qzeros, g_idx, group_size, dtype);
  glue::check_status(
      int4_dequantize_cuda(r.p, c10::cuda::getCurrentCUDAStream(qweight.device().index()).stream()),
      kOp);
  return r.out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // Shapes: qweight [K/8, N] int32, scales [G, N], qzeros [G, ceil(N/8)] int32, g_idx [K] int32,
  // out [K, N]. See python/bitpress/ops.py for the full contract.
  m.def(
      "int4_dequantize(Tensor qweight, Tensor scales, Tensor? qzeros, Tensor? g_idx, "
      "int group_size, ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("int4_dequantize", &int4_dequantize_cpu_impl); }

#if defined(BITPRESS_WITH_CUDA)
TORCH_LIBRARY_IMPL(bitpress, CUDA, m) { m.impl("int4_dequantize", &int4_dequantize_cuda_impl); }
#endif

}  // namespace bitpress
