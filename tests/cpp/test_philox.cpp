// Host tests of the shared RNG and float helpers of spec_verify (bitpress/common/philox.h,
// bitpress/speculative/spec_verify.h), and spec_verify_cpu through the torch-free API: Random123
// known-answer vectors, the stream layout, the uniform, exp2_neg against std::exp2, the order keys,
// a greedy verification on every ISA path, and the argument checks.
#include <bitpress/bitpress.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"

using namespace bitpress;

namespace {

struct Kat {
  uint32_t in[6];  // c0 c1 c2 c3 k0 k1
  uint32_t out[4];
};

// Random123 kat_vectors, "philox4x32 10".
const Kat kKat[] = {
    {{0, 0, 0, 0, 0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

}  // namespace

int main() {
  for (const Kat& k : kKat) {
    const Philox4x32 r = philox4x32_10(k.in[0], k.in[1], k.in[2], k.in[3], k.in[4], k.in[5]);
    for (int i = 0; i < 4; ++i)
      CHECK(r.v[i] == k.out[i], "word %d: %08x != %08x", i, r.v[i], k.out[i]);
    if (k.in[3] == 0) {  // the stream layout: key (seed lo, hi), counter (offset lo, hi, pos, 0)
      const int64_t seed = int64_t((uint64_t(k.in[5]) << 32) | k.in[4]);
      const int64_t offset = int64_t((uint64_t(k.in[1]) << 32) | k.in[0]);
      const Philox4x32 s = philox_stream(seed, offset, k.in[2]);
      for (int i = 0; i < 4; ++i) CHECK(s.v[i] == k.out[i], "stream word %d", i);
    }
  }

  CHECK(uniform_from_bits(0) == 0.0f, "u(0)");
  CHECK(uniform_from_bits(0xffffffffu) == 1.0f - std::ldexp(1.0f, -24), "u(max) < 1");
  CHECK(uniform_from_bits(0x80000000u) == 0.5f, "u(2^31)");
  CHECK(uniform_from_bits(255u) == 0.0f && uniform_from_bits(256u) == std::ldexp(1.0f, -24),
        "only the top 24 bits count");

  // exp2_neg: about 1 ulp on [-126, 0]; exact at 0 and at every integer (f = d - round(d) is
  // exact, so 2^n comes out unrounded); 0 below -126, for -inf and NaN; never subnormal.
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> unif(-126.0f, 0.0f), unit(-1.0f, 0.0f);
  double worst = 0;
  for (int i = 0; i < 1000000; ++i) {
    const float x = (i & 1) ? unif(rng) : unit(rng);
    const double want = std::exp2(double(x));
    worst = std::fmax(worst, std::fabs(spec::exp2_neg(x) - want) / want);
  }
  CHECK(worst < 2 * std::ldexp(1.0, -24), "exp2_neg relative error %g", worst);
  for (int n = 0; n <= 126; ++n) {
    CHECK(spec::exp2_neg(float(-n)) == std::ldexp(1.0f, -n), "exp2_neg(-%d)", n);
  }
  CHECK(spec::exp2_neg(-126.01f) == 0.0f && spec::exp2_neg(-INFINITY) == 0.0f &&
            spec::exp2_neg(NAN) == 0.0f,
        "exp2_neg edges");
  CHECK(spec::exp2_neg(-126.0f) >= std::ldexp(1.0f, -126) &&
            spec::exp2_neg(std::nextafter(-126.0f, 0.0f)) >= std::ldexp(1.0f, -126),
        "exp2_neg near -126 is normal");

  // Order keys: unsigned order is float order, and key_float inverts them.
  const float vals[] = {-INFINITY, -3.5f, -1e-30f, -0.0f, 0.0f, 1e-30f, 2.0f, INFINITY};
  for (int i = 0; i + 1 < 8; ++i) {
    CHECK(spec::order_key(vals[i]) < spec::order_key(vals[i + 1]), "key order %d", i);
  }
  for (float v : vals)
    CHECK(float_bits(spec::key_float(spec::order_key(v))) == float_bits(v), "inv");

  // spec_verify_cpu, greedy rows: the argmax chain, on every ISA path.
  const int64_t B = 5, K = 3, V = 37;
  std::vector<float> logits(B * (K + 1) * V);
  std::normal_distribution<float> normal;
  for (auto& v : logits) v = normal(rng);
  std::vector<int64_t> draft(B * K), num_draft = {0, 3, 1, 2, 3};
  auto argmax = [&](int64_t b, int64_t j) {
    const float* row = logits.data() + (b * (K + 1) + j) * V;
    int64_t a = 0;
    for (int64_t v = 1; v < V; ++v) a = row[v] > row[a] ? v : a;
    return a;
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < K; ++j) draft[b * K + j] = (b == 3 && j == 1) ? 0 : argmax(b, j);
  for (int isa = 0; isa <= int(best_cpu_isa()); ++isa) {
    CHECK(set_cpu_isa(CpuIsa(isa)) == Status::kSuccess, "isa %d", isa);
    std::vector<int64_t> tokens(B * (K + 1), -7), acc(B, -7), emitted(B, -7);
    SpecVerifyParams p;
    p.logits = logits.data();
    p.logits_stride_b = (K + 1) * V;
    p.logits_stride_k = V;
    p.draft_tokens = draft.data();
    p.draft_tokens_stride = K;
    p.num_draft = num_draft.data();
    p.tokens = tokens.data();
    p.tokens_stride = K + 1;
    p.num_accepted = acc.data();
    p.num_emitted = emitted.data();
    p.B = B;
    p.K = K;
    p.V = V;
    CHECK(spec_verify_cpu(p) == Status::kSuccess, "status");
    for (int64_t b = 0; b < B; ++b) {
      int64_t a = 0;
      while (a < num_draft[b] && draft[b * K + a] == argmax(b, a)) ++a;
      if (b == 3) CHECK(a == 1 || draft[b * K + 1] == argmax(b, 1), "row 3 rejects at 1");
      CHECK(acc[b] == a && emitted[b] == a + 1, "row %lld: accepted %lld, want %lld", (long long)b,
            (long long)acc[b], (long long)a);
      CHECK(tokens[b * (K + 1) + a] == argmax(b, a), "row %lld: emitted token", (long long)b);
      for (int64_t j = a + 1; j <= K; ++j) CHECK(tokens[b * (K + 1) + j] == -1, "padding");
    }

    // Values the CUDA kernel can only clamp are errors here.
    SpecVerifyParams bad = p;
    std::vector<int64_t> nd_bad = {0, 4, 1, 2, 3};
    bad.num_draft = nd_bad.data();
    CHECK(spec_verify_cpu(bad) == Status::kInvalidArgument, "num_draft > K");
    bad = p;
    std::vector<int64_t> d_bad = draft;
    d_bad[1 * K + 2] = V;
    bad.draft_tokens = d_bad.data();
    CHECK(spec_verify_cpu(bad) == Status::kInvalidArgument, "token id >= V");
    bad = p;
    std::vector<float> t_bad = {1.0f, -1.0f, 0.0f, 0.0f, 0.0f};
    bad.temperature = t_bad.data();
    CHECK(spec_verify_cpu(bad) == Status::kInvalidArgument, "negative temperature");
    bad = p;
    bad.V = 0;
    CHECK(spec_verify_cpu(bad) == Status::kInvalidArgument, "V = 0");
    bad = p;
    bad.tokens_stride = K;
    CHECK(spec_verify_cpu(bad) == Status::kInvalidArgument, "tokens stride");
  }
  reset_cpu_isa();
  return check_result("test_philox");
}
