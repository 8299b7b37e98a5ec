// Torch glue of fp8_gemm (W8A8) on the CPU: the schema, the checks (fp8_args.h), the CPU kernel.
#include "bitpress/fp8/fp8_gemm.h"
#include "fp8_args.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

// a [M, K], b [N, K] float8_e4m3fn; scale_a / scale_b float32: single values or [M, 1] / [N, 1]
// (rowwise), or [M, ceil(K/128)] with [ceil(N/128), ceil(K/128)] (blockwise); bias [N] or None.
// Returns [M, N] in out_dtype (default bfloat16).
at::Tensor fp8_gemm_cpu_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                             const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                             std::optional<at::ScalarType> out_dtype) {
  glue::Fp8GemmPrepared r = glue::prepare_fp8_gemm(a, b, scale_a, scale_b, bias, out_dtype);
  glue::check_status(fp8_gemm_cpu(r.p, glue::torch_thread_pool()), "fp8_gemm");
  return r.out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // y = (a * scale_a)(b * scale_b)^T + bias, float32 accumulation; see bitpress.ops.fp8_gemm.
  m.def(
      "fp8_gemm(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, Tensor? bias=None, "
      "ScalarType? out_dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("fp8_gemm", &fp8_gemm_cpu_impl); }

}  // namespace bitpress
