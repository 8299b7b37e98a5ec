// Torch glue of sparse24_gemm on the CPU (ROW layout): checks, then the CPU kernel
// (bitpress/sparse24/sparse24_cpu.h). The CUDA kernel (MMA layout) registers its own
// TORCH_LIBRARY_IMPL(bitpress, CUDA) in its glue file and reuses the checks of sparse24_args.h.
//
// Dispatch: bf16 x runs the kernel below kSparse24DenseMinRows (direct read stream for M <= 16,
// panels on the shared microkernel above) and the dense fallback from there on (below). fp16 / fp32
// x with M > 16 (kSparse24DirectMaxRows): the weight is decompressed once per call and the product
// taken by the dense float32 GEMM (x widened exactly; the only path there that is not a read
// stream, as the CPU has no fp16 / fp32 sparse unit).
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <stdlib.h>

#include <vector>

#include "bitpress/common/cpu.h"
#include "sparse24_args.h"

namespace bitpress {
namespace {

constexpr const char* kOp = "sparse24_gemm";

// bf16 x from this many rows on: the weight is decompressed into the calling thread's reused bf16
// workspace [N, K] and multiplied by the dense GEMM (oneDNN: AMX tiles or AVX-512, blocked for
// large M; exact, as the decompressed weight holds the same bf16 values). The panel path blocks K
// and the panels for L2 (sparse24_gemm_cpu.cpp) but not M: from ~768 rows its x^T slices shrink
// below a useful K chunk. Measured on the Intel Xeon with AMX (bench/NOTES.md, "2:4 panels:
// blocking and tiled operands"): panels 1.05-1.12x F.linear at M = 512 where the dense path ran
// 0.86-0.91x; even at 768; dense ahead at 1024 (0.95x against 0.85x). Without AMX (AVX512-BF16
// panels) the crossover stays at the earlier 256 (not re-measured: no such machine this session).
// BITPRESS_SPARSE24_DENSE_ROWS overrides it (read per call, so benchmarks compare both paths).
constexpr int64_t kSparse24DenseMinRows = 256;
constexpr int64_t kSparse24DenseMinRowsAmx = 768;

int64_t dense_min_rows() {
  if (const char* s = getenv("BITPRESS_SPARSE24_DENSE_ROWS")) return atoll(s);
  return active_cpu_isa() == CpuIsa::kAmx ? kSparse24DenseMinRowsAmx : kSparse24DenseMinRows;
}

// The calling thread's workspace: grown when a call needs more, then reused (it stays warm in a
// large last-level cache between calls, and holds no memory on threads that never take the path).
at::Tensor& dense_workspace(int64_t numel) {
  thread_local at::Tensor ws;
  if (!ws.defined() || ws.numel() < numel) ws = at::empty({numel}, at::kBFloat16);
  return ws;
}

// x [..., K]; values [N, K/2] in x.dtype; meta uint8 [N, K/8]; bias [N] or None -> [..., N].
at::Tensor sparse24_gemm_cpu_impl(const at::Tensor& x, const at::Tensor& values,
                                  const at::Tensor& meta, int64_t layout,
                                  const std::optional<at::Tensor>& bias) {
  using namespace glue;
  check_sparse24_layout(kOp, layout, 0);
  const int64_t K = check_sparse24_x(kOp, x, 8);
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), kOp, ": values must be ",
                   dtype_name(x.scalar_type()), ", got ", dtype_name(values.scalar_type()));
  check_dim(values, kOp, "values", 2, "[N, K/2]");
  const int64_t N = values.size(0);
  check_size(values, kOp, "values", 1, K / 2, "K/2 = x.size(-1) / 2");
  check_same_device(values, x, kOp, "values", "x");
  check_sparse24_meta(kOp, meta, x, N, K);
  check_sparse24_bias(kOp, bias, x, N, "N = values.size(0)");

  const int64_t M = sparse24_rows(x);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = new_output(out_shape, x.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor vc = values.contiguous(), mc = meta.contiguous();
  if (K == 0) return bias ? out.copy_(bias->expand_as(out)) : out.zero_();
  if (x.scalar_type() != at::kBFloat16 && M > kSparse24DirectMaxRows) {
    at::Tensor w = at::empty({N, K}, values.options());
    const Status st =
        sparse24_decompress_cpu(vc.data_ptr(), int(vc.element_size()), mc.data_ptr<uint8_t>(), N, K,
                                w.data_ptr(), torch_thread_pool());
    if (st == Status::kInvalidArgument) check_sparse24_meta_values(kOp, mc, N, K);
    check_status(st, kOp);
    std::optional<at::Tensor> b32;
    if (bias) b32 = bias->to(at::kFloat);
    return out.copy_(at::linear(x.to(at::kFloat), w.to(at::kFloat), b32));
  }
  const at::Tensor x2 = rows_contiguous(x.reshape({M, K}));
  if (x.scalar_type() == at::kBFloat16 && M >= dense_min_rows()) {
    at::Tensor& ws = dense_workspace(N * K);
    const Status st =
        sparse24_expand16_cpu(static_cast<const uint16_t*>(vc.data_ptr()), mc.data_ptr<uint8_t>(),
                              N, K, static_cast<uint16_t*>(ws.data_ptr()), torch_thread_pool());
    if (st == Status::kInvalidArgument) check_sparse24_meta_values(kOp, mc, N, K);
    check_status(st, kOp);
    const at::Tensor wt = ws.narrow(0, 0, N * K).view({N, K}).t();
    at::Tensor out2d = out.view({M, N});
    if (bias) {
      at::addmm_out(out2d, bias->to(at::kBFloat16), x2, wt);
    } else {
      at::mm_out(out2d, x2, wt);
    }
    return out;
  }
  const at::Tensor bs = bias ? bias->contiguous() : at::Tensor();
  Sparse24GemmParams p;
  p.x = x2.data_ptr();
  p.x_dtype = to_dtype(x.scalar_type());
  p.x_row_stride = row_stride(x2);
  p.M = M;
  p.K = K;
  p.N = N;
  p.values = vc.data_ptr();
  p.meta = mc.data_ptr<uint8_t>();
  if (bs.defined()) {
    p.bias = bs.data_ptr();
    p.bias_dtype = to_dtype(bs.scalar_type());
  }
  p.out = out.data_ptr();
  p.out_row_stride = N;
  const Status st = sparse24_gemm_cpu(p, torch_thread_pool());
  if (st == Status::kInvalidArgument) check_sparse24_meta_values(kOp, mc, N, K);
  check_status(st, kOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // x [..., K] (K % 8 == 0); values [N, K/2] (x.dtype) and meta in kernel layout `layout`
  // (bitpress.sparse24.layout.Sparse24Layout: 0 = ROW, meta uint8 [N, K/8], CPU; 1 = MMA, the
  // mma.sp ordered metadata, CUDA); bias [N] or None. Returns [..., N] in x.dtype.
  m.def(
      "sparse24_gemm(Tensor x, Tensor values, Tensor meta, int layout, Tensor? bias=None) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("sparse24_gemm", &sparse24_gemm_cpu_impl); }

}  // namespace bitpress
