// Row conversions float32 -> fp16 / bf16 for the CPU kernels, one per ISA path. All round to
// nearest even and agree bit for bit with the scalar helpers of bitpress/common/dtype.h (NaNs stay
// NaN).
#pragma once

#include <stdint.h>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"

namespace bitpress::cpu {

using ConvertFn = void (*)(const float* x, void* y, int64_t n);

// The converter for `out` (float16 / bfloat16; float32 copies) on ISA path `isa`.
ConvertFn converter(DType out, CpuIsa isa);

}  // namespace bitpress::cpu
