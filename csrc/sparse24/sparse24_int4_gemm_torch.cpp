// Torch glue of sparse24_int4_gemm on the CPU (ROW layout): checks, then the CPU kernel
// (bitpress/sparse24/sparse24_cpu.h). bf16 x with M >= kSparse24Int4ViaValuesMinRows: the kept
// values dequantized to bf16 (blocks of rows in an L2-sized buffer up to
// kSparse24Int4ValuesBlockMaxM rows of x, a weight-size workspace above), then sparse24_gemm's
// kernel; other M <= 16: the kernel's read stream; M > 16 (fp16 / fp32 x): the weight is
// dequantized once per call to float32 and the dense float32 GEMM takes the product.
#include <ATen/ops/linear.h>

#include <vector>

#include "sparse24_args.h"

namespace bitpress {
namespace {

constexpr const char* kOp = "sparse24_int4_gemm";

// x [..., K] (K % 16 == 0); qvalues int32 [N, K/16]; meta uint8 [N, K/8]; scales [G, N]; zeros
// [G, N] or None (z = 8); G = ceil(K / group_size) (group_size -1: one group) -> [..., N].
at::Tensor sparse24_int4_gemm_cpu_impl(const at::Tensor& x, const at::Tensor& qvalues,
                                       const at::Tensor& meta, const at::Tensor& scales,
                                       const std::optional<at::Tensor>& zeros, int64_t group_size,
                                       int64_t layout, const std::optional<at::Tensor>& bias) {
  using namespace glue;
  check_sparse24_layout(kOp, layout, 0);
  const int64_t K = check_sparse24_x(kOp, x, 16);
  check_dtype(qvalues, kOp, "qvalues", {at::kInt});
  check_dim(qvalues, kOp, "qvalues", 2, "[N, K/16]");
  const int64_t N = qvalues.size(0);
  check_size(qvalues, kOp, "qvalues", 1, K / 16, "K/16 = x.size(-1) / 16");
  check_same_device(qvalues, x, kOp, "qvalues", "x");
  check_sparse24_meta(kOp, meta, x, N, K);
  TORCH_CHECK((group_size > 0 && group_size % 8 == 0) || group_size == -1, kOp,
              ": group_size must be a positive multiple of 8 or -1 (all of K), got ", group_size);
  const int64_t G = group_size == -1 ? (K ? 1 : 0) : (K + group_size - 1) / group_size;
  const char* g_what = "G = ceil(K / group_size)";
  check_dtype(scales, kOp, "scales", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(scales, kOp, "scales", 2, "[G, N]");
  check_size(scales, kOp, "scales", 0, G, g_what);
  check_size(scales, kOp, "scales", 1, N, "N = qvalues.size(0)");
  check_same_device(scales, x, kOp, "scales", "x");
  if (zeros) {
    check_dtype(*zeros, kOp, "zeros", {at::kFloat, at::kHalf, at::kBFloat16});
    check_dim(*zeros, kOp, "zeros", 2, "[G, N]");
    check_size(*zeros, kOp, "zeros", 0, G, g_what);
    check_size(*zeros, kOp, "zeros", 1, N, "N = qvalues.size(0)");
    check_same_device(*zeros, x, kOp, "zeros", "x");
  }
  check_sparse24_bias(kOp, bias, x, N, "N = qvalues.size(0)");

  const int64_t M = sparse24_rows(x);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = new_output(out_shape, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return bias ? out.copy_(bias->expand_as(out)) : out.zero_();
  const at::Tensor qc = qvalues.contiguous(), mc = meta.contiguous(), sc = scales.contiguous();
  const at::Tensor zc = zeros ? zeros->contiguous() : at::Tensor();
  Sparse24Int4GemmParams p;
  p.M = M;
  p.K = K;
  p.N = N;
  p.qvalues = qc.data_ptr<int32_t>();
  p.meta = mc.data_ptr<uint8_t>();
  p.scales = sc.data_ptr();
  p.scales_dtype = to_dtype(sc.scalar_type());
  if (zc.defined()) {
    p.zeros = zc.data_ptr();
    p.zeros_dtype = to_dtype(zc.scalar_type());
  }
  p.G = G;
  p.group_size = group_size == -1 ? K : group_size;
  p.x_dtype = to_dtype(x.scalar_type());
  // The kernels that read x, bias and out through p (every path but the dense ones below).
  const auto run_on_x =
      [&](Status (*kernel)(const Sparse24Int4GemmParams&, const CpuThreadPool*)) -> at::Tensor {
    const at::Tensor x2 = rows_contiguous(x.reshape({M, K}));
    const at::Tensor bs = bias ? bias->contiguous() : at::Tensor();
    p.x = x2.data_ptr();
    p.x_row_stride = row_stride(x2);
    if (bs.defined()) {
      p.bias = bs.data_ptr();
      p.bias_dtype = to_dtype(bs.scalar_type());
    }
    p.out = out.data_ptr();
    p.out_row_stride = N;
    const Status st = kernel(p, torch_thread_pool());
    if (st == Status::kInvalidArgument) check_sparse24_meta_values(kOp, mc, N, K);
    check_status(st, kOp);
    return out;
  };
  if (x.scalar_type() == at::kBFloat16 && M >= kSparse24Int4ViaValuesMinRows &&
      M <= kSparse24Int4ValuesBlockMaxM && active_cpu_isa() >= CpuIsa::kAvx512) {
    // The kept values dequantized to bf16 one block of rows at a time into a per-thread buffer,
    // then sparse24_gemm's kernel on the block with the same meta (no weight-size workspace).
    // The weights are rounded once to bf16 (relative 2^-9), as x is. Not below AVX-512, where
    // sparse24_gemm widens x to float32 on every call, i.e. per block.
    return run_on_x(sparse24_int4_gemm_via_values_cpu);
  }
  if (x.scalar_type() == at::kBFloat16 && M >= kSparse24Int4ViaValuesMinRows) {
    // Larger M: the kept values dequantized to bf16 once per call into this thread's reused
    // workspace (no allocation in steady state; a block at a time would convert x per block), then
    // sparse24_gemm's kernel with the same meta. The weights are rounded once to bf16 (relative
    // 2^-9), as x is.
    thread_local at::Tensor ws;
    if (!ws.defined() || ws.numel() < N * (K / 2)) {
      ws = at::Tensor();
      ws = at::empty({N * (K / 2)}, x.options());
    }
    const Status vs = sparse24_int4_values_cpu(p, reinterpret_cast<uint16_t*>(ws.data_ptr()),
                                               torch_thread_pool());
    check_status(vs, kOp);
    const at::Tensor x2 = rows_contiguous(x.reshape({M, K}));
    const at::Tensor bs = bias ? bias->contiguous() : at::Tensor();
    Sparse24GemmParams g;
    g.x = x2.data_ptr();
    g.x_dtype = DType::kBFloat16;
    g.x_row_stride = row_stride(x2);
    g.M = M;
    g.K = K;
    g.N = N;
    g.values = ws.data_ptr();
    g.meta = mc.data_ptr<uint8_t>();
    if (bs.defined()) {
      g.bias = bs.data_ptr();
      g.bias_dtype = to_dtype(bs.scalar_type());
    }
    g.out = out.data_ptr();
    g.out_row_stride = N;
    const Status st = sparse24_gemm_cpu(g, torch_thread_pool());
    if (st == Status::kInvalidArgument) check_sparse24_meta_values(kOp, mc, N, K);
    check_status(st, kOp);
    return out;
  }
  if (M > kSparse24DirectMaxRows) {
    at::Tensor w = at::empty({N, K}, x.options().dtype(at::kFloat));
    const Status st = sparse24_int4_dequantize_cpu(p, w.data_ptr<float>(), torch_thread_pool());
    if (st == Status::kInvalidArgument) check_sparse24_meta_values(kOp, mc, N, K);
    check_status(st, kOp);
    std::optional<at::Tensor> b32;
    if (bias) b32 = bias->to(at::kFloat);
    return out.copy_(at::linear(x.to(at::kFloat), w, b32));
  }
  return run_on_x(sparse24_int4_gemm_cpu);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // x [..., K] (K % 16 == 0); qvalues int32 [N, K/16] (4-bit codes of the kept values, value j in
  // nibble j % 8 of word j / 8); meta uint8 [N, K/8]; scales / zeros [ceil(K/group_size), N]
  // floats, zeros None: symmetric (w = (q - 8) s), else w = (q - z) s; layout 0 (ROW) only.
  m.def(
      "sparse24_int4_gemm(Tensor x, Tensor qvalues, Tensor meta, Tensor scales, Tensor? zeros, "
      "int group_size, int layout, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("sparse24_int4_gemm", &sparse24_int4_gemm_cpu_impl); }

}  // namespace bitpress
