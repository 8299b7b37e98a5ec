// Torch glue of sparse24_compress on the CPU: dense w [N, K] -> (values [N, K/2], meta uint8
// [N, K/8]), the 2:4 interchange format (bitpress/sparse24/sparse24.h). The authoritative check:
// the pattern, naming the first row and group of 4 that break it.
#include <tuple>

#include "sparse24_args.h"

namespace bitpress {
namespace {

constexpr const char* kOp = "sparse24_compress";

std::tuple<at::Tensor, at::Tensor> sparse24_compress_cpu_impl(const at::Tensor& w) {
  using namespace glue;
  check_dtype(w, kOp, "w", {at::kFloat, at::kHalf, at::kBFloat16, at::kFloat8_e4m3fn});
  check_dim(w, kOp, "w", 2, "[N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 8 == 0, kOp,
              ": w.size(1) must be a multiple of 8 (one 2:4 metadata byte covers 8 weights along "
              "K), got ",
              K);
  const at::Tensor wc = w.contiguous();
  at::Tensor values = new_output({N, K / 2}, w.options());
  at::Tensor meta = new_output({N, K / 8}, w.options().dtype(at::kByte));
  int64_t row = 0, group = 0;
  int count = 0;
  const Status st =
      sparse24_compress_cpu(wc.data_ptr(), int(w.element_size()), N, K, K, values.data_ptr(),
                            meta.data_ptr<uint8_t>(), &row, &group, &count, torch_thread_pool());
  TORCH_CHECK(st != Status::kInvalidArgument || N * K == 0, kOp,
              ": w values must have the 2:4 pattern (at most 2 nonzeros in every 4 consecutive "
              "weights along K): row ",
              row, ", group ", group, " (columns ", 4 * group, "..", 4 * group + 3, ") has ", count,
              " nonzeros");
  check_status(st, kOp);
  return {values, meta};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // w [N, K] (float32 / float16 / bfloat16 / float8_e4m3fn, K % 8 == 0) -> values [N, K/2] in
  // w.dtype, meta uint8 [N, K/8] (bitpress/sparse24/layout.py).
  m.def("sparse24_compress(Tensor w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("sparse24_compress", &sparse24_compress_cpu_impl); }

}  // namespace bitpress
