// Torch glue of fp8_gemm on CUDA tensors: checks, then the sm_90a wgmma kernel (kernel contract in
// bitpress/fp8/fp8_gemm_cuda.h, kernel in csrc/fp8/fp8_gemm_sm90a.cu). The schema is declared with
// the op's other glue (csrc/fp8/*_torch.cpp).
//
//   a        float8_e4m3fn [M, K]   unit stride along K
//   b        float8_e4m3fn [N, K]   (a Linear's weight: K-major, as Hopper's FP8 wgmma needs)
//   scale_a  float32  [] or [1] (per tensor) | [M, 1] (per row) | [M, ceil(K/128)] (1 x 128)
//   scale_b  float32  [] or [1] (per tensor) | [N, 1] (per row) | [ceil(N/128), ceil(K/128)]
//   bias     [N] float32 / float16 / bfloat16, optional (added in fp32)
//   returns  [M, N] in out_dtype (default bfloat16; float16 and float32 too)
// The scale of each operand is classified by its shape on its own, so any pair of granularities
// works (the shapes that read two ways, e.g. [1, 1] with M = 1, mean the same numbers either way).
//
// Requirements of the kernel, checked here: a compute capability 9.0 device (the sm_90a image runs
// nowhere else) and K % 16 == 0 (rows are copied to shared memory in 16-byte chunks). Inputs that
// are not 16-byte aligned or not row-contiguous are copied once. Values on the device (scales, NaN)
// are not checked: that would need a host sync and break CUDA graph capture.
#if defined(BITPRESS_WITH_CUDA)

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <optional>

#include "bitpress/fp8/fp8_gemm_cuda.h"
#include "torch/glue.h"

namespace bitpress {

// A build whose CUDA arch list has no 9.0a compiles no fp8_gemm_sm90a.cu: this weak definition then
// stands in (kUnsupported, reported below as a missing sm_90a image); the kernel file's strong
// definition replaces it whenever it is built.
__attribute__((weak)) Status fp8_gemm_cuda(const Fp8GemmCudaParams& p, void*) {
  const Status s = fp8_gemm_cuda_check(p);
  return s != Status::kSuccess ? s : Status::kUnsupported;
}

namespace {

constexpr const char* kOp = "fp8_gemm";

struct DeviceInfo {
  int major = 0, minor = 0, sms = 0;
};

// Compute capability and multiprocessor count per device, queried once.
DeviceInfo device_info(int device) {
  static std::array<std::atomic<int>, 64> cache{};  // (major << 24) | (minor << 16) | sms, 0: unset
  const int slot = device >= 0 && device < int(cache.size()) ? device : 0;
  int v = cache[slot].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, minor = 0, sms = 0;
    TORCH_CHECK(
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) ==
                cudaSuccess &&
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
        kOp, ": cudaDeviceGetAttribute failed on device ", device);
    v = (major << 24) | (minor << 16) | (sms & 0xFFFF);
    cache[slot].store(v, std::memory_order_relaxed);
  }
  return {v >> 24, (v >> 16) & 0xFF, v & 0xFFFF};
}

// Row-contiguous, 16-byte aligned, row stride a multiple of 16 bytes (the kernel's cp.async reads);
// anything else is copied once.
at::Tensor rows16(const at::Tensor& t) {
  at::Tensor r = glue::rows_contiguous(t);
  const bool ok =
      (reinterpret_cast<uintptr_t>(r.data_ptr()) & 15) == 0 && glue::row_stride(r) % 16 == 0;
  return ok ? r : r.contiguous().clone();
}

// The granularity of one operand's scale from its shape: rows = M (a) or N (b).
Fp8ScaleMode scale_mode(const at::Tensor& s, const char* name, int64_t rows, int64_t KB,
                        bool is_b) {
  glue::check_dtype(s, kOp, name, {at::kFloat});
  const int64_t block_rows = is_b ? (rows + 127) / 128 : rows;
  if (s.numel() == 1 && s.dim() <= 2) return Fp8ScaleMode::kTensor;
  if (s.dim() == 2 && s.size(0) == rows && s.size(1) == 1) return Fp8ScaleMode::kRow;
  if (s.dim() == 2 && s.size(0) == block_rows && s.size(1) == KB) return Fp8ScaleMode::kBlock;
  TORCH_CHECK(false, kOp, ": ", name, " must be float32 of shape [] or [1] (per tensor), [",
              is_b ? "N" : "M", ", 1] = [", rows, ", 1] (per row) or [", is_b ? "ceil(N/128)" : "M",
              ", ceil(K/128)] = [", block_rows, ", ", KB, "] (", is_b ? "128 x 128" : "1 x 128",
              " blocks), got shape ", s.sizes());
  return Fp8ScaleMode::kTensor;
}

