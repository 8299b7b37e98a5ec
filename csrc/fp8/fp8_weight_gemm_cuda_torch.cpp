// Torch glue of fp8_weight_gemm on CUDA tensors: the checks of every backend (fp8_args.h:
// prepare_fp8_weight_gemm, the one authoritative check of the op), then one of two paths:
//
//   * x float16 / bfloat16 and M <= max_m (default 128; the environment variable
//     BITPRESS_FP8_CUDA_MAX_M, read once per process, overrides it): the mma.sync kernel
//     fp8_weight_gemm_cuda (csrc/fp8/fp8_weight_gemm_sm80.cu), which reads W's E4M3 rows as they
//     are (1 byte per weight: the small-M GEMM is bound by that read). The default threshold is
//     a prediction (bench/NOTES.md, "fp8_weight_gemm on A100": at M = 128 the kernel still reads W
//     about once and costs less than a dequantization pass plus cuBLAS); to be measured. Products
//     exact, fp32 sums, the scales on the fp32 sums, one rounding to x's dtype.
// K % 16 != 0 (no real model has it) is padded with zeros here, a copy of W per call.
//   * otherwise (larger M, where cuBLAS's tensor-core kernels win, or float32 x): W · s computed
//     in float32 and rounded once to x's dtype (float32 x: not rounded at all) by
//     fp8_weight_dequantize_cuda (one pass: 1 byte read, 2 or 4 written per weight), then
//     at::linear (cuBLAS; float32 x gives a float32 GEMM).
#if defined(BITPRESS_WITH_CUDA)

#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstdlib>

#include "bitpress/fp8/fp8_weight_gemm_cuda.h"
#include "fp8_args.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

constexpr const char* kOp = "fp8_weight_gemm";
constexpr int64_t kDefaultMaxM = 128;

int64_t kernel_max_m() {
  static const int64_t max_m = [] {
    const char* s = std::getenv("BITPRESS_FP8_CUDA_MAX_M");
    if (s == nullptr || *s == '\0') return kDefaultMaxM;
    char* end = nullptr;
    const long long v = std::strtoll(s, &end, 10);
    if (end == s || *end != '\0' || v < 0) {
      TORCH_WARN("fp8_weight_gemm: BITPRESS_FP8_CUDA_MAX_M must be a non-negative integer, got '",
                 s, "'; using ", kDefaultMaxM);
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

// x [..., K] float32 / float16 / bfloat16 (CUDA); w [N, K] float8_e4m3fn; w_scale float32: a
// single value, [N, 1] or [ceil(N/128), ceil(K/128)]; bias [N] or None. Returns [..., N] in
// x.dtype.
at::Tensor fp8_weight_gemm_cuda_impl(const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& w_scale,
                                     const std::optional<at::Tensor>& bias) {
  glue::Fp8WeightGemmPrepared r = glue::prepare_fp8_weight_gemm(x, w, w_scale, bias);
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t M = r.p.M, N = r.p.N, K = r.p.K;
  if (M == 0 || N == 0) return r.out;
  if (K == 0) {  // an empty sum: the bias, or zeros
    if (r.bias.defined()) return r.out.copy_(r.bias.to(x.scalar_type()).expand_as(r.out));
    return r.out.zero_();
  }
  const Fp8ScaleLayout layout = r.p.w_scale.layout;

  // The kernels read 16-byte chunks of x and W rows: rows 16-byte aligned, K a multiple of 16
  // (zero padding: zero codes and zero activations add nothing; the block scales keep their
  // ceil(K/128) columns, as the padding stays inside the last 128-block).
  at::Tensor x2 = r.x, w2 = r.w.view(at::kByte);
  const int64_t Kp = (K + 15) / 16 * 16;
  if (Kp != K) {
    x2 = at::constant_pad_nd(x2, {0, Kp - K}, 0);
    w2 = at::constant_pad_nd(w2, {0, Kp - K}, 0);
  }
  int64_t w_stride = glue::row_stride(w2);
  if (!aligned16(w2) || w_stride % 16 != 0) {
    w2 = w2.clone(at::MemoryFormat::Contiguous);
    w_stride = glue::row_stride(w2);
  }

  if (x.scalar_type() == at::kFloat || M > kernel_max_m()) {
    // W · s in x's dtype, one rounding (none for float32), then cuBLAS.
    const at::Tensor wd = at::empty({N, Kp}, x.options());
    Fp8WeightDequantizeCudaParams d;
    d.w = reinterpret_cast<const uint8_t*>(w2.data_ptr());
    d.w_row_stride = w_stride;
    d.N = N;
    d.K = Kp;
    d.w_scale = r.w_scale.data_ptr<float>();
    d.scale_layout = layout;
    d.out = wd.data_ptr();
    d.out_dtype = glue::to_dtype(x.scalar_type());
    d.out_row_stride = Kp;
    glue::check_status(fp8_weight_dequantize_cuda(d, stream), kOp);
    const std::optional<at::Tensor> b =
        r.bias.defined() ? std::optional<at::Tensor>(r.bias.to(x.scalar_type())) : std::nullopt;
    return at::linear(x2, wd, b).reshape(r.out.sizes());
  }

  int64_t x_stride = glue::row_stride(x2);
  if (!aligned16(x2) || x_stride % 8 != 0) {
    x2 = x2.clone(at::MemoryFormat::Contiguous);
    x_stride = glue::row_stride(x2);
  }

  Fp8WeightGemmCudaParams p;
  p.x = x2.data_ptr();
  p.x_dtype = glue::to_dtype(x.scalar_type());
  p.x_row_stride = x_stride;
  p.M = M;
  p.K = Kp;
  p.N = N;
  p.w = reinterpret_cast<const uint8_t*>(w2.data_ptr());
  p.w_row_stride = w_stride;
  p.w_scale = r.w_scale.data_ptr<float>();
  p.scale_layout = layout;
  p.bias = r.p.bias;
  p.bias_dtype = r.p.bias_dtype;
  p.out = r.out.data_ptr();
  p.out_row_stride = N;
  p.num_sms = num_sms(x.device().index());
  const size_t ws_bytes = fp8_weight_gemm_cuda_workspace_size(p);
  // at::empty from the caching allocator: stream-ordered, no sync, graph-capture safe; its blocks
  // are 512-byte aligned.
  const at::Tensor ws =
      at::empty({int64_t(std::max<size_t>(ws_bytes, 1))}, x.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  p.workspace_bytes = ws_bytes;
  glue::check_status(fp8_weight_gemm_cuda(p, stream), kOp);
  return r.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bitpress, CUDA, m) { m.impl("fp8_weight_gemm", &fp8_weight_gemm_cuda_impl); }

}  // namespace bitpress

#endif  // BITPRESS_WITH_CUDA
