// The dense path of int4_gemm on the CPU and the measured choice between it and the fused kernel
// (csrc/int4/int4_gemm_dense_torch.cpp). Torch glue only.
#pragma once

#include <stdint.h>

#include <functional>
#include <string>
#include <vector>

#include "bitpress/int4/int4_gemm.h"
#include "torch/glue.h"

namespace bitpress::int4_dense {

// How int4_gemm on the CPU picks its path for exact (non-W4A8) activations:
//   kAuto  : measured per (M bucket, K, N, x dtype, CPU ISA path), see choose();
//   kFused : always the fused kernel (int4_gemm_cpu);
//   kDense : always decode + dense GEMM (from M >= 1).
// Initial value from BITPRESS_INT4_CPU_PATH=auto|fused|dense (read once; default auto).
enum class Mode : int { kAuto = 0, kFused = 1, kDense = 2 };
Mode mode();
void set_mode(Mode m);
bool mode_from_name(const char* name, Mode* m);
const char* mode_name(Mode m);

// The measured choices so far, one line per key: "M 256-511 K 4096 N 14336 bfloat16 amx: fused
// (fused 9.8 ms, dense 14.1 ms)". clear_choices() forgets them (tests, benchmarks).
std::vector<std::string> choices();
void clear_choices();

// Below this many rows the fused kernel always runs: the dense path writes 2 bytes per weight
// before its GEMM starts, several times what the fused kernel reads (0.5 byte per weight).
constexpr int64_t kMinRows = 64;

// out2d [M, N] = x2 [M, K] Wt (+ bias): Wt decoded from p's weight into this thread's reused
// workspace (x's dtype), then at::addmm / at::mm (oneDNN).
void run_dense(const Int4GemmParams& p, const at::Tensor& x2, const at::Tensor& bias,
               at::Tensor& out2d);

// True when this call should take the dense path. In kAuto, the first call of a key runs both
// paths (the dense one once untimed, then each twice, the faster run counting), records the faster
// path and leaves the chosen path's result in the output (*output_written = true); `fused` and
// `dense` write the call's output.
bool choose(const Int4GemmParams& p, at::ScalarType x_dtype, const std::function<void()>& fused,
            const std::function<void()>& dense, bool* output_written);

}  // namespace bitpress::int4_dense
