// Torch glue of sparse24_gemm on the CPU (ROW layout): checks, then the CPU kernel
// (bitpress/sparse24/sparse24_cpu.h). The CUDA kernel (MMA layout) registers its own
// TORCH_LIBRARY_IMPL(bitpress, CUDA) in its glue file and reuses the checks of sparse24_args.h.
//
// Dispatch: bf16 x runs the kernel for every M (direct read stream for M <= 16, panels on the
// shared microkernel above). fp16 / fp32 x with M > 16 (kSparse24DirectMaxRows): the weight is
// decompressed once per call and the product taken by the dense float32 GEMM (x widened exactly;
// the only path there that is not a read stream, as the CPU has no fp16 / fp32 sparse unit).
#include <ATen/ops/linear.h>

#include <vector>

#include "sparse24_args.h"

namespace bitpress {
namespace {

constexpr const char* kOp = "sparse24_gemm";

// x [..., K]; values [N, K/2] in x.dtype; meta uint8 [N, K/8]; bias [N] or None -> [..., N].
at::Tensor sparse24_gemm_cpu_impl(const at::Tensor& x, const at::Tensor& values,
                                  const at::Tensor& meta, int64_t layout,
                                  const std::optional<at::Tensor>& bias) {
  using namespace glue;
  check_sparse24_layout(kOp, layout, 0);
  const int64_t K = check_sparse24_x(kOp, x, 8);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), kOp, ": values must be ",
                   dtype_name(x.scalar_type()), ", got ", dtype_name(values.scalar_type()));
  check_dim(values, kOp, "values", 2, "[N, K/2]");
  const int64_t N = values.size(0);
  check_size(values, kOp, "values", 1, K / 2, "K/2 = x.size(-1) / 2");
  check_same_device(values, x, kOp, "values", "x");
  check_sparse24_meta(kOp, meta, x, N, K);
  check_sparse24_bias(kOp, bias, x, N, "N = values.size(0)");

  const int64_t M = sparse24_rows(x);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = new_output(out_shape, x.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor vc = values.contiguous(), mc = meta.contiguous();
  if (K == 0) return bias ? out.copy_(bias->expand_as(out)) : out.zero_();
  if (x.scalar_type() != at::kBFloat16 && M > kSparse24DirectMaxRows) {
    at::Tensor w = at::empty({N, K}, values.options());
    const Status st =
        sparse24_decompress_cpu(vc.data_ptr(), int(vc.element_size()), mc.data_ptr<uint8_t>(), N, K,
                                w.data_ptr(), torch_thread_pool());
    if (st == Status::kInvalidArgument) check_sparse24_meta_values(kOp, mc, N, K);
    check_status(st, kOp);
    std::optional<at::Tensor> b32;
    if (bias) b32 = bias->to(at::kFloat);
    return out.copy_(at::linear(x.to(at::kFloat), w.to(at::kFloat), b32));
  }
  const at::Tensor x2 = rows_contiguous(x.reshape({M, K}));
  const at::Tensor bs = bias ? bias->contiguous() : at::Tensor();
  Sparse24GemmParams p;
  p.x = x2.data_ptr();
  p.x_dtype = to_dtype(x.scalar_type());
  p.x_row_stride = row_stride(x2);
  p.M = M;
  p.K = K;
  p.N = N;
  p.values = vc.data_ptr();
  p.meta = mc.data_ptr<uint8_t>();
  if (bs.defined()) {
    p.bias = bs.data_ptr();
    p.bias_dtype = to_dtype(bs.scalar_type());
  }
  p.out = out.data_ptr();
  p.out_row_stride = N;
  const Status st = sparse24_gemm_cpu(p, torch_thread_pool());
  if (st == Status::kInvalidArgument) check_sparse24_meta_values(kOp, mc, N, K);
  check_status(st, kOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // x [..., K] (K % 8 == 0); values [N, K/2] (x.dtype) and meta in kernel layout `layout`
  // (bitpress.sparse24.layout.Sparse24Layout: 0 = ROW, meta uint8 [N, K/8], CPU; 1 = MMA, the
  // mma.sp ordered metadata, CUDA); bias [N] or None. Returns [..., N] in x.dtype.
  m.def(
      "sparse24_gemm(Tensor x, Tensor values, Tensor meta, int layout, Tensor? bias=None) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("sparse24_gemm", &sparse24_gemm_cpu_impl); }

}  // namespace bitpress
