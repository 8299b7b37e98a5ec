// Entry point of the sparse24_int4_gemm CUDA kernel in a build without CUDA: it exists, so that a
// runtime can link one library whatever the build, and reports kUnsupported. Compiled only without
// CUDA (every `*_cuda_stubs.cpp`; see csrc/README.md).
#include "bitpress/sparse24/sparse24_int4_gemm_cuda.h"

namespace bitpress {

Status sparse24_int4_gemm_cuda(const Sparse24Int4GemmCudaParams&, void*) {
  return Status::kUnsupported;
}

}  // namespace bitpress
