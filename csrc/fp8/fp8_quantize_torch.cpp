// Torch glue of fp8_quantize on the CPU: the schema, the checks (fp8_args.h), the CPU kernel.
#include "bitpress/fp8/fp8_quantize.h"
#include "fp8_args.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

// x [..., K] fp32/fp16/bf16; granularity "tensor" | "token" | "channel" | "block"; scale (static)
// float32 of the granularity's shape or None (dynamic); block_size [rows, cols] (default
// [1, 128]). Returns q [..., K] float8_e4m3fn and the scale: [1] / [..., 1] / [..., ceil(K/cols)]
// (rows 1) or [ceil(R/rows), ceil(K/cols)].
std::tuple<at::Tensor, at::Tensor> fp8_quantize_cpu_impl(const at::Tensor& x,
                                                         c10::string_view granularity,
                                                         const std::optional<at::Tensor>& scale,
                                                         at::OptionalIntArrayRef block_size) {
  std::optional<at::IntArrayRef> bs;
  if (block_size.has_value()) bs = *block_size;
  glue::Fp8QuantizePrepared r = glue::prepare_fp8_quantize(x, std::string(granularity), scale, bs);
  glue::check_status(fp8_quantize_cpu(r.p, glue::torch_thread_pool()), "fp8_quantize");
  return {r.q, r.scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // The contract (formula, shapes, the scale of an all-zero set) is bitpress.ops.fp8_quantize's.
  m.def(
      "fp8_quantize(Tensor x, str granularity, Tensor? scale=None, int[]? block_size=None) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("fp8_quantize", &fp8_quantize_cpu_impl); }

}  // namespace bitpress
