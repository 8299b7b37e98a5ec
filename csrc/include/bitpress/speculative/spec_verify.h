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
// agrees): z = float(logit) * (log2(e) / T) with log2(e) / T rounded once (base-2 units);
// e = exp2_neg(z - max z), 2^d by an exact reduction and a polynomial written with separate,
// individually rounded multiplies and adds (no FMA contraction; the torch reference and the Triton
// kernel spell out the same operations); p(v) = e(v) / S.
// The sums S and the CDF are order-dependent: backends that sum in another order can differ in the
// last bit of S, which changes a decision only when a uniform falls within that bit of a boundary.
#pragma once

#include <stdint.h>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/common/macros.h"
#include "bitpress/common/philox.h"
#include "bitpress/common/status.h"

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
  // CPU only, optional out: when the kernel reads a draft_probs value that is negative, NaN or
  // infinite (a negative q would accept every draft, a NaN reject every one), it sets this to the
  // smallest flat index (b * K + j) * V + v of such a value read and returns kInvalidArgument.
  int64_t* bad_q = nullptr;
};

// Checks sizes, strides, dtypes and pointers (not the contents of the index tensors).
Status spec_verify_check(const SpecVerifyParams& p);

// CPU kernel, threaded over rows through `pool`. Also checks every value the CUDA kernel cannot:
// num_draft in [0, K], draft token ids in [0, V) for the real drafts, temperature >= 0 (not NaN),
// and the draft_probs values it reads (q at the draft tokens of sampling rows up to the first
// rejection, and the whole row at that rejection) are finite and >= 0 (see bad_q).
Status spec_verify_cpu(const SpecVerifyParams& p, const CpuThreadPool* pool = nullptr);

// CUDA kernel on `stream` (cudaStream_t; null: the legacy default stream); device pointers. Values
// cannot be reported without a host sync, so: num_draft is clamped to [0, K]; a draft token outside
// [0, V) is rejected (never read); a negative or NaN temperature means greedy. draft_probs values
// are not checked: a negative q accepts the draft, a NaN q rejects it, and such values in the
// rejection row feed max(0, p - q) as they are (the caller's contract: q finite and >= 0).
// kUnsupported in builds without CUDA.
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

// Constants of exp2_neg. The kernels work in base 2: z = logit * (log2(e) / T) with log2(e) / T
// rounded once, so that softmax(logit / T) = 2^(z - max z) / sum and the exponential needs no
// ln 2 reduction. 2^d = 2^n * 2^f with n = round(d) (the add and subtract of 1.5 * 2^23 round to
// nearest even) and f = d - n in [-0.5, 0.5], exact (f is a multiple of ulp(d) below 2^-1 in
// magnitude, or d - n is a Sterbenz difference); 2^f by a degree-6 polynomial, coefficients fitted
// for minimax relative error and rounded to float (about 1 ulp with the roundings of the Horner
// steps).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (t + M) - M rounds t to nearest even
constexpr float kExp2C1 = 6.931471825e-01f;
constexpr float kExp2C2 = 2.402264774e-01f;
constexpr float kExp2C3 = 5.550332367e-02f;
constexpr float kExp2C4 = 9.618436918e-03f;
constexpr float kExp2C5 = 1.339887502e-03f;
constexpr float kExp2C6 = 1.535336196e-04f;
// Below this the result would be under 2^-126 (subnormal, flushed on some GPUs): 0 instead, for
// every backend. 2^-126 (e^-87.3) relative to the largest probability: no measurable mass.
constexpr float kExp2Min = -126.0f;

// 2^d for d <= 0 (about 1 ulp); 0 for d < -126, -inf and NaN. Only +, -, * and bit operations,
// each rounded on its own, so that every backend computes the same bits. For d >= -126, n >= -126
// and 2^n is a normal float; with n = -126, f >= 0 and the result stays normal.
BITPRESS_INLINE float exp2_neg(float d) {
  if (!(d >= kExp2Min)) return 0.0f;
  const float n = sub(add(d, kRoundMagic), kRoundMagic);
  const float f = sub(d, n);
  float y = add(mul(kExp2C6, f), kExp2C5);
  y = add(mul(y, f), kExp2C4);
  y = add(mul(y, f), kExp2C3);
  y = add(mul(y, f), kExp2C2);
  y = add(mul(y, f), kExp2C1);
  y = add(mul(y, f), 1.0f);
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
