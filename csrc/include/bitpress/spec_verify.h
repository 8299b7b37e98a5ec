// spec_verify: fused, batched verification of speculative-decoding drafts (Leviathan et al. 2023,
// "Fast inference from transformers via speculative decoding"; Chen et al. 2023, "Accelerating
// large language model decoding with speculative sampling"). The full contract is the docstring of
// bitpress.ops.spec_verify; in short, for row b with n = num_draft[b] draft tokens d[0..n):
//
//   greedy (temperature 0): accept d[j] while d[j] == argmax_v logits[b, j, v] (ties: lowest v);
//     emit the argmax at the first mismatch, or at position n when all n are accepted.
//   sampling: p_j = softmax(logits[b, j] / T) restricted by top_k / top_p and renormalized;
//     accept d[j] iff u0 * q_j(d[j]) < p_j(d[j]) (u0 from word 0 of the Philox stream at position
//     j; q one-hot at d[j] without draft_probs); at the first rejection sample from
//     max(0, p_j - q_j) (p_j when that has no mass), else sample the bonus token from p_n, by an
//     inverse CDF driven by word 1 at that position.
//
//   tokens[b] = d[0..a), then the sampled token, then -1;  num_accepted[b] = a, num_emitted = a
//   + 1.
//
// Float math shared by every backend (so that they agree bit for bit wherever the summation order
// agrees): z = float(logit) * (1 / T) with 1 / T rounded once; e = spec_exp(z - max z), a Cephes
// polynomial written with separate, individually rounded multiplies and adds (no FMA contraction;
// the torch reference and the Triton kernel spell out the same operations); p(v) = e(v) / S.
// The sums S and the CDF are order-dependent: backends that sum in another order can differ in the
// last bit of S, which changes a decision only when a uniform falls within that bit of a boundary.
#pragma once

#include <stdint.h>

#include "bitpress/cpu.h"
#include "bitpress/dtype.h"
#include "bitpress/macros.h"
#include "bitpress/philox.h"
#include "bitpress/status.h"

namespace bitpress {

struct SpecVerifyParams {
  const void* logits = nullptr;  // [B, K+1, V], unit stride along V
  DType logits_dtype = DType::kFloat32;
  int64_t logits_stride_b = 0, logits_stride_k = 0;  // in elements
  const int64_t* draft_tokens = nullptr;             // [B, K]
  int64_t draft_tokens_stride = 0;
  const int64_t* num_draft = nullptr;  // [B] in 0..K; null: every row has K
  const void* draft_probs = nullptr;   // [B, K, V], unit stride along V; null: q one-hot
  DType draft_probs_dtype = DType::kFloat32;
  int64_t draft_probs_stride_b = 0, draft_probs_stride_k = 0;
  const float* temperature = nullptr;  // [B], >= 0 (0: greedy); null: every row greedy
  const int64_t* top_k = nullptr;      // [B]; <= 0 or >= V: off; null: off
  const float* top_p = nullptr;        // [B]; outside (0, 1): off; null: off
  const int64_t* seeds = nullptr;      // [B]; null: 0
  const int64_t* offsets = nullptr;    // [B]; null: 0
  int64_t* tokens = nullptr;           // [B, K+1] out
  int64_t tokens_stride = 0;
  int64_t* num_accepted = nullptr;  // [B] out
  int64_t* num_emitted = nullptr;   // [B] out
  int64_t B = 0, K = 0, V = 0;
};

// Checks sizes, strides, dtypes and pointers (not the contents of the index tensors).
Status spec_verify_check(const SpecVerifyParams& p);

// CPU kernel, threaded over rows through `pool`. Also checks every value the CUDA kernel cannot:
// num_draft in [0, K], draft token ids in [0, V) for the real drafts, temperature >= 0 (not NaN).
Status spec_verify_cpu(const SpecVerifyParams& p, const CpuThreadPool* pool = nullptr);

// CUDA kernel on `stream` (cudaStream_t; null: the legacy default stream); device pointers. Values
// cannot be reported without a host sync, so: num_draft is clamped to [0, K]; a draft token outside
// [0, V) is rejected (never read); a negative or NaN temperature means greedy. kUnsupported in
// builds without CUDA.
Status spec_verify_cuda(const SpecVerifyParams& p, void* stream);

namespace spec {

// Individually rounded float operations: nvcc contracts a * b + c into an FMA unless told not to,
// and one fused rounding would make the GPU differ from the CPU and from the torch reference. The
// CPU kernel is compiled with fp-contract=off for the same reason.
BITPRESS_INLINE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
BITPRESS_INLINE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
BITPRESS_INLINE float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
BITPRESS_INLINE float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Constants of spec_exp (Cephes expf): exp(x) = 2^n * exp(r), n = round(x * log2 e), r = x - n ln 2
// with ln 2 split in a 9-bit head (n * kLn2Hi is exact for |n| < 2^15) and a tail.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (t + M) - M rounds t to nearest even
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;
// Below this the result would be under 2^-126 (subnormal, flushed on some GPUs): 0 instead, for
// every backend. exp(-87) = 1.6e-38 relative to the largest probability: no measurable mass.
constexpr float kExpMin = -87.0f;

// exp(x) for x <= 0 (about 2 ulp); 0 for x < -87, -inf and NaN. Only +, -, * and bit operations,
// each rounded on its own, so that every backend computes the same bits.
BITPRESS_INLINE float exp_neg(float x) {
  if (!(x >= kExpMin)) return 0.0f;
  const float n = sub(add(mul(x, kLog2e), kRoundMagic), kRoundMagic);
  const float r = sub(sub(x, mul(n, kLn2Hi)), mul(n, kLn2Lo));
  float y = add(mul(kExpP0, r), kExpP1);
  y = add(mul(y, r), kExpP2);
  y = add(mul(y, r), kExpP3);
  y = add(mul(y, r), kExpP4);
  y = add(mul(y, r), kExpP5);
  y = add(add(mul(y, mul(r, r)), r), 1.0f);
  return mul(y, bits_float(uint32_t(int32_t(n) + 127) << 23));
}

// A uint32 whose unsigned order is the order of the floats (-0 < +0; NaNs above +inf): top-k
// finds its threshold by a binary search over these keys.
BITPRESS_INLINE uint32_t order_key(float f) {
  const uint32_t u = float_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

BITPRESS_INLINE float key_float(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

}  // namespace spec

}  // namespace bitpress
