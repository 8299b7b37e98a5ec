// Torch glue of fp8_gemm on CUDA tensors: the op's shared checks (prepare_fp8_gemm in
// fp8_args.h, the same as on the CPU), then the sm_90a wgmma kernel (kernel contract in
// bitpress/fp8/fp8_gemm_cuda.h, kernel in csrc/fp8/fp8_gemm_sm90a.cu). The schema is declared with
// the CPU glue (csrc/fp8/fp8_gemm_torch.cpp).
//
//   a        float8_e4m3fn [M, K]   unit stride along K
//   b        float8_e4m3fn [N, K]   (a Linear's weight: K-major, as Hopper's FP8 wgmma needs)
//   scale_a  float32  [] or [1] (per tensor) | [M, 1] (per row) | [M, ceil(K/128)] (1 x 128)
//   scale_b  float32  [] or [1] (per tensor) | [N, 1] (per row) | [ceil(N/128), ceil(K/128)]
//            (blockwise scales come in pairs; per tensor and per row mix freely)
//   bias     [N] float32 / float16 / bfloat16, optional (added in fp32)
//   returns  [M, N] in out_dtype (default bfloat16; float16 and float32 too)
//
// What the kernel needs beyond the op's contract, arranged here: a compute capability 9.0 device
// (its sm_90a image runs nowhere else: an error otherwise), rows 16-byte aligned with K % 16 == 0
// (it copies rows to shared memory in 16-byte chunks). Inputs that are not 16-byte aligned or not
// row-contiguous are copied once; K % 16 != 0 (no real model layer) copies a and b zero-padded to
// the next multiple of 16 (exact: zero products, and ceil(K/128) is unchanged so the block scales
// are too). Values on the device (scales, NaN) are not checked: that would need a host sync and
// break CUDA graph capture.
#if defined(BITPRESS_WITH_CUDA)

#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <optional>

#include "bitpress/fp8/fp8_gemm_cuda.h"
#include "fp8_args.h"
#include "torch/glue.h"

namespace bitpress {

// A build whose CUDA arch list has no 9.0a compiles no fp8_gemm_sm90a.cu: this weak definition then
// stands in (kUnsupported, reported below as a missing sm_90a image); the kernel file's strong
// definition replaces it whenever it is built.
__attribute__((weak)) Status fp8_gemm_cuda(const Fp8GemmCudaParams& p, void*) {
  const Status s = fp8_gemm_cuda_check(p);
  return s != Status::kSuccess ? s : Status::kUnsupported;
}

// The kernel's scale modes are the op's scale layouts, value for value (cast in the glue below).
static_assert(int(Fp8ScaleMode::kTensor) == int(Fp8ScaleLayout::kTensor) &&
              int(Fp8ScaleMode::kRow) == int(Fp8ScaleLayout::kRow) &&
              int(Fp8ScaleMode::kBlock) == int(Fp8ScaleLayout::kBlock));

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
  const bool ok =
      (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0 && glue::row_stride(t) % 16 == 0;
  return ok ? t : t.contiguous().clone();
}

// [R, K] E4M3 -> [R, Kp] with zero bytes (+0.0) in columns K..Kp-1; padded as uint8 (torch's pad
// kernels do not all take float8).
at::Tensor pad_k(const at::Tensor& t, int64_t Kp) {
  const at::Tensor bytes = t.contiguous().view(at::kByte);
  return at::constant_pad_nd(bytes, {0, Kp - t.size(1)}, 0).view(at::kFloat8_e4m3fn);
}

at::Tensor fp8_gemm_cuda_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                              const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                              std::optional<at::ScalarType> out_dtype) {
  using namespace glue;
  Fp8GemmPrepared r = prepare_fp8_gemm(a, b, scale_a, scale_b, bias, out_dtype);
  TORCH_CHECK(a.is_cuda(), kOp, ": a must be a CUDA tensor, got ", a.device());
  const int64_t M = r.p.M, N = r.p.N, K = r.p.K;

  const c10::cuda::CUDAGuard guard(a.device());
  const int device = a.device().index();
  const DeviceInfo info = device_info(device);
  TORCH_CHECK(info.major == 9 && info.minor == 0, kOp,
              ": a: the CUDA kernel needs a compute capability 9.0 GPU (its sm_90a image runs on "
              "no other), got ",
              info.major, ".", info.minor, " on ", a.device());
  if (M == 0 || N == 0) return r.out;

  const int64_t Kp = (K + 15) / 16 * 16;
  const at::Tensor a2 = Kp != K ? pad_k(r.a, Kp) : rows16(r.a);
  const at::Tensor b2 = Kp != K ? pad_k(r.b, Kp) : rows16(r.b);
  const at::Tensor bs = r.bias.defined() ? r.bias.to(at::kFloat).contiguous() : at::Tensor();

  Fp8GemmCudaParams p;
  p.a = static_cast<const uint8_t*>(a2.data_ptr());
  p.a_row_stride = Kp != K ? Kp : row_stride(a2);
  p.b = static_cast<const uint8_t*>(b2.data_ptr());
  p.b_row_stride = Kp != K ? Kp : row_stride(b2);
  p.M = M;
  p.N = N;
  p.K = Kp;
  // prepare_fp8_gemm made the scales contiguous: [M, 1] / [N, 1] rows at stride 1, blocks at
  // stride ceil(K/128), as the kernel reads them.
  p.scale_a = r.p.scale_a.data;
  p.scale_a_mode = Fp8ScaleMode(int(r.p.scale_a.layout));
  p.scale_b = r.p.scale_b.data;
  p.scale_b_mode = Fp8ScaleMode(int(r.p.scale_b.layout));
  p.bias = bs.defined() ? bs.data_ptr<float>() : nullptr;
  p.out = r.out.data_ptr();
  p.out_dtype = r.p.out_dtype;
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
  return r.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bitpress, CUDA, m) { m.impl("fp8_gemm", &fp8_gemm_cuda_impl); }

}  // namespace bitpress

#endif  // BITPRESS_WITH_CUDA
