// Torch glue of fp8_quantize on CUDA tensors: the checks of every backend (fp8_args.h:
// prepare_fp8_quantize, the one authoritative check of the op), then the CUDA kernels
// (csrc/fp8/fp8_quantize_sm80.cu; contract in bitpress/fp8/fp8_quantize_cuda.h). No host sync:
// the dynamic per-tensor scale is computed on the device, so the op can be captured in a CUDA
// graph.
#if defined(BITPRESS_WITH_CUDA)

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <tuple>

#include "bitpress/fp8/fp8_quantize_cuda.h"
#include "fp8_args.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

// x [..., K] float32 / float16 / bfloat16 (CUDA); granularity "tensor" | "token" | "channel" |
// "block"; scale (static) float32 of the granularity's shape or None (dynamic); block_size
// [rows, cols] (default [1, 128]). Returns q [..., K] float8_e4m3fn and the float32 scale.
std::tuple<at::Tensor, at::Tensor> fp8_quantize_cuda_impl(const at::Tensor& x,
                                                          c10::string_view granularity,
                                                          const std::optional<at::Tensor>& scale,
                                                          at::OptionalIntArrayRef block_size) {
  std::optional<at::IntArrayRef> bs;
  if (block_size.has_value()) bs = *block_size;
  glue::Fp8QuantizePrepared r = glue::prepare_fp8_quantize(x, std::string(granularity), scale, bs);
  TORCH_CHECK(x.is_cuda(), "fp8_quantize: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  glue::check_status(fp8_quantize_cuda(r.p, stream), "fp8_quantize");
  return {r.q, r.scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(bitpress, CUDA, m) { m.impl("fp8_quantize", &fp8_quantize_cuda_impl); }

}  // namespace bitpress

#endif  // BITPRESS_WITH_CUDA
