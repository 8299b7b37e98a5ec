// Torch glue of spec_verify: checks, then the CPU or CUDA kernel.
#include <ATen/ops/empty.h>

#include <tuple>

#include "bitpress/speculative/spec_verify.h"
#include "torch/glue.h"

#if defined(BITPRESS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace bitpress {
namespace {

constexpr const char* kOp = "spec_verify";

using OptT = std::optional<at::Tensor>;

// target_logits [B, K+1, V] fp32/fp16/bf16; draft_tokens [B, K] int32/int64; num_draft [B]
// int32/int64; draft_probs [B, K, V] fp32/fp16/bf16; temperature [B] float32; top_k [B]
// int32/int64; top_p [B] float32; seeds, offsets [B] int64. Returns tokens [B, K+1],
// num_accepted [B], num_emitted [B], all int64.
struct Prepared {
  at::Tensor logits, draft_tokens, num_draft, draft_probs, temperature, top_k, top_p, seeds,
      offsets, tokens, num_accepted, num_emitted;
  SpecVerifyParams p;
};

// Unit stride along V (what the kernels read); other strides are taken as they are.
at::Tensor unit_last(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

at::Tensor per_row(const OptT& t, const char* name, std::initializer_list<at::ScalarType> dtypes,
                   at::ScalarType as, int64_t B, const at::Tensor& ref) {
  if (!t) return at::Tensor();
  glue::check_dtype(*t, kOp, name, dtypes);
  glue::check_dim(*t, kOp, name, 1, "[B]");
  glue::check_size(*t, kOp, name, 0, B, "B = target_logits.size(0)");
  glue::check_same_device(*t, ref, kOp, name, "target_logits");
  return t->to(as).contiguous();
}

Prepared prepare(const at::Tensor& logits_in, const at::Tensor& draft_tokens_in,
                 const OptT& num_draft_in, const OptT& draft_probs_in, const OptT& temperature_in,
                 const OptT& top_k_in, const OptT& top_p_in, const OptT& seeds_in,
                 const OptT& offsets_in) {
  using namespace glue;
  check_dtype(logits_in, kOp, "target_logits", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(logits_in, kOp, "target_logits", 3, "[B, K+1, V]");
  const int64_t B = logits_in.size(0), K = logits_in.size(1) - 1, V = logits_in.size(2);
  TORCH_CHECK(K >= 0 && V >= 1, kOp,
              ": target_logits must have at least one position (K+1 >= 1) and one token "
              "(V >= 1), got shape ",
              logits_in.sizes());
  TORCH_CHECK(V < (int64_t(1) << 31), kOp, ": target_logits.size(2) (V) must be below 2^31, got ",
              V);
  check_dtype(draft_tokens_in, kOp, "draft_tokens", {at::kInt, at::kLong});
  check_dim(draft_tokens_in, kOp, "draft_tokens", 2, "[B, K]");
  check_size(draft_tokens_in, kOp, "draft_tokens", 0, B, "B = target_logits.size(0)");
  check_size(draft_tokens_in, kOp, "draft_tokens", 1, K, "K = target_logits.size(1) - 1");
  check_same_device(draft_tokens_in, logits_in, kOp, "draft_tokens", "target_logits");
  Prepared r;
  r.num_draft = per_row(num_draft_in, "num_draft", {at::kInt, at::kLong}, at::kLong, B, logits_in);
  if (draft_probs_in) {
    const at::Tensor& q = *draft_probs_in;
    check_dtype(q, kOp, "draft_probs", {at::kFloat, at::kHalf, at::kBFloat16});
    check_dim(q, kOp, "draft_probs", 3, "[B, K, V]");
    check_size(q, kOp, "draft_probs", 0, B, "B = target_logits.size(0)");
    check_size(q, kOp, "draft_probs", 1, K, "K = target_logits.size(1) - 1");
    check_size(q, kOp, "draft_probs", 2, V, "V = target_logits.size(2)");
    check_same_device(q, logits_in, kOp, "draft_probs", "target_logits");
    r.draft_probs = unit_last(q);
  }
  r.temperature = per_row(temperature_in, "temperature", {at::kFloat}, at::kFloat, B, logits_in);
  r.top_k = per_row(top_k_in, "top_k", {at::kInt, at::kLong}, at::kLong, B, logits_in);
  r.top_p = per_row(top_p_in, "top_p", {at::kFloat}, at::kFloat, B, logits_in);
  r.seeds = per_row(seeds_in, "seeds", {at::kLong}, at::kLong, B, logits_in);
  r.offsets = per_row(offsets_in, "offsets", {at::kLong}, at::kLong, B, logits_in);
  r.draft_tokens = draft_tokens_in.to(at::kLong).contiguous();
  r.logits = unit_last(logits_in);

  // Values: checked here on the CPU (on CUDA it would cost a host sync; the kernel clamps).
  if (logits_in.is_cpu()) {
    const int64_t* nd = r.num_draft.defined() ? r.num_draft.data_ptr<int64_t>() : nullptr;
    const int64_t* dt = r.draft_tokens.data_ptr<int64_t>();
    const float* tp = r.temperature.defined() ? r.temperature.data_ptr<float>() : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = nd ? nd[b] : K;
      TORCH_CHECK(n >= 0 && n <= K, kOp, ": num_draft values must lie in [0, K] (K = ", K,
                  "), got num_draft[", b, "] = ", n);
      for (int64_t j = 0; j < n; ++j) {
        TORCH_CHECK(dt[b * K + j] >= 0 && dt[b * K + j] < V, kOp,
                    ": draft_tokens values must lie in [0, V) (V = ", V, "), got draft_tokens[", b,
                    ", ", j, "] = ", dt[b * K + j]);
      }
      TORCH_CHECK(!tp || tp[b] >= 0.0f, kOp,
                  ": temperature values must be >= 0 (0: greedy), got temperature[", b,
                  "] = ", tp ? tp[b] : 0.0f);
    }
  }

  const auto opts = logits_in.options().dtype(at::kLong);
  r.tokens = new_output({B, K + 1}, opts);
  r.num_accepted = new_output({B}, opts);
  r.num_emitted = new_output({B}, opts);

  SpecVerifyParams& p = r.p;
  p.logits = r.logits.data_ptr();
  p.logits_dtype = to_dtype(r.logits.scalar_type());
  p.logits_stride_b = r.logits.stride(0);
  p.logits_stride_k = r.logits.stride(1);
  p.draft_tokens = r.draft_tokens.data_ptr<int64_t>();
  p.draft_tokens_stride = K;
  if (r.num_draft.defined()) p.num_draft = r.num_draft.data_ptr<int64_t>();
  if (r.draft_probs.defined()) {
    p.draft_probs = r.draft_probs.data_ptr();
    p.draft_probs_dtype = to_dtype(r.draft_probs.scalar_type());
    p.draft_probs_stride_b = r.draft_probs.stride(0);
    p.draft_probs_stride_k = r.draft_probs.stride(1);
  }
  if (r.temperature.defined()) p.temperature = r.temperature.data_ptr<float>();
  if (r.top_k.defined()) p.top_k = r.top_k.data_ptr<int64_t>();
  if (r.top_p.defined()) p.top_p = r.top_p.data_ptr<float>();
  if (r.seeds.defined()) p.seeds = r.seeds.data_ptr<int64_t>();
  if (r.offsets.defined()) p.offsets = r.offsets.data_ptr<int64_t>();
  p.tokens = r.tokens.data_ptr<int64_t>();
  p.tokens_stride = K + 1;
  p.num_accepted = r.num_accepted.data_ptr<int64_t>();
  p.num_emitted = r.num_emitted.data_ptr<int64_t>();
  p.B = B;
  p.K = K;
  p.V = V;
  return r;
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Result spec_verify_cpu_impl(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                            const OptT& num_draft, const OptT& draft_probs, const OptT& temperature,
                            const OptT& top_k, const OptT& top_p, const OptT& seeds,
                            const OptT& offsets) {
  Prepared r = prepare(target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k,
                       top_p, seeds, offsets);
  int64_t bad_q = -1;
  r.p.bad_q = &bad_q;
  const Status st = spec_verify_cpu(r.p, glue::torch_thread_pool());
  if (bad_q >= 0) {
    const int64_t K = r.p.K, V = r.p.V, v = bad_q % V, j = bad_q / V % K, b = bad_q / V / K;
    const at::Tensor q = r.draft_probs.select(0, b).select(0, j).select(0, v);
    TORCH_CHECK(false, kOp, ": draft_probs values must be finite and >= 0, got draft_probs[", b,
                ", ", j, ", ", v, "] = ", q.item<float>());
  }
  glue::check_status(st, kOp);
  return {r.tokens, r.num_accepted, r.num_emitted};
}

#if defined(BITPRESS_WITH_CUDA)
Result spec_verify_cuda_impl(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                             const OptT& num_draft, const OptT& draft_probs,
                             const OptT& temperature, const OptT& top_k, const OptT& top_p,
                             const OptT& seeds, const OptT& offsets) {
  const c10::cuda::CUDAGuard guard(target_logits.device());
  Prepared r = prepare(target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k,
                       top_p, seeds, offsets);
  glue::check_status(
      spec_verify_cuda(r.p,
                       c10::cuda::getCurrentCUDAStream(target_logits.device().index()).stream()),
      kOp);
  return {r.tokens, r.num_accepted, r.num_emitted};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // target_logits [B, K+1, V], draft_tokens [B, K]; the rest [B] (draft_probs [B, K, V]).
  // Returns (tokens [B, K+1], num_accepted [B], num_emitted [B]), int64. See bitpress.ops.
  m.def(
      "spec_verify(Tensor target_logits, Tensor draft_tokens, Tensor? num_draft=None, "
      "Tensor? draft_probs=None, Tensor? temperature=None, Tensor? top_k=None, "
      "Tensor? top_p=None, Tensor? seeds=None, Tensor? offsets=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("spec_verify", &spec_verify_cpu_impl); }

#if defined(BITPRESS_WITH_CUDA)
TORCH_LIBRARY_IMPL(bitpress, CUDA, m) { m.impl("spec_verify", &spec_verify_cuda_impl); }
#endif

}  // namespace bitpress
