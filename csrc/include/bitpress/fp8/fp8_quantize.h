// fp8_quantize: x (fp32 / fp16 / bf16) -> E4M3 codes and float32 scales. Torch-free CPU API.
//
// x is a matrix [R, K] (the leading dimensions of the op's x [..., K] flattened into R rows), row
// r at x + r * x_row_stride elements. Granularities:
//   kTensor : one scale, scale[0];
//   kRow    : one scale per row ("token" for activations, "channel" for a weight [N, K]),
//             scale[r * scale_row_stride];
//   kBlock  : one scale per block_rows x block_cols block, scale[(r / block_rows) *
//             scale_row_stride + k / block_cols] ([ceil(R/block_rows), ceil(K/block_cols)]).
// Dynamic (static_scale false): scale = max(amax / 448, kFp8MinScale) over the elements the scale
// covers, written to `scale`. Static: `scale` is read. Then q = float_to_e4m3(x / scale) (fp8.h:
// float32 division, round to nearest even, saturate to +-448, NaN stays NaN).
#pragma once

#include <stdint.h>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/common/status.h"

namespace bitpress {

enum class Fp8Granularity : int { kTensor = 0, kRow = 1, kBlock = 2 };

struct Fp8QuantizeParams {
  const void* x = nullptr;  // [R, K], unit stride along K
  DType x_dtype = DType::kFloat32;
  int64_t x_row_stride = 0;
  uint8_t* q = nullptr;  // [R, K] E4M3 codes
  int64_t q_row_stride = 0;
  float* scale = nullptr;  // see the granularities above
  int64_t scale_row_stride = 0;
  bool static_scale = false;
  Fp8Granularity granularity = Fp8Granularity::kRow;
  int64_t block_rows = 1, block_cols = 128;  // kBlock
  int64_t R = 0, K = 0;
};

// kInvalidArgument on a bad parameter (null pointers with work to do, strides, block sizes).
Status fp8_quantize_check(const Fp8QuantizeParams& p);
// One pass per row (kRow), per row block (kBlock), or an amax pass then a quantize pass (kTensor,
// dynamic), split over `pool`.
Status fp8_quantize_cpu(const Fp8QuantizeParams& p, const CpuThreadPool* pool);

}  // namespace bitpress
