// Torch glue of int4_gemm on the CPU: checks, then the CPU kernel (CPU tile layout). The CUDA
// implementation (GPU mma layout) is csrc/int4/int4_gemm_cuda_torch.cpp.
#include <vector>

#include "bitpress/int4/int4_gemm.h"
#include "int4_gemm_args.h"
#include "int4_gemm_dense.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

constexpr const char* kOp = "int4_gemm";

// x [..., K]; qweight [Nt, Kp/8, 64] int32; scales [Nt, G, 64] float32; zeros [Nt, G, 64] uint8
// or None; group_starts [G+1] int32; perm [Kp] int32 or None; bias [N] or None. Returns
// [..., N] in x.dtype.
at::Tensor int4_gemm_cpu_impl(const at::Tensor& x, const at::Tensor& qweight,
                              const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                              const at::Tensor& group_starts, const std::optional<at::Tensor>& perm,
                              int64_t out_features, int64_t layout,
                              const std::optional<at::Tensor>& bias,
                              std::optional<at::ScalarType> act_dtype) {
  using namespace glue;
  const Int4GemmShapes shp = check_int4_gemm_args(Int4Layout::kCpuTiles, layout, x, qweight, scales,
                                                  zeros, group_starts, perm, out_features, bias);
  const int64_t K = shp.K, N = shp.N, Kp = shp.Kp, G = shp.G;
  TORCH_CHECK(!act_dtype || *act_dtype == at::kChar, kOp,
              ": act_dtype must be None (exact activations) or torch.int8 (W4A8), got ",
              act_dtype ? glue::dtype_name(*act_dtype) : "None");
  const bool w4a8 = act_dtype.has_value();
  const at::Tensor qw = qweight.contiguous(), sc = scales.contiguous();
  const at::Tensor gs = group_starts.contiguous();
  const at::Tensor zr = zeros ? zeros->contiguous() : at::Tensor();
  const at::Tensor pm = perm ? perm->contiguous() : at::Tensor();
  const at::Tensor bs = bias ? bias->contiguous() : at::Tensor();
  {
    const int32_t* g = gs.data_ptr<int32_t>();
    TORCH_CHECK(G == 0 || (g[0] == 0 && g[G] == Kp / 8), kOp,
                ": group_starts must run from 0 to Kp/8 = ", Kp / 8, ", got [", g[0], ", ", g[G],
                "]");
    for (int64_t i = 0; i < G; ++i) {
      TORCH_CHECK(g[i + 1] >= g[i], kOp, ": group_starts must be non-decreasing, got ", g[i],
                  " then ", g[i + 1], " at ", i);
    }
  }
  if (pm.defined()) {
    // Each row of x feeds at most one packed row: a repeated row would count its products twice.
    const int32_t* pp = pm.data_ptr<int32_t>();
    std::vector<bool> seen(size_t(K), false);
    for (int64_t i = 0; i < Kp; ++i) {
      TORCH_CHECK(pp[i] >= -1 && pp[i] < K, kOp, ": perm values must lie in [-1, ", K,
                  ") (K = x.size(-1)), got perm[", i, "] = ", pp[i]);
      if (pp[i] < 0) continue;
      TORCH_CHECK(!seen[pp[i]], kOp, ": perm must name each row of x at most once, got row ", pp[i],
                  " more than once");
      seen[pp[i]] = true;
    }
  }

  const int64_t M = int4_gemm_rows(x);
  const at::Tensor x2 = rows_contiguous(x.reshape({M, K}));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = new_output(out_shape, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return int4_gemm_empty_sum(out, bias);

  Int4GemmParams p;
  p.x = x2.data_ptr();
  p.x_dtype = to_dtype(x.scalar_type());
  p.x_row_stride = row_stride(x2);
  p.M = M;
  p.K = K;
  p.qweight = qw.data_ptr<int32_t>();
  p.scales = sc.data_ptr<float>();
  p.zeros = zr.defined() ? zr.data_ptr<uint8_t>() : nullptr;
  p.group_starts = gs.data_ptr<int32_t>();
  p.perm = pm.defined() ? pm.data_ptr<int32_t>() : nullptr;
  p.Kp = Kp;
  p.G = G;
  p.N = N;
  if (bs.defined()) {
    p.bias = bs.data_ptr();
    p.bias_dtype = to_dtype(bs.scalar_type());
  }
  p.out = out.data_ptr();
  p.out_dtype = p.x_dtype;
  p.out_row_stride = N;
  // No workspace: the kernel uses the calling thread's reusable buffer (no allocation and, after
  // the first call of this size, no page faults per call).
  p.workspace = nullptr;
  p.workspace_bytes = 0;
  if (w4a8) {
    check_status(int4_gemm_w4a8_cpu(p, torch_thread_pool()), kOp);
    return out;
  }
  // Exact activations: the fused kernel, or at large M possibly decode + dense GEMM, whichever
  // this CPU runs faster (measured at first use: csrc/int4/int4_gemm_dense_torch.cpp).
  at::Tensor out2d = out.view({M, N});
  const auto fused = [&] { check_status(int4_gemm_cpu(p, torch_thread_pool()), kOp); };
  const auto dense = [&] { int4_dense::run_dense(p, x2, bs, out2d); };
  bool written = false;
  const bool use_dense = int4_dense::choose(p, x.scalar_type(), fused, dense, &written);
  if (!written) use_dense ? dense() : fused();
  return out;
}

}  // namespace

// The schema of both implementations (this file is compiled in every build).
TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // x [..., K]; returns [..., N]. The weight is in one of two layouts, named by `layout`
  // (0 = CPU tiles, 1 = GPU mma tiles; bitpress.int4.layout.Int4Layout, Int4Layout in
  // int4_gemm_args.h):
  //  * CPU tile layout (bitpress/int4/int4_gemm.h; CPU kernel): qweight [Nt, Kp/8, 64], scales and
  //    zeros [Nt, G, 64], group_starts [G+1] in octets;
  //  * GPU mma layout (bitpress/int4/int4_mma_layout.h; CUDA kernel): qweight [Kp/16, Nt*128],
  //    scales and zeros [G, Np], group_starts [G+1] in 16-row k-tiles;
  // perm [Kp] in both (source row of x, -1 = padding row; None = identity). act_dtype None: exact
  // activations; torch.int8: W4A8 (x quantized per row to int8, CPU only; int4_gemm.h).
  m.def(
      "int4_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor group_starts, "
      "Tensor? perm, int out_features, int layout, Tensor? bias=None, ScalarType? act_dtype=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("int4_gemm", &int4_gemm_cpu_impl); }

}  // namespace bitpress
