// Torch glue of int4_gemm on CUDA tensors (GPU mma layout, bitpress/int4/int4_mma_layout.h):
// checks, then one of two paths (the CUDA section of bitpress/int4/int4_gemm.h has the kernel
// contract):
//
//   * x float16 / bfloat16 and M <= max_m (default 64; the environment variable
//     BITPRESS_INT4_CUDA_MAX_M, read once per process, overrides it): the Marlin-style kernel
//     int4_gemm_cuda (csrc/int4/int4_gemm_sm80.cu). At small M the GEMM is bound by reading the
//     weights, which the kernel reads as 4 bits.
//   * otherwise (larger M, or float32 x): W [N, K] is dequantized once into x's dtype in the
//     original row order (int4_gemm_dequantize_cuda, W[n, perm[k]] = row k of the layout), then
//     at::linear (cuBLAS). At large M the GEMM is compute bound and cuBLAS's tensor-core kernels
//     beat a weight-streaming one; the dequantization costs N x K x 2 bytes of writes per call.
//
// Values that live on the device are not checked (that would need a host sync and break CUDA
// graph capture): group_starts is not read (the layout's groups are uniform: group of k-tile kt
// is kt / ((Kp/16) / G)); a perm value outside [-1, K) makes the kernel path return NaN in every
// row (x_perm gets NaN) and the dequantize path NaN in every output (column 0 of W is NaN).
#if defined(BITPRESS_WITH_CUDA)

#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <vector>

#include "bitpress/int4/int4_gemm.h"
#include "bitpress/int4/int4_mma_layout.h"
#include "int4_gemm_args.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

constexpr const char* kOp = "int4_gemm";
constexpr int64_t kDefaultMaxM = 64;

int64_t kernel_max_m() {
  static const int64_t max_m = [] {
    const char* s = std::getenv("BITPRESS_INT4_CUDA_MAX_M");
    if (s == nullptr || *s == '\0') return kDefaultMaxM;
    char* end = nullptr;
    const long long v = std::strtoll(s, &end, 10);
    if (end == s || *end != '\0' || v < 0) {
      TORCH_WARN("int4_gemm: BITPRESS_INT4_CUDA_MAX_M must be a non-negative integer, got '", s,
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

// x [..., K]; qweight [Kp/16, Nt*128] int32; scales [G, Np] float32; zeros [G, Np] uint8 or
// None; group_starts [G+1] int32 (shape checked only); perm [Kp] int32 or None; bias [N] or None.
// Returns [..., N] in x.dtype.
at::Tensor int4_gemm_cuda_impl(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                               const at::Tensor& group_starts,
                               const std::optional<at::Tensor>& perm, int64_t out_features,
                               int64_t layout, const std::optional<at::Tensor>& bias,
                               std::optional<at::ScalarType> act_dtype) {
  using namespace glue;
  TORCH_CHECK(!act_dtype || *act_dtype == at::kChar, kOp,
              ": act_dtype must be None (exact activations) or torch.int8 (W4A8), got ",
              act_dtype ? glue::dtype_name(*act_dtype) : "None");
  TORCH_CHECK(!act_dtype, kOp,
              ": act_dtype=torch.int8 (W4A8) is implemented on the CPU only; use act_dtype=None on "
              "CUDA");
  const Int4GemmShapes shp = check_int4_gemm_args(Int4Layout::kMma, layout, x, qweight, scales,
                                                  zeros, group_starts, perm, out_features, bias);
  const int64_t K = shp.K, N = shp.N, Kp = shp.Kp, G = shp.G;
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());

  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = int4_gemm_rows(x);
  at::Tensor x2 = rows_contiguous(x.reshape({M, K}));
  const at::Tensor qw = dense16(qweight), sc = dense16(scales);
  const at::Tensor zr = zeros ? dense16(*zeros) : at::Tensor();
  const at::Tensor pm = perm ? perm->contiguous() : at::Tensor();

  if (M == 0 || N == 0) return new_output(out_shape, x.options());  // nothing to dequantize
  if (K == 0) return int4_gemm_empty_sum(new_output(out_shape, x.options()), bias);
  const bool kernel_path = x.scalar_type() != at::kFloat && M <= kernel_max_m();
  if (!kernel_path) {
    // Large M or float32 x: dense W in x.dtype, then cuBLAS.
    const auto opts = x.options();
    at::Tensor w = pm.defined() ? at::zeros({N, K}, opts) : new_output({N, K}, opts);
    Int4GemmDequantizeCudaParams d;
    d.qweight = qw.data_ptr<int32_t>();
    d.scales = sc.data_ptr<float>();
    d.zeros = zr.defined() ? zr.data_ptr<uint8_t>() : nullptr;
    d.perm = pm.defined() ? pm.data_ptr<int32_t>() : nullptr;
    d.K = K;
    d.Kp = Kp;
    d.G = G;
    d.N = N;
    d.out = w.data_ptr();
    d.out_dtype = to_dtype(x.scalar_type());
    d.out_row_stride = std::max<int64_t>(K, 1);
    check_status(int4_gemm_dequantize_cuda(d, stream), kOp);
    const std::optional<at::Tensor> b =
        bias ? std::optional<at::Tensor>(bias->to(x.scalar_type())) : std::nullopt;
    return at::linear(x2, w, b).reshape(out_shape);
  }

  at::Tensor out = new_output(out_shape, x.options());
  int64_t x_stride = row_stride(x2);
  if (!pm.defined() && (!aligned16(x2) || x_stride % 8 != 0)) {
    // The kernel reads rows of x with 16-byte cp.async.
    x2 = x2.clone(at::MemoryFormat::Contiguous);
    x_stride = row_stride(x2);
  }
  const at::Tensor bs = bias ? bias->contiguous() : at::Tensor();

  Int4GemmCudaParams p;
  p.x = x2.data_ptr();
  p.x_dtype = to_dtype(x.scalar_type());
  p.x_row_stride = x_stride;
  p.M = M;
  p.K = K;
  p.qweight = qw.data_ptr<int32_t>();
  p.scales = sc.data_ptr<float>();
  p.zeros = zr.defined() ? zr.data_ptr<uint8_t>() : nullptr;
  p.perm = pm.defined() ? pm.data_ptr<int32_t>() : nullptr;
  p.Kp = Kp;
  p.G = G;
  p.N = N;
  if (bs.defined()) {
    p.bias = bs.data_ptr();
    p.bias_dtype = to_dtype(bs.scalar_type());
  }
  p.out = out.data_ptr();
  p.out_row_stride = N;
  p.num_sms = num_sms(x.device().index());
  const size_t ws_bytes = int4_gemm_cuda_workspace_size(p);
  // at::empty from the caching allocator: stream-ordered, no sync, graph-capture safe; its
  // blocks are 512-byte aligned.
  const at::Tensor ws =
      at::empty({int64_t(std::max<size_t>(ws_bytes, 1))}, x.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  p.workspace_bytes = ws_bytes;
  check_status(int4_gemm_cuda(p, stream), kOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bitpress, CUDA, m) { m.impl("int4_gemm", &int4_gemm_cuda_impl); }

}  // namespace bitpress

#endif  // BITPRESS_WITH_CUDA
