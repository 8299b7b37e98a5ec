// Entry point of the spec_verify CUDA kernel in a build without CUDA: it exists, so that a runtime
// can link one library whatever the build, and reports kUnsupported. Compiled only without CUDA
// (every `*_cuda_stubs.cpp`; see csrc/README.md).
#include "bitpress/speculative/spec_verify.h"

namespace bitpress {

Status spec_verify_cuda(const SpecVerifyParams&, void*) { return Status::kUnsupported; }

}  // namespace bitpress
