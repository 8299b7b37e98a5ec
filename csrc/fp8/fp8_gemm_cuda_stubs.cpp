// Entry point of the sm_90a fp8_gemm in a build without CUDA: it exists, so that a runtime can link
// one library whatever the build; it checks its arguments like the CUDA one, then reports
// kUnsupported. Compiled only without CUDA (every `*_cuda_stubs.cpp`; see csrc/README.md).
#include "bitpress/fp8/fp8_gemm_cuda.h"

namespace bitpress {

Status fp8_gemm_cuda(const Fp8GemmCudaParams& p, void*) {
  const Status s = fp8_gemm_cuda_check(p);
  return s != Status::kSuccess ? s : Status::kUnsupported;
}

}  // namespace bitpress