at::Tensor fp8_gemm_cuda_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                              const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                              std::optional<at::ScalarType> out_dtype) {
  using namespace glue;
  check_dtype(a, kOp, "a", {at::kFloat8_e4m3fn});
  check_dim(a, kOp, "a", 2, "[M, K]");
  TORCH_CHECK(a.is_cuda(), kOp, ": a must be a CUDA tensor, got ", a.device());
  check_dtype(b, kOp, "b", {at::kFloat8_e4m3fn});
  check_dim(b, kOp, "b", 2, "[N, K]");
  check_same_device(b, a, kOp, "b", "a");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  check_size(b, kOp, "b", 1, K, "K, as a.size(1)");
  TORCH_CHECK(K % 16 == 0, kOp, ": a: K = a.size(1) must be a multiple of 16 on CUDA (the sm_90a ",
              "kernel copies rows in 16-byte chunks), got K = ", K);
  const int64_t KB = (K + kFp8TileK - 1) / kFp8TileK;
  check_same_device(scale_a, a, kOp, "scale_a", "a");
  check_same_device(scale_b, a, kOp, "scale_b", "a");
  const Fp8ScaleMode ma = scale_mode(scale_a, "scale_a", M, KB, false);
  const Fp8ScaleMode mb = scale_mode(scale_b, "scale_b", N, KB, true);
  if (bias) {
    check_dtype(*bias, kOp, "bias", {at::kFloat, at::kHalf, at::kBFloat16});
    check_dim(*bias, kOp, "bias", 1, "[N]");
    check_size(*bias, kOp, "bias", 0, N, "N, as b.size(0)");
    check_same_device(*bias, a, kOp, "bias", "a");
  }
  const at::ScalarType odt = out_dtype.value_or(at::kBFloat16);
  TORCH_CHECK(odt == at::kBFloat16 || odt == at::kHalf || odt == at::kFloat, kOp,
              ": out_dtype must be bfloat16, float16 or float32, got ", dtype_name(odt));

  const c10::cuda::CUDAGuard guard(a.device());
  const int device = a.device().index();
  const DeviceInfo info = device_info(device);
  TORCH_CHECK(info.major == 9 && info.minor == 0, kOp,
              ": a: the CUDA kernel needs a compute capability 9.0 GPU (its sm_90a image runs on "
              "no other), got ",
              info.major, ".", info.minor, " on ", a.device());

  at::Tensor out = new_output({M, N}, a.options().dtype(odt));
  if (M == 0 || N == 0) return out;
  const at::Tensor a2 = rows16(a), b2 = rows16(b);
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  const at::Tensor bs = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();

  Fp8GemmCudaParams p;
  p.a = static_cast<const uint8_t*>(a2.data_ptr());
  p.a_row_stride = row_stride(a2);
  p.b = static_cast<const uint8_t*>(b2.data_ptr());
  p.b_row_stride = row_stride(b2);
  p.M = M;
  p.N = N;
  p.K = K;
  p.scale_a = sa.data_ptr<float>();
  p.scale_a_mode = ma;
  p.scale_b = sb.data_ptr<float>();
  p.scale_b_mode = mb;
  p.bias = bs.defined() ? bs.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.out_dtype = to_dtype(odt);
  p.out_row_stride = N;
  p.num_sms = info.sms;
  const size_t ws_bytes = fp8_gemm_cuda_workspace_size(p);
  // The caching allocator: stream-ordered, no sync, graph-capture safe, 512-byte aligned blocks.
  const at::Tensor ws =
      at::empty({int64_t(std::max<size_t>(ws_bytes, 1))}, a.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  p.workspace_bytes = ws_bytes;
  const Status s = fp8_gemm_cuda(p, c10::cuda::getCurrentCUDAStream(device).stream());
  TORCH_CHECK(s != Status::kUnsupported, kOp,
              ": this build of bitpress has no sm_90a image of the kernel (build with 9.0a in "
              "TORCH_CUDA_ARCH_LIST)");
  check_status(s, kOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bitpress, CUDA, m) { m.impl("fp8_gemm", &fp8_gemm_cuda_impl); }

}  // namespace bitpress

#endif  // BITPRESS_WITH_CUDA
