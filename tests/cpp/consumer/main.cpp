// Links the installed bitpress::kernels and dequantizes a small INT4 matrix on the CPU.
#include <bitpress/bitpress.h>

#include <cstdio>
#include <vector>

int main() {
  // K = 8, N = 2: one packed row; column 0 holds q = 0..7, column 1 holds q = 15..8.
  std::vector<int32_t> qweight = {0x76543210, int32_t(0x89abcdefu)};
  std::vector<float> scales = {0.5f, 2.0f};
  std::vector<float> out(16, -1.0f);
  bitpress::Int4DequantizeParams p;
  p.qweight = qweight.data();
  p.qweight_row_stride = 2;
  p.scales = scales.data();
  p.scales_dtype = bitpress::DType::kFloat32;
  p.scales_row_stride = 2;
  p.out = out.data();
  p.out_dtype = bitpress::DType::kFloat32;
  p.out_row_stride = 2;
  p.K = 8;
  p.N = 2;
  p.num_groups = 1;
  p.group_size = 8;
  if (bitpress::int4_dequantize_cpu(p) != bitpress::Status::kSuccess) return 1;
  for (int k = 0; k < 8; ++k) {
    if (out[2 * k] != (k - 8) * 0.5f || out[2 * k + 1] != (15 - k - 8) * 2.0f) {
      std::printf("wrong value at k=%d: %g %g\n", k, out[2 * k], out[2 * k + 1]);
      return 1;
    }
  }
  // The CUDA entry point links in every build (kUnsupported without CUDA; an empty call succeeds).
  bitpress::Int4DequantizeParams empty;
  const bitpress::Status s = bitpress::int4_dequantize_cuda(empty, nullptr);
  std::printf("bitpress %s: int4_dequantize_cpu ok; int4_dequantize_cuda(empty): %s\n",
              BITPRESS_VERSION_STRING, bitpress::status_string(s));
  return 0;
}
