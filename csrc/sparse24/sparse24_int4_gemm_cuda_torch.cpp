// Torch glue of sparse24_int4_gemm on CUDA tensors, layout Sparse24Layout.MMA (= 1; the mma.sp
// layout of bitpress/sparse24/sparse24_int4_mma.h, produced by
// bitpress.sparse24.layout_mma_int4.to_mma_int4). The schema lives with the op (branch sparse24,
// csrc/sparse24/*_torch.cpp); this file only registers the CUDA implementation: checks, then the
// kernel (contract: bitpress/sparse24/sparse24_int4_gemm_cuda.h).
//
// Every M runs the weight-streaming kernel: at M <= 16 it is bound by reading 0.39 bytes per dense
// weight; above, m-blocks of 32 rows share each weight strip through L2 (no large-M cuBLAS path
// yet: it would need a decompression of the codes to a dense weight per call).
//
// x must be float16 or bfloat16 (mma.sp has no fp32 inputs): float32 x is rejected with an error
// that says so. Layout ROW (0) has no CUDA kernel: the weights must be converted once with
// to_mma_int4 (scales and zeros stay as they are).
#if defined(BITPRESS_WITH_CUDA)

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <vector>

#include "bitpress/sparse24/sparse24_int4_gemm_cuda.h"
#include "bitpress/sparse24/sparse24_mma_layout.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

constexpr const char* kOp = "sparse24_int4_gemm";
constexpr int64_t kLayoutMma = 1;  // Sparse24Layout.MMA (python/bitpress/sparse24/layout.py)

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

// Contiguous and 16-byte aligned (the kernel reads these with 16-byte cp.async); a view at an odd
// offset is copied.
at::Tensor dense16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

// [G, N] float tensor checks (scales, zeros).
void check_groups(const at::Tensor& t, const at::Tensor& x, const char* name, int64_t G,
                  int64_t N) {
  using namespace glue;
  check_dim(t, kOp, name, 2, "[G, N]");
  check_same_device(t, x, kOp, name, "x");
  check_dtype(t, kOp, name, {at::kFloat, at::kHalf, at::kBFloat16});
  check_size(t, kOp, name, 0, G, "G = ceil(K / group_size)");
  check_size(t, kOp, name, 1, N, "N = qvalues.size(0)");
}

// x [..., K] float16 / bfloat16; qvalues int32 [N, K/16] (the words of the mma layout);
// meta int32 [N/16, ceil(K/64), 32]; scales [G, N] and zeros [G, N] (or None) float32 / float16 /
// bfloat16; group_size % 32 == 0 or -1; N % 16 == 0, K % 32 == 0; bias [N] float32 / float16 /
// bfloat16 or None. Returns [..., N] in x.dtype.
at::Tensor sparse24_int4_gemm_cuda_impl(const at::Tensor& x, const at::Tensor& qvalues,
                                        const at::Tensor& meta, const at::Tensor& scales,
                                        const std::optional<at::Tensor>& zeros, int64_t group_size,
                                        int64_t layout, const std::optional<at::Tensor>& bias) {
  using namespace glue;
  TORCH_CHECK(layout == kLayoutMma, kOp,
              ": layout must be 1 (Sparse24Layout.MMA) for CUDA tensors, got ", layout,
              "; convert the weights once with "
              "bitpress.sparse24.layout_mma_int4.to_mma_int4(qvalues, meta)");
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
  check_dim(qvalues, kOp, "qvalues", 2, "[N, K/16] (mma layout words)");
  check_same_device(qvalues, x, kOp, "qvalues", "x");
  check_dtype(qvalues, kOp, "qvalues", {at::kInt});
  check_size(qvalues, kOp, "qvalues", 1, K / 16, "K/16 = x.size(-1) / 16");
  const int64_t N = qvalues.size(0), Nt = N / kSparse24MmaTileN;
  TORCH_CHECK(N % kSparse24MmaTileN == 0, kOp,
              ": qvalues.size(0) (N) must be a multiple of 16 for the mma layout, got ", N);
  check_dim(meta, kOp, "meta", 3, "[N/16, ceil(K/64), 32] (mma layout)");
  check_same_device(meta, x, kOp, "meta", "x");
  check_dtype(meta, kOp, "meta", {at::kInt});
  check_size(meta, kOp, "meta", 0, Nt, "N/16 = qvalues.size(0) / 16");
  check_size(meta, kOp, "meta", 1, sparse24_mma_padded_k(K) / kSparse24MmaPairK, "ceil(K/64)");
  check_size(meta, kOp, "meta", 2, kSparse24MmaPairWords, "one word per lane");
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % kSparse24MmaTileK == 0), kOp,
              ": group_size must be a positive multiple of 32 or -1 (all of K) on CUDA (a 32-K "
              "tile of mma.sp has one group), got ",
              group_size);
  const int64_t G = group_size == -1 ? (K > 0 ? 1 : 0) : (K + group_size - 1) / group_size;
  check_groups(scales, x, "scales", G, N);
  if (zeros) check_groups(*zeros, x, "zeros", G, N);
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
  const at::Tensor qv = dense16(qvalues), mt = dense16(meta), sc = dense16(scales);
  const at::Tensor zp = zeros ? dense16(*zeros) : at::Tensor();

  at::Tensor x2 = rows_contiguous(x.reshape({M, K}));
  int64_t x_stride = row_stride(x2);
  if (!aligned16(x2) || x_stride % 8 != 0) {
    // The kernel reads rows of x with 16-byte cp.async.
    x2 = x2.clone(at::MemoryFormat::Contiguous);
    x_stride = row_stride(x2);
  }
  const at::Tensor bs = bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = new_output(out_shape, x.options());

  Sparse24Int4GemmCudaParams p;
  p.x = x2.data_ptr();
  p.x_dtype = to_dtype(x.scalar_type());
  p.x_row_stride = x_stride;
  p.M = M;
  p.K = K;
  p.N = N;
  p.qvalues = qv.data_ptr<int32_t>();
  p.meta = mt.data_ptr<int32_t>();
  p.scales = sc.data_ptr();
  p.scales_dtype = to_dtype(sc.scalar_type());
  if (zp.defined()) {
    p.zeros = zp.data_ptr();
    p.zeros_dtype = to_dtype(zp.scalar_type());
  }
  p.group_size = group_size;
  if (bs.defined()) {
    p.bias = bs.data_ptr();
    p.bias_dtype = to_dtype(bs.scalar_type());
  }
  p.out = out.data_ptr();
  p.out_row_stride = N;
  p.num_sms = num_sms(x.device().index());
  const size_t ws_bytes = sparse24_int4_gemm_cuda_workspace_size(p);
  // at::empty from the caching allocator: stream-ordered, no sync, graph-capture safe; its blocks
  // are 512-byte aligned.
  const at::Tensor ws =
      at::empty({int64_t(std::max<size_t>(ws_bytes, 1))}, x.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  p.workspace_bytes = ws_bytes;
  check_status(sparse24_int4_gemm_cuda(p, stream), kOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bitpress, CUDA, m) {
  m.impl("sparse24_int4_gemm", &sparse24_int4_gemm_cuda_impl);
}

}  // namespace bitpress

#endif  // BITPRESS_WITH_CUDA
