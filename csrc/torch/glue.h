// Helpers of the torch glue: argument checks with messages that name the argument and what was
// expected, dtype mapping, and the thread-pool adapter. The only headers besides the op files
// that include torch.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <torch/library.h>

#include <atomic>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/common/status.h"

namespace bitpress::glue {

// torch's Python names (int32, bfloat16, ...), so that messages read the same from every backend.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kShort:
      return "int16";
    case at::kChar:
      return "int8";
    case at::kByte:
      return "uint8";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(t);
  }
}

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::ostringstream os;
  bool first = true;
  for (auto d : dtypes) {
    os << (first ? "" : " or ") << dtype_name(d);
    first = false;
  }
  return os.str();
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name,
                        std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes) {
    if (t.scalar_type() == d) return;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be ", dtype_list(dtypes), ", got ",
                   dtype_name(t.scalar_type()));
}

inline void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                      const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", shape, ", got shape ",
              t.sizes());
}

inline void check_size(const at::Tensor& t, const char* op, const char* name, int64_t d,
                       int64_t expected, const char* what) {
  TORCH_CHECK(t.size(d) == expected, op, ": ", name, ".size(", d, ") must be ", expected, " (",
              what, "), got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

// Kernels take a 2-D matrix with unit stride along the last dimension and a row stride of at least
// the row length; anything else (transposed, expanded) is copied once.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  const bool unit_inner = t.size(-1) <= 1 || t.stride(-1) == 1;
  const bool rows_apart = t.dim() < 2 || t.size(0) <= 1 || t.stride(0) >= t.size(-1);
  return unit_inner && rows_apart ? t : t.contiguous();
}

// The row stride the kernels should use for a matrix prepared by rows_contiguous.
inline int64_t row_stride(const at::Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0);
}

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "bitpress: unsupported dtype ", t);
  }
}

inline void check_status(Status s, const char* op) {
  TORCH_CHECK(s == Status::kSuccess, op, ": kernel failed: ", status_string(s));
}

// When set (tests: bitpress._C.set_poison_outputs(True)), outputs are filled with NaN (floating
// point) or the most negative value (integers) before a kernel writes them, so that an element the
// kernel forgets to write cannot pass for a right answer.
inline std::atomic<bool>& poison_outputs() {
  static std::atomic<bool> on{false};
  return on;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs().load(std::memory_order_relaxed)) {
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(std::numeric_limits<int64_t>::min() / (int64_t(1) << (64 - 8 * t.element_size())));
    }
  }
  return t;
}

// at::parallel_for behind the kernel library's thread-pool hook.
inline const CpuThreadPool* torch_thread_pool() {
  static const CpuThreadPool pool{
      [](void*, int64_t begin, int64_t end, int64_t grain, ParallelBody body, void* ctx) {
        at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
      },
      nullptr};
  return &pool;
}

}  // namespace bitpress::glue
