// Entry point of the CUDA fp8_quantize in a build without CUDA: it exists, so that a runtime can
// link one library whatever the build, and reports kUnsupported. Compiled only without CUDA
// (every `*_cuda_stubs.cpp`; see csrc/README.md).
#include "bitpress/fp8/fp8_quantize_cuda.h"

namespace bitpress {

Status fp8_quantize_cuda(const Fp8QuantizeParams&, void*) { return Status::kUnsupported; }

}  // namespace bitpress
