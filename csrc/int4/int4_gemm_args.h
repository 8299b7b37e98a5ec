// Argument checks of int4_gemm shared by the CPU glue (CPU tile layout) and the CUDA glue (GPU
// mma layout): one place for the shapes of both layouts, with the messages of
// bitpress.ops._check_int4_gemm (argument, expected, got).
#pragma once

#include <c10/util/accumulate.h>

#include <optional>

#include "bitpress/int4/int4_gemm.h"
#include "bitpress/int4/int4_mma_layout.h"
#include "torch/glue.h"

namespace bitpress::glue {

// The kernel layout of an INT4 weight: the `layout` argument of the int4_gemm schema
// (bitpress.int4.layout.Int4Layout in Python). The layout is named by the caller, never guessed
// from tensor ranks.
enum class Int4Layout : int64_t { kCpuTiles = 0, kMma = 1 };

inline const char* int4_layout_name(int64_t layout) {
  return layout == int64_t(Int4Layout::kCpuTiles) ? "Int4CpuTiles"
         : layout == int64_t(Int4Layout::kMma)    ? "Int4MmaTiles"
                                                  : "unknown";
}

struct Int4GemmShapes {
  int64_t K = 0, N = 0, Kp = 0, G = 0;
};

// x [..., K]; CPU tiles: qweight [Nt, Kp/8, 64], scales / zeros [Nt, G, 64], group_starts in
// octets; mma: qweight [Kp/16, Nt*128], scales / zeros [G, Np] (uniform groups), group_starts in
// k-tiles; perm [Kp]; bias [N]. `reads` is the layout of the backend; `layout` the weight's.
// Checks the layout, dtypes, ranks, sizes and devices (not values).
inline Int4GemmShapes check_int4_gemm_args(Int4Layout reads, int64_t layout, const at::Tensor& x,
                                           const at::Tensor& qweight, const at::Tensor& scales,
                                           const std::optional<at::Tensor>& zeros,
                                           const at::Tensor& group_starts,
                                           const std::optional<at::Tensor>& perm,
                                           int64_t out_features,
                                           const std::optional<at::Tensor>& bias) {
  constexpr const char* kOp = "int4_gemm";
  TORCH_CHECK(layout == int64_t(Int4Layout::kCpuTiles) || layout == int64_t(Int4Layout::kMma), kOp,
              ": layout must be 0 (Int4CpuTiles) or 1 (Int4MmaTiles), got ", layout);
  TORCH_CHECK(
      layout == int64_t(reads), kOp, ": this backend reads ", int4_layout_name(int64_t(reads)),
      " weights, got ", int4_layout_name(layout),
      ": convert the weight with weight.to(device, layout=", int4_layout_name(int64_t(reads)), ")");
  const bool mma = reads == Int4Layout::kMma;
  check_dtype(x, kOp, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must be [..., K], got a 0-D tensor");
  check_dtype(qweight, kOp, "qweight", {at::kInt});
  const char* qshape = mma ? "[Kp/16, Nt*128]" : "[Nt, Kp/8, 64]";
  const char* sshape = mma ? "[G, Np]" : "[Nt, G, 64]";
  const int64_t rank = mma ? 2 : 3;
  check_dim(qweight, kOp, "qweight", rank, qshape);
  check_dtype(scales, kOp, "scales", {at::kFloat});
  check_dim(scales, kOp, "scales", rank, sshape);
  check_dtype(group_starts, kOp, "group_starts", {at::kInt});
  check_dim(group_starts, kOp, "group_starts", 1, "[G+1]");
  for (const auto& [t, name] :
       {std::pair{&qweight, "qweight"}, {&scales, "scales"}, {&group_starts, "group_starts"}}) {
    check_same_device(*t, x, kOp, name, "x");
  }
  Int4GemmShapes s;
  s.N = out_features;
  TORCH_CHECK(s.N >= 0, kOp, ": out_features must be >= 0, got ", s.N);
  s.K = x.size(-1);
  const int64_t Nt = (s.N + 63) / 64;  // both layouts tile N by 64
  const char* perm_what;
  if (mma) {
    const int64_t KT = qweight.size(0);
    s.Kp = KT * kInt4MmaTileK;
    s.G = scales.size(0);
    check_size(qweight, kOp, "qweight", 1, Nt * kInt4MmaTileWords, "128 * ceil(out_features / 64)");
    check_size(scales, kOp, "scales", 1, Nt * kInt4MmaTileN, "Np = 64 * ceil(out_features / 64)");
    TORCH_CHECK((s.G == 0 && KT == 0) || (s.G > 0 && KT % s.G == 0), kOp,
                ": the mma layout needs Kp/16 = ", KT, " k-tiles split evenly into G = ", s.G,
                " groups (scales.size(0)), got qweight shape ", qweight.sizes());
    perm_what = "Kp = 16 * qweight.size(0)";
  } else {
    s.Kp = qweight.size(1) * 8;
    s.G = scales.size(1);
    check_size(qweight, kOp, "qweight", 0, Nt, "Nt = ceil(out_features / 64)");
    check_size(qweight, kOp, "qweight", 2, kInt4TileN, "the tile width");
    check_size(scales, kOp, "scales", 0, Nt, "Nt = ceil(out_features / 64)");
    check_size(scales, kOp, "scales", 2, kInt4TileN, "the tile width");
    TORCH_CHECK(s.G > 0 || s.Kp == 0, kOp,
                ": scales must hold at least one group when K > 0 (scales.size(1) = G >= 1), got "
                "shape ",
                scales.sizes());
    perm_what = "Kp = 8 * qweight.size(1)";
  }
  check_size(group_starts, kOp, "group_starts", 0, s.G + 1, "G + 1 = number of groups + 1");
  if (zeros) {
    check_dtype(*zeros, kOp, "zeros", {at::kByte});
    check_dim(*zeros, kOp, "zeros", rank, sshape);
    TORCH_CHECK(zeros->sizes() == scales.sizes(), kOp, ": zeros must have the shape of scales ",
                scales.sizes(), ", got ", zeros->sizes());
    check_same_device(*zeros, x, kOp, "zeros", "x");
  }
  if (perm) {
    check_dtype(*perm, kOp, "perm", {at::kInt});
    check_dim(*perm, kOp, "perm", 1, "[Kp]");
    check_size(*perm, kOp, "perm", 0, s.Kp, perm_what);
    check_same_device(*perm, x, kOp, "perm", "x");
    TORCH_CHECK(s.K <= 0x7fffffff, kOp, ": x.size(-1) must fit in int32 with a perm, got ", s.K);
  } else {
    TORCH_CHECK(s.K == s.Kp, kOp, ": x.size(-1) must be K = ", s.Kp, " (",
                perm_what + 5,  // "16 * qweight.size(0)" / "8 * qweight.size(1)"
                "; the weight has no row permutation), got shape ", x.sizes());
  }
  if (bias) {
    check_dtype(*bias, kOp, "bias", {at::kFloat, at::kHalf, at::kBFloat16});
    check_dim(*bias, kOp, "bias", 1, "[N]");
    check_size(*bias, kOp, "bias", 0, s.N, "N = out_features");
    check_same_device(*bias, x, kOp, "bias", "x");
  }
  return s;
}

// x [..., K] as [M, K] rows, M from the leading dimensions (reshape({-1, K}) cannot infer M when
// K = 0); returns M.
inline int64_t int4_gemm_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

// The result of an empty sum (K = 0): y = bias, or 0.
inline at::Tensor int4_gemm_empty_sum(at::Tensor out, const std::optional<at::Tensor>& bias) {
  return bias ? out.copy_(bias->expand_as(out)) : out.zero_();
}

}  // namespace bitpress::glue
