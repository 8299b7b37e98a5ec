// Entry points of the sparse24 CUDA kernels in a build without CUDA: they exist, so that a runtime
// can link one library whatever the build, and report kUnsupported. Compiled only without CUDA
// (every `*_cuda_stubs.cpp`; see csrc/README.md).
#include "bitpress/sparse24/sparse24_gemm_cuda.h"

namespace bitpress {

Status sparse24_gemm_cuda(const Sparse24GemmCudaParams&, void*) { return Status::kUnsupported; }
Status sparse24_decompress_cuda(const Sparse24DecompressCudaParams&, void*) {
  return Status::kUnsupported;
}

}  // namespace bitpress
