// A buffer of one thread that grows when a call needs more and is reused by the next calls: the
// CPU kernels' workspaces, so that a call allocates nothing (and, once touched, takes no page
// faults) in steady state.
#pragma once

#include <stddef.h>
#include <stdlib.h>

#include <algorithm>

namespace bitpress {

inline size_t align64(size_t n) { return (n + 63) & ~size_t(63); }

class ThreadBuffer {
 public:
  ~ThreadBuffer() { free(ptr_); }
  // At least `bytes` bytes, 64-byte aligned; null if the allocation fails.
  void* get(size_t bytes) {
    if (bytes > bytes_) {
      free(ptr_);
      bytes_ = align64(std::max(bytes, bytes_ + bytes_ / 4));  // grow by 25% at least
      ptr_ = aligned_alloc(64, bytes_);
      if (!ptr_) bytes_ = 0;
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace bitpress
