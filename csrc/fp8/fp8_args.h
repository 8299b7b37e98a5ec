// Argument checks of the FP8 ops, shared by the CPU glue (fp8_*_torch.cpp) and the CUDA glue
// (fp8_*_cuda_torch.cpp): the one authoritative check per op, with the messages of
// bitpress.fp8.ops (`<op>: <argument> must be <expected>, got <what>`). Each prepare_* checks,
// makes the operands row-contiguous, allocates the outputs (poisoned in tests) and fills the
// kernel's params struct; the caller runs the kernel of its device.
#pragma once

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "bitpress/fp8/fp8_gemm.h"
#include "bitpress/fp8/fp8_quantize.h"
#include "torch/glue.h"

namespace bitpress::glue {

inline int64_t fp8_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline std::string fp8_shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

inline void check_e4m3(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat8_e4m3fn, op, ": ", name,
                   " must be float8_e4m3fn, got ", dtype_name(t.scalar_type()));
}

inline bool fp8_is_single(const at::Tensor& s) { return s.dim() <= 1 && s.numel() == 1; }

inline bool fp8_has_shape(const at::Tensor& s, int64_t r, int64_t c) {
  return s.dim() == 2 && s.size(0) == r && s.size(1) == c;
}

// ---------------------------------------------------------------------------------------------
// fp8_quantize(x [..., K], granularity, scale?, block_size?) -> (q [..., K] e4m3, scale fp32)
// ---------------------------------------------------------------------------------------------

struct Fp8QuantizePrepared {
  at::Tensor x, q, scale;  // x viewed as [R, K] (row-contiguous); q, scale: the outputs
  Fp8QuantizeParams p;
};

