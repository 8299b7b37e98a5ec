// Entry points of the CUDA kernels in a build without CUDA: they exist, so that a runtime can link
// one library whatever the build, and report kUnsupported.
#include "bitpress/int4_dequantize.h"
#include "bitpress/int4_gemm.h"
#include "bitpress/spec_verify.h"

namespace bitpress {

Status int4_dequantize_cuda(const Int4DequantizeParams&, void*) { return Status::kUnsupported; }
Status spec_verify_cuda(const SpecVerifyParams&, void*) { return Status::kUnsupported; }
Status int4_gemm_repack_cuda(const Int4RepackParams&, void*) { return Status::kUnsupported; }
Status int4_gemm_cuda(const Int4GemmCudaParams&, void*) { return Status::kUnsupported; }
Status int4_gemm_dequantize_cuda(const Int4GemmDequantizeCudaParams&, void*) {
  return Status::kUnsupported;
}

}  // namespace bitpress
