// The authoritative argument checks of the 2:4 ops' torch glue (CPU here; a CUDA glue of the same
// op calls them too), with the messages of python/bitpress/sparse24/ops.py.
#pragma once

#include <c10/util/accumulate.h>

#include <optional>
#include <sstream>

#include "bitpress/sparse24/sparse24.h"
#include "bitpress/sparse24/sparse24_cpu.h"
#include "torch/glue.h"

namespace bitpress::glue {

inline const char* sparse24_layout_name(int64_t layout) {
  return layout == 0 ? "ROW" : layout == 1 ? "MMA" : "?";
}

// layout in {0, 1}; `want` >= 0: the one this backend reads.
inline void check_sparse24_layout(const char* op, int64_t layout, int64_t want) {
  TORCH_CHECK(layout == 0 || layout == 1, op, ": layout must be 0 (ROW) or 1 (MMA), got ", layout);
  TORCH_CHECK(want < 0 || layout == want, op, ": layout must be ", sparse24_layout_name(want), " (",
              want, ") on this backend, got ", sparse24_layout_name(layout), " (", layout, ")");
}

// x float [..., K] with K a multiple of `multiple`; returns K.
inline int64_t check_sparse24_x(const char* op, const at::Tensor& x, int64_t multiple) {
  check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., K], got a 0-D tensor");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % multiple == 0, op, ": x.size(-1) must be a multiple of ", multiple, " (K; ",
              multiple, " weights per ", multiple == 8 ? "metadata byte" : "int32 of qvalues",
              "), got shape ", x.sizes());
  return K;
}

inline void check_sparse24_meta(const char* op, const at::Tensor& meta, const at::Tensor& x,
                                int64_t N, int64_t K) {
  check_dtype(meta, op, "meta", {at::kByte});
  check_dim(meta, op, "meta", 2, "[N, K/8]");
  check_size(meta, op, "meta", 0, N, "N = values.size(0)");
  check_size(meta, op, "meta", 1, K / 8, "K/8 = x.size(-1) / 8");
  check_same_device(meta, x, op, "meta", "x");
}

inline void check_sparse24_bias(const char* op, const std::optional<at::Tensor>& bias,
                                const at::Tensor& x, int64_t N, const char* what) {
  if (!bias) return;
  check_dtype(*bias, op, "bias", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(*bias, op, "bias", 1, "[N]");
  check_size(*bias, op, "bias", 0, N, what);
  check_same_device(*bias, x, op, "bias", "x");
}

// Raises the message of the first unordered nibble of meta (CPU tensor [N, K/8]), if any.
inline void check_sparse24_meta_values(const char* op, const at::Tensor& meta, int64_t N,
                                       int64_t K) {
  int64_t row = 0, group = 0;
  int nib = 0;
  if (sparse24_find_bad_meta(meta.data_ptr<uint8_t>(), N, K, &row, &group, &nib)) {
    std::ostringstream hex;
    hex << std::uppercase << std::hex << nib;
    TORCH_CHECK(false, op,
                ": meta values must be nibbles idx0 | idx1 << 2 with idx0 < idx1 (0x4, 0x8, 0x9, "
                "0xC, 0xD or 0xE), got 0x",
                hex.str(), " at row ", row, ", group ", group);
  }
}

inline int64_t sparse24_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

}  // namespace bitpress::glue