inline Fp8QuantizePrepared prepare_fp8_quantize(const at::Tensor& x_in,
                                                const std::string& granularity,
                                                const std::optional<at::Tensor>& scale_in,
                                                const std::optional<at::IntArrayRef>& block_size) {
  constexpr const char* kOp = "fp8_quantize";
  check_dtype(x_in, kOp, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(x_in.dim() >= 1, kOp, ": x must be [..., K], got a 0-D tensor");
  const bool tensor = granularity == "tensor", token = granularity == "token";
  const bool channel = granularity == "channel", block = granularity == "block";
  TORCH_CHECK(tensor || token || channel || block, kOp,
              ": granularity must be 'tensor', 'token', 'channel' or 'block', got '", granularity,
              "'");
  TORCH_CHECK(!block_size || block, kOp,
              ": block_size applies to granularity='block' only, got block_size=", *block_size,
              " with granularity='", granularity, "'");
  int64_t bm = 1, bk = kFp8ScaleBlock;
  if (block && block_size) {
    TORCH_CHECK(block_size->size() == 2 && (*block_size)[0] > 0 && (*block_size)[1] > 0, kOp,
                ": block_size must be [block_rows, block_cols] with positive sizes, got ",
                *block_size);
    bm = (*block_size)[0];
    bk = (*block_size)[1];
  }
  if (channel) check_dim(x_in, kOp, "x", 2, "[N, K] (granularity='channel': a weight)");
  if (block && bm != 1) {
    TORCH_CHECK(x_in.dim() == 2, kOp, ": x must be 2-D [R, K] for block_size [", bm, ", ", bk,
                "] (blocks of more than one row), got shape ", x_in.sizes());
  }
  const int64_t K = x_in.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) rows *= x_in.size(d);
  std::vector<int64_t> lead(x_in.sizes().begin(), x_in.sizes().end() - 1);
  std::vector<int64_t> sshape;
  if (tensor) {
    sshape = {1};
  } else if (token || channel) {
    sshape = lead;
    sshape.push_back(1);
  } else if (bm == 1) {
    sshape = lead;
    sshape.push_back(fp8_cdiv(K, bk));
  } else {
    sshape = {fp8_cdiv(x_in.size(0), bm), fp8_cdiv(K, bk)};
  }
  Fp8QuantizePrepared r;
  if (scale_in) {
    check_dtype(*scale_in, kOp, "scale", {at::kFloat});
    check_same_device(*scale_in, x_in, kOp, "scale", "x");
    if (tensor) {
      TORCH_CHECK(fp8_is_single(*scale_in), kOp,
                  ": scale must be a single value (shape [] or [1]) for granularity='tensor', "
                  "got shape ",
                  scale_in->sizes());
    } else {
      TORCH_CHECK(scale_in->sizes().vec() == sshape, kOp, ": scale must have shape ",
                  fp8_shape_str(sshape), " (granularity='", granularity, "'), got shape ",
                  scale_in->sizes());
    }
    // A fresh output (an op may not return its input): the given scale, in the canonical shape.
    r.scale = scale_in->reshape(sshape).clone(at::MemoryFormat::Contiguous);
  } else {
    r.scale = new_output(sshape, x_in.options().dtype(at::kFloat));
  }
  r.x = x_in.reshape({rows, K});
  r.x = rows_contiguous(r.x);
  r.q = new_output(x_in.sizes(), x_in.options().dtype(at::kFloat8_e4m3fn));
  Fp8QuantizeParams& p = r.p;
  p.x = r.x.data_ptr();
  p.x_dtype = to_dtype(r.x.scalar_type());
  p.x_row_stride = rows <= 1 ? std::max<int64_t>(K, 1) : r.x.stride(0);
  p.q = reinterpret_cast<uint8_t*>(r.q.data_ptr());
  p.q_row_stride = std::max<int64_t>(K, 1);
  p.scale = r.scale.data_ptr<float>();
  p.scale_row_stride = tensor || token || channel ? 1 : fp8_cdiv(K, bk);
  p.static_scale = scale_in.has_value();
  p.granularity = tensor  ? Fp8Granularity::kTensor
                  : block ? Fp8Granularity::kBlock
                          : Fp8Granularity::kRow;
  p.block_rows = bm;
  p.block_cols = bk;
  p.R = rows;
  p.K = K;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Scale layouts of the GEMMs
// ---------------------------------------------------------------------------------------------

inline Fp8Scale fp8_scale_of(const at::Tensor& s, Fp8ScaleLayout layout) {
  Fp8Scale out;
  out.data = s.data_ptr<float>();
  out.layout = layout;
  out.row_stride = s.dim() == 2 ? s.stride(0) : 0;
  return out;
}

// fp8_gemm's scale layouts from the shapes (a [M, K], b [N, K]): each of scale_a / scale_b a
// single value or [rows, 1], or both blockwise (scale_a [M, ceil(K/128)], scale_b [ceil(N/128),
// ceil(K/128)]). Where a shape fits both readings (K <= 128), they mean the same product.
inline std::pair<Fp8ScaleLayout, Fp8ScaleLayout> fp8_gemm_scale_layouts(const at::Tensor& sa,
                                                                        const at::Tensor& sb,
                                                                        int64_t M, int64_t N,
                                                                        int64_t K) {
  constexpr const char* kOp = "fp8_gemm";
  const int64_t Kb = fp8_cdiv(K, kFp8ScaleBlock), Nb = fp8_cdiv(N, kFp8ScaleBlock);
  const bool a_single = fp8_is_single(sa), b_single = fp8_is_single(sb);
  const bool a_row = fp8_has_shape(sa, M, 1), b_row = fp8_has_shape(sb, N, 1);
  const bool a_block = fp8_has_shape(sa, M, Kb), b_block = fp8_has_shape(sb, Nb, Kb);
  if (a_block && b_block) return {Fp8ScaleLayout::kBlock, Fp8ScaleLayout::kBlock};
  if ((a_single || a_row) && (b_single || b_row)) {
    return {a_single ? Fp8ScaleLayout::kTensor : Fp8ScaleLayout::kRow,
            b_single ? Fp8ScaleLayout::kTensor : Fp8ScaleLayout::kRow};
  }
  const std::string want_a = "a single value (shape [] or [1]), [M, 1] = " + fp8_shape_str({M, 1}) +
                             " (rowwise) or [M, ceil(K/128)] = " + fp8_shape_str({M, Kb}) +
                             " (blockwise)";
  const std::string want_b =
      "a single value (shape [] or [1]), [N, 1] = " + fp8_shape_str({N, 1}) +
      " (rowwise) or [ceil(N/128), ceil(K/128)] = " + fp8_shape_str({Nb, Kb}) + " (blockwise)";
  TORCH_CHECK(a_single || a_row || a_block, kOp, ": scale_a must be ", want_a, ", got shape ",
              sa.sizes());
  TORCH_CHECK(b_single || b_row || b_block, kOp, ": scale_b must be ", want_b, ", got shape ",
              sb.sizes());
  // One is blockwise, the other not: blockwise scales come in pairs.
  if (a_block) {
    TORCH_CHECK(false, kOp, ": scale_b must be blockwise [ceil(N/128), ceil(K/128)] = ",
                fp8_shape_str({Nb, Kb}), " as scale_a is blockwise, got shape ", sb.sizes());
  }
  TORCH_CHECK(false, kOp, ": scale_a must be blockwise [M, ceil(K/128)] = ", fp8_shape_str({M, Kb}),
              " as scale_b is blockwise, got shape ", sa.sizes());
}

// ---------------------------------------------------------------------------------------------
// fp8_gemm(a [M, K], b [N, K], scale_a, scale_b, bias?, out_dtype?) -> [M, N]
// ---------------------------------------------------------------------------------------------

struct Fp8GemmPrepared {
  at::Tensor a, b, scale_a, scale_b, bias, out;
  Fp8GemmParams p;
};

inline Fp8GemmPrepared prepare_fp8_gemm(const at::Tensor& a_in, const at::Tensor& b_in,
                                        const at::Tensor& sa_in, const at::Tensor& sb_in,
                                        const std::optional<at::Tensor>& bias,
                                        std::optional<at::ScalarType> out_dtype) {
  constexpr const char* kOp = "fp8_gemm";
  check_e4m3(a_in, kOp, "a");
  check_dim(a_in, kOp, "a", 2, "[M, K]");
  check_e4m3(b_in, kOp, "b");
  check_dim(b_in, kOp, "b", 2, "[N, K]");
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(0);
  check_size(b_in, kOp, "b", 1, K, "K = a.size(1)");
  check_same_device(b_in, a_in, kOp, "b", "a");
  check_dtype(sa_in, kOp, "scale_a", {at::kFloat});
  check_dtype(sb_in, kOp, "scale_b", {at::kFloat});
  check_same_device(sa_in, a_in, kOp, "scale_a", "a");
  check_same_device(sb_in, a_in, kOp, "scale_b", "a");
  const auto layouts = fp8_gemm_scale_layouts(sa_in, sb_in, M, N, K);
  if (bias) {
    check_dtype(*bias, kOp, "bias", {at::kFloat, at::kHalf, at::kBFloat16});
    check_dim(*bias, kOp, "bias", 1, "[N]");
    check_size(*bias, kOp, "bias", 0, N, "N = b.size(0)");
    check_same_device(*bias, a_in, kOp, "bias", "a");
  }
  const at::ScalarType od = out_dtype.value_or(at::kBFloat16);
  TORCH_CHECK_TYPE(od == at::kFloat || od == at::kHalf || od == at::kBFloat16, kOp,
                   ": out_dtype must be float32, float16 or bfloat16, got ", dtype_name(od));
  Fp8GemmPrepared r;
  r.a = rows_contiguous(a_in);
  r.b = rows_contiguous(b_in);
  r.scale_a = sa_in.contiguous();
  r.scale_b = sb_in.contiguous();
  if (bias) r.bias = bias->contiguous();
  r.out = new_output({M, N}, a_in.options().dtype(od));
  Fp8GemmParams& p = r.p;
  p.a = reinterpret_cast<const uint8_t*>(r.a.data_ptr());
  p.lda = M <= 1 ? std::max<int64_t>(K, 1) : r.a.stride(0);
  p.b = reinterpret_cast<const uint8_t*>(r.b.data_ptr());
  p.ldb = N <= 1 ? std::max<int64_t>(K, 1) : r.b.stride(0);
  p.scale_a = fp8_scale_of(r.scale_a, layouts.first);
  p.scale_b = fp8_scale_of(r.scale_b, layouts.second);
  if (r.bias.defined()) {
    p.bias = r.bias.data_ptr();
    p.bias_dtype = to_dtype(r.bias.scalar_type());
  }
  p.out = r.out.data_ptr();
  p.out_dtype = to_dtype(od);
  p.ldo = std::max<int64_t>(N, 1);
  p.M = M;
  p.N = N;
  p.K = K;
  return r;
}

// ---------------------------------------------------------------------------------------------
// fp8_weight_gemm(x [..., K], w [N, K], w_scale, bias?) -> [..., N] in x.dtype
// ---------------------------------------------------------------------------------------------

struct Fp8WeightGemmPrepared {
  at::Tensor x, w, w_scale, bias, out;
  Fp8WeightGemmParams p;
};

inline Fp8WeightGemmPrepared prepare_fp8_weight_gemm(const at::Tensor& x_in, const at::Tensor& w_in,
                                                     const at::Tensor& ws_in,
                                                     const std::optional<at::Tensor>& bias) {
  constexpr const char* kOp = "fp8_weight_gemm";
  check_dtype(x_in, kOp, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(x_in.dim() >= 1, kOp, ": x must be [..., K], got a 0-D tensor");
  check_e4m3(w_in, kOp, "w");
  check_dim(w_in, kOp, "w", 2, "[N, K]");
  const int64_t K = x_in.size(-1), N = w_in.size(0);
  check_size(w_in, kOp, "w", 1, K, "K = x.size(-1)");
  check_same_device(w_in, x_in, kOp, "w", "x");
  check_dtype(ws_in, kOp, "w_scale", {at::kFloat});
  check_same_device(ws_in, x_in, kOp, "w_scale", "x");
  const int64_t Kb = fp8_cdiv(K, kFp8ScaleBlock), Nb = fp8_cdiv(N, kFp8ScaleBlock);
  Fp8ScaleLayout layout;
  if (fp8_is_single(ws_in)) {
    layout = Fp8ScaleLayout::kTensor;
  } else if (fp8_has_shape(ws_in, N, 1)) {
    layout = Fp8ScaleLayout::kRow;
  } else if (fp8_has_shape(ws_in, Nb, Kb)) {
    layout = Fp8ScaleLayout::kBlock;
  } else {
    TORCH_CHECK(false, kOp, ": w_scale must be a single value (shape [] or [1]), [N, 1] = ",
                fp8_shape_str({N, 1}),
                " (per channel) or [ceil(N/128), ceil(K/128)] = ", fp8_shape_str({Nb, Kb}),
                " (128 x 128 blocks), got shape ", ws_in.sizes());
  }
  if (bias) {
    check_dtype(*bias, kOp, "bias", {at::kFloat, at::kHalf, at::kBFloat16});
    check_dim(*bias, kOp, "bias", 1, "[N]");
    check_size(*bias, kOp, "bias", 0, N, "N = w.size(0)");
    check_same_device(*bias, x_in, kOp, "bias", "x");
  }
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) M *= x_in.size(d);
  Fp8WeightGemmPrepared r;
  r.x = rows_contiguous(x_in.reshape({M, K}));
  r.w = rows_contiguous(w_in);
  r.w_scale = ws_in.contiguous();
  if (bias) r.bias = bias->contiguous();
  std::vector<int64_t> oshape(x_in.sizes().begin(), x_in.sizes().end() - 1);
  oshape.push_back(N);
  r.out = new_output(oshape, x_in.options());
  Fp8WeightGemmParams& p = r.p;
  p.x = r.x.data_ptr();
  p.x_dtype = to_dtype(x_in.scalar_type());
  p.ldx = M <= 1 ? std::max<int64_t>(K, 1) : r.x.stride(0);
  p.w = reinterpret_cast<const uint8_t*>(r.w.data_ptr());
  p.ldw = N <= 1 ? std::max<int64_t>(K, 1) : r.w.stride(0);
  p.w_scale = fp8_scale_of(r.w_scale, layout);
  if (r.bias.defined()) {
    p.bias = r.bias.data_ptr();
    p.bias_dtype = to_dtype(r.bias.scalar_type());
  }
  p.out = r.out.data_ptr();
  p.ldo = std::max<int64_t>(N, 1);
  p.M = M;
  p.N = N;
  p.K = K;
  return r;
}

}  // namespace bitpress::glue
