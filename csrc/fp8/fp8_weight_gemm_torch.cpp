// Torch glue of fp8_weight_gemm (W8A16) on the CPU: the schema, the checks (fp8_args.h), the CPU
// kernel.
#include "bitpress/fp8/fp8_gemm.h"
#include "fp8_args.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

// x [..., K] fp32/fp16/bf16; w [N, K] float8_e4m3fn; w_scale float32: a single value, [N, 1] (per
// channel) or [ceil(N/128), ceil(K/128)] (128 x 128 blocks); bias [N] or None. Returns [..., N]
// in x.dtype.
at::Tensor fp8_weight_gemm_cpu_impl(const at::Tensor& x, const at::Tensor& w,
                                    const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& bias) {
  glue::Fp8WeightGemmPrepared r = glue::prepare_fp8_weight_gemm(x, w, w_scale, bias);
  glue::check_status(fp8_weight_gemm_cpu(r.p, glue::torch_thread_pool()), "fp8_weight_gemm");
  return r.out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // y = x (w * w_scale)^T + bias, float32 accumulation; see bitpress.ops.fp8_weight_gemm.
  m.def("fp8_weight_gemm(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("fp8_weight_gemm", &fp8_weight_gemm_cpu_impl); }

}  // namespace bitpress
