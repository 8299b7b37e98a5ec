// Entry points of the int4 CUDA kernels in a build without CUDA: they exist, so that a runtime can
// link one library whatever the build, and report kUnsupported. Compiled only without CUDA (every
// `*_cuda_stubs.cpp`; see csrc/README.md).
#include "bitpress/int4/int4_dequantize.h"
#include "bitpress/int4/int4_gemm.h"

namespace bitpress {

Status int4_dequantize_cuda(const Int4DequantizeParams&, void*) { return Status::kUnsupported; }
Status int4_gemm_repack_cuda(const Int4RepackParams&, void*) { return Status::kUnsupported; }
Status int4_gemm_cuda(const Int4GemmCudaParams&, void*) { return Status::kUnsupported; }
Status int4_gemm_dequantize_cuda(const Int4GemmDequantizeCudaParams&, void*) {
  return Status::kUnsupported;
}

}  // namespace bitpress
