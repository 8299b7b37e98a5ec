// Torch glue of sparse24_gemm on CUDA tensors, layout Sparse24Layout.MMA (= 1; the mma.sp layout
// of bitpress/sparse24/sparse24_mma_layout.h, produced by bitpress.sparse24.layout_mma.to_mma).
// The schema lives with the op (branch sparse24, csrc/sparse24/*_torch.cpp); this file only
// registers the CUDA implementation. Checks, then one of two paths (kernel contract:
// bitpress/sparse24/sparse24_gemm_cuda.h):
//
//   * M <= max_m (default 128; the environment variable BITPRESS_SPARSE24_CUDA_MAX_M, read once per
//     process, overrides it): the mma.sp kernel sparse24_gemm_cuda (csrc/sparse24/
//     sparse24_gemm_sm80.cu). At small M the GEMM is bound by reading the weights, which the
//     kernel reads at 1.125 bytes per dense weight instead of 2.
//   * larger M: W [N, K] is decompressed once into x's dtype (sparse24_decompress_cuda), then
//     at::linear (cuBLAS), which is compute bound there and beats a weight-streaming kernel.
//
// x must be float16 or bfloat16 (mma.sp has no fp32 inputs): float32 x is rejected with an
// error that says so (the Python op routes float32 to another backend). Layout ROW (0) has no CUDA
// kernel: the weights must be converted once with to_mma.
#if defined(BITPRESS_WITH_CUDA)

#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <vector>

#include "bitpress/sparse24/sparse24_gemm_cuda.h"
#include "bitpress/sparse24/sparse24_mma_layout.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

constexpr const char* kOp = "sparse24_gemm";
constexpr int64_t kLayoutMma = 1;  // Sparse24Layout.MMA (python/bitpress/sparse24/layout.py)
// Up to 128 rows the kernel still streams the weights once (m-blocks share them through L2) and
// its sparse mma work stays under the memory time; above, cuBLAS on the dense weight.
constexpr int64_t kDefaultMaxM = 128;

int64_t kernel_max_m() {
  static const int64_t max_m = [] {
    const char* s = std::getenv("BITPRESS_SPARSE24_CUDA_MAX_M");
    if (s == nullptr || *s == '\0') return kDefaultMaxM;
    char* end = nullptr;
    const long long v = std::strtoll(s, &end, 10);
    if (end == s || *end != '\0' || v < 0) {
      TORCH_WARN(
          "sparse24_gemm: BITPRESS_SPARSE24_CUDA_MAX_M must be a non-negative integer, got '", s,
          "'; using ", kDefaultMaxM);
      return kDefaultMaxM;
    }
    return int64_t(v);
  }();
  return max_m;
}

// Multiprocessor count per device, queried once (it sets the split-K factor).
int num_sms(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= int(cache.size())) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    TORCH_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
                kOp, ": cudaDeviceGetAttribute(MultiProcessorCount) failed");
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

bool aligned16(const at::Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0;
}

// Contiguous and 16-byte aligned (the kernels read these with 16-byte cp.async); a view at an odd
// offset is copied.
at::Tensor dense16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

