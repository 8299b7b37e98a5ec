// CUDA fp8_quantize: the parameters and formula of the CPU kernel (bitpress/fp8/fp8_quantize.h:
// scale = max(amax / 448, kFp8MinScale) over the elements a scale covers, q = float_to_e4m3(x /
// scale), float32 division, round to nearest even, saturation to +-448, NaN kept; a NaN in x
// gives a NaN amax, hence a NaN scale and NaN codes for the elements it covers, as in the
// reference). Kernels and design notes: csrc/fp8/fp8_quantize_sm80.cu.
//
// Launches, all on `stream`, no host synchronization (CUDA-graph safe), no workspace:
//   * kRow, and kBlock with block_rows == 1 (1 x 128 activations): one warp per segment (a row,
//     or a row's block), amax by warp shuffles, then the segment's codes, in one pass over x
//     (the second read of the segment comes from L1);
//   * kBlock with block_rows > 1 (128 x 128 weights): one block of 256 threads per scale block;
//   * kTensor, static scale: one elementwise kernel; dynamic: the scale itself accumulates the
//     amax (zeroed by cudaMemsetAsync, atomicMax on the float bits of |x|: non-negative floats
//     order as their bit patterns, and NaN's patterns sort above infinity, so a NaN wins as in
//     torch.amax), a one-thread kernel turns it into the scale, then the elementwise kernel.
#pragma once

#include "bitpress/common/status.h"
#include "bitpress/fp8/fp8_quantize.h"

namespace bitpress {

// Same parameters and result as fp8_quantize_cpu; x, q and scale are device pointers. Sizes,
// strides and block sizes are checked on the host (fp8_quantize_check's rules); values are not.
// kUnsupported in a build without CUDA.
Status fp8_quantize_cuda(const Fp8QuantizeParams& p, void* stream);

}  // namespace bitpress
