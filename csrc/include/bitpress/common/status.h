// Status codes returned by every entry point of the torch-free kernel API.
#pragma once

namespace bitpress {

enum class Status : int {
  kSuccess = 0,
  kInvalidArgument = 1,  // a pointer, size, stride or dtype the kernel cannot take
  kUnsupported = 2,      // valid input this build or this CPU/GPU has no kernel for
  kCudaError = 3,        // a CUDA launch or call failed (the check read and cleared the error)
  kOutOfMemory = 4,      // a kernel's per-thread reusable buffer could not grow (CPU)
};

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kSuccess:
      return "success";
    case Status::kInvalidArgument:
      return "invalid argument";
    case Status::kUnsupported:
      return "unsupported";
    case Status::kCudaError:
      return "CUDA error";
    case Status::kOutOfMemory:
      return "out of memory";
  }
  return "unknown status";
}

}  // namespace bitpress