// x [..., K] float16 / bfloat16; values [N, K/2] x.dtype (the tiles of the mma layout);
// meta int32 [N/16, ceil(K/64), 32]; N % 16 == 0, K % 32 == 0; bias [N] float32 / float16 /
// bfloat16 or None. Returns [..., N] in x.dtype.
at::Tensor sparse24_gemm_cuda_impl(const at::Tensor& x, const at::Tensor& values,
                                   const at::Tensor& meta, int64_t layout,
                                   const std::optional<at::Tensor>& bias) {
  using namespace glue;
  TORCH_CHECK(layout == kLayoutMma, kOp,
              ": layout must be 1 (Sparse24Layout.MMA) for CUDA tensors, ", "got ", layout,
              "; convert the weights once with ",
              "bitpress.sparse24.layout_mma.to_mma(values, meta)");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least 1 dimension [..., K], got a scalar");
  TORCH_CHECK_TYPE(x.scalar_type() != at::kFloat, kOp,
                   ": x must be float16 or bfloat16 on CUDA (mma.sp has no float32 inputs), got "
                   "float32; use another backend for float32");
  check_dtype(x, kOp, "x", {at::kHalf, at::kBFloat16});
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % kSparse24MmaTileK == 0, kOp,
              ": x.size(-1) (K) must be a multiple of 32 for the mma layout (whole 16 x 32 tiles), "
              "got ",
              K);
  check_dim(values, kOp, "values", 2, "[N, K/2] (mma layout tiles)");
  check_same_device(values, x, kOp, "values", "x");
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), kOp, ": values must have x's dtype (",
                   dtype_name(x.scalar_type()), "), got ", dtype_name(values.scalar_type()));
  check_size(values, kOp, "values", 1, K / 2, "K/2 = x.size(-1) / 2");
  const int64_t N = values.size(0), Nt = N / kSparse24MmaTileN;
  TORCH_CHECK(N % kSparse24MmaTileN == 0, kOp,
              ": values.size(0) (N) must be a multiple of 16 for the mma layout, got ", N);
  check_dim(meta, kOp, "meta", 3, "[N/16, ceil(K/64), 32] (mma layout)");
  check_same_device(meta, x, kOp, "meta", "x");
  check_dtype(meta, kOp, "meta", {at::kInt});
  check_size(meta, kOp, "meta", 0, Nt, "N/16 = values.size(0) / 16");
  check_size(meta, kOp, "meta", 1, sparse24_mma_padded_k(K) / kSparse24MmaPairK, "ceil(K/64)");
  check_size(meta, kOp, "meta", 2, kSparse24MmaPairWords, "one word per lane");
  if (bias) {
    check_dim(*bias, kOp, "bias", 1, "[N]");
    check_same_device(*bias, x, kOp, "bias", "x");
    check_dtype(*bias, kOp, "bias", {at::kFloat, at::kHalf, at::kBFloat16});
    check_size(*bias, kOp, "bias", 0, N, "N, the output features");
  }

  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  if (M == 0 || N == 0) return new_output(out_shape, x.options());
  if (K == 0) {
    at::Tensor out = new_output(out_shape, x.options());
    return bias ? out.copy_(bias->expand_as(out)) : out.zero_();
  }
  const at::Tensor vals = dense16(values), mt = dense16(meta);

  if (M > kernel_max_m()) {
    // Large M: dense W in x.dtype, then cuBLAS.
    at::Tensor w = new_output({N, K}, x.options());
    Sparse24DecompressCudaParams d;
    d.values = vals.data_ptr();
    d.meta = mt.data_ptr<int32_t>();
    d.dtype = to_dtype(x.scalar_type());
    d.N = N;
    d.K = K;
    d.out = w.data_ptr();
    d.out_row_stride = K;
    check_status(sparse24_decompress_cuda(d, stream), kOp);
    const std::optional<at::Tensor> b =
        bias ? std::optional<at::Tensor>(bias->to(x.scalar_type())) : std::nullopt;
    return at::linear(x, w, b);
  }

  at::Tensor x2 = rows_contiguous(x.reshape({M, K}));
  int64_t x_stride = row_stride(x2);
  if (!aligned16(x2) || x_stride % 8 != 0) {
    // The kernel reads rows of x with 16-byte cp.async.
    x2 = x2.clone(at::MemoryFormat::Contiguous);
    x_stride = row_stride(x2);
  }
  const at::Tensor bs = bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = new_output(out_shape, x.options());

  Sparse24GemmCudaParams p;
  p.x = x2.data_ptr();
  p.x_dtype = to_dtype(x.scalar_type());
  p.x_row_stride = x_stride;
  p.M = M;
  p.K = K;
  p.N = N;
  p.values = vals.data_ptr();
  p.meta = mt.data_ptr<int32_t>();
  if (bs.defined()) {
    p.bias = bs.data_ptr();
    p.bias_dtype = to_dtype(bs.scalar_type());
  }
  p.out = out.data_ptr();
  p.out_row_stride = N;
  p.num_sms = num_sms(x.device().index());
  const size_t ws_bytes = sparse24_gemm_cuda_workspace_size(p);
  // at::empty from the caching allocator: stream-ordered, no sync, graph-capture safe; its blocks
  // are 512-byte aligned.
  const at::Tensor ws =
      at::empty({int64_t(std::max<size_t>(ws_bytes, 1))}, x.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  p.workspace_bytes = ws_bytes;
  check_status(sparse24_gemm_cuda(p, stream), kOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bitpress, CUDA, m) { m.impl("sparse24_gemm", &sparse24_gemm_cuda_impl); }

}  // namespace bitpress

#endif  // BITPRESS_WITH_CUDA
