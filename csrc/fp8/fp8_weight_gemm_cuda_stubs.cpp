// Entry points of the CUDA fp8_weight_gemm in a build without CUDA: they exist, so that a
// runtime can link one library whatever the build, and report kUnsupported. Compiled only without
// CUDA (every `*_cuda_stubs.cpp`; see csrc/README.md).
#include "bitpress/fp8/fp8_weight_gemm_cuda.h"

namespace bitpress {

Status fp8_weight_gemm_cuda(const Fp8WeightGemmCudaParams&, void*) { return Status::kUnsupported; }
Status fp8_weight_dequantize_cuda(const Fp8WeightDequantizeCudaParams&, void*) {
  return Status::kUnsupported;
}

}  // namespace bitpress
