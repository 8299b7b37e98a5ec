// CUDA kernel of spec_verify (contract in bitpress/speculative/spec_verify.h and
// bitpress.ops.spec_verify).
//
// One block of kThreads per row; the row walks its positions in order and stops at the first
// rejection. Every pass over a position's V logits is a block-strided loop (thread t reads
// v = t, t + kThreads, ...: coalesced, any V, no padded whole-row loads) followed by a block
// reduction (warp shuffles, then one value per warp through shared memory):
//   greedy:   (max, lowest index) reduction of the raw logits;
//   sampling: per-thread online softmax (running max and rescaled sum), merged across the block;
//             thread 0 then does the accept test with the shared Philox and exp helpers.
// The token sampled at the deciding position takes two more passes over that row (the total of the
// weights, then a tile-by-tile block scan that stops at the tile holding the target), and top_k /
// top_p rows take extra passes for their binary searches (32 counting passes, ~30 masked sums).
// The float math is the shared helpers of bitpress/speculative/spec_verify.h (__fmul_rn /
// __fadd_rn: no FMA contraction), so only the summation order differs from the CPU kernel.
#include <cuda_runtime.h>

#include "bitpress/cuda/primitives.cuh"
#include "bitpress/speculative/spec_verify.h"

namespace bitpress {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr float kInf = __builtin_huge_valf();

template <DType T>
__device__ __forceinline__ float load_logit(const void* row, int64_t v) {
  if constexpr (T == DType::kFloat32) {
    return __ldg(static_cast<const float*>(row) + v);
  } else if constexpr (T == DType::kBFloat16) {
    return bf16_bits_to_float(__ldg(static_cast<const uint16_t*>(row) + v));
  } else {
    return half_bits_to_float(__ldg(static_cast<const uint16_t*>(row) + v));
  }
}

__device__ __forceinline__ float load_q(const void* row, DType t, int64_t v) {
  if (t == DType::kFloat32) return __ldg(static_cast<const float*>(row) + v);
  const uint16_t h = __ldg(static_cast<const uint16_t*>(row) + v);
  return t == DType::kBFloat16 ? bf16_bits_to_float(h) : half_bits_to_float(h);
}

struct SharedScratch {
  float f[kWarps];
  float g[kWarps];
  long long i[kWarps];
  float bf[4];
  long long bi[4];
};

// Block-wide reductions; every thread gets the result. The scratch is reused, hence the barriers
// on both sides.
__device__ float block_sum(float v, SharedScratch& sh) {
  for (int o = 16; o > 0; o >>= 1) v = spec::add(v, __shfl_down_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) sh.f[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sh.f[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v = spec::add(v, __shfl_down_sync(0xffffffffu, v, o));
    if (lane == 0) sh.bf[0] = v;
  }
  __syncthreads();
  return sh.bf[0];
}

__device__ long long block_count(long long v, SharedScratch& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) sh.i[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sh.i[lane] : 0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) sh.bi[0] = v;
  }
  __syncthreads();
  return sh.bi[0];
}

// (max, lowest index of the max); idx = V (none) loses every comparison.
__device__ __forceinline__ void argmax_merge(float& m, long long& i, float m2, long long i2) {
  if (m2 > m || (m2 == m && i2 < i)) {  // NaN never wins: logits must not be NaN
    m = m2;
    i = i2;
  }
}

__device__ long long block_argmax(float m, long long i, SharedScratch& sh) {
  for (int o = 16; o > 0; o >>= 1) {
    argmax_merge(m, i, __shfl_down_sync(0xffffffffu, m, o), __shfl_down_sync(0xffffffffu, i, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    sh.f[warp] = m;
    sh.i[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? sh.f[lane] : -kInf;
    i = lane < kWarps ? sh.i[lane] : 0x7fffffffffffffffLL;
    for (int o = 16; o > 0; o >>= 1) {
      argmax_merge(m, i, __shfl_down_sync(0xffffffffu, m, o), __shfl_down_sync(0xffffffffu, i, o));
    }
    if (lane == 0) sh.bi[0] = i;
  }
  __syncthreads();
  return sh.bi[0];
}

// Online-softmax merge of (m, S) pairs in base 2: S = S1 2^(m1 - m) + S2 2^(m2 - m).
__device__ __forceinline__ void softmax_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  s = spec::add(spec::mul(s, spec::exp2_neg(spec::sub(m, mm))),
                spec::mul(s2, spec::exp2_neg(spec::sub(m2, mm))));
  m = mm;
}

__device__ void block_softmax(float& m, float& s, SharedScratch& sh) {
  for (int o = 16; o > 0; o >>= 1) {
    softmax_merge(m, s, __shfl_down_sync(0xffffffffu, m, o), __shfl_down_sync(0xffffffffu, s, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    sh.f[warp] = m;
    sh.g[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? sh.f[lane] : -kInf;
    s = lane < kWarps ? sh.g[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
      softmax_merge(m, s, __shfl_down_sync(0xffffffffu, m, o), __shfl_down_sync(0xffffffffu, s, o));
    }
    if (lane == 0) {
      sh.bf[0] = m;
      sh.bf[1] = s;
    }
  }
  __syncthreads();
  m = sh.bf[0];
  s = sh.bf[1];
}

// Inclusive scan of one value per thread in thread order; returns the tile total in `total`.
__device__ float block_inclusive_scan(float v, float& total, SharedScratch& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v = spec::add(n, v);
  }
  __syncthreads();
  if (lane == 31) sh.f[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kWarps ? sh.f[lane] : 0.0f;
    for (int o = 1; o < 32; o <<= 1) {
      const float n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w = spec::add(n, w);
    }
    if (lane < kWarps) sh.g[lane] = w;  // inclusive prefix over warps
  }
  __syncthreads();
  total = sh.g[kWarps - 1];
  return warp > 0 ? spec::add(sh.g[warp - 1], v) : v;
}

struct Filter {
  float m, S, zthr, etau;
};

template <DType T>
struct Row {
  const SpecVerifyParams& p;
  SharedScratch& sh;
  const void* row;
  float scale;

  __device__ float z(int64_t v) const { return spec::mul(load_logit<T>(row, v), scale); }

  __device__ long long argmax() const {
    float m = -kInf;
    long long i = 0x7fffffffffffffffLL;
    for (int64_t v = threadIdx.x; v < p.V; v += kThreads)
      argmax_merge(m, i, load_logit<T>(row, v), v);
    return block_argmax(m, i, sh);
  }

  __device__ Filter stats(int64_t k, float top_p) const {
    Filter f{-kInf, 0.0f, -kInf, 0.0f};
    float m = -kInf, s = 0.0f;
    for (int64_t v = threadIdx.x; v < p.V; v += kThreads) {
      const float zv = z(v);
      if (zv > m) {
        s = spec::mul(s, spec::exp2_neg(spec::sub(m, zv)));
        m = zv;
      }
      s = spec::add(s, spec::exp2_neg(spec::sub(zv, m)));
    }
    block_softmax(m, s, sh);
    f.m = m;
    f.S = s;
    const bool use_k = k > 0 && k < p.V, use_p = top_p > 0.0f && top_p < 1.0f;
    if (!use_k && !use_p) return f;
    if (use_k) {  // largest key t with #{key(z) >= t} >= k
      unsigned long long lo = 0, hi = 1ull << 32;
      while (hi - lo > 1) {
        const unsigned long long mid = (lo + hi) / 2;
        long long c = 0;
        for (int64_t v = threadIdx.x; v < p.V; v += kThreads) c += spec::order_key(z(v)) >= mid;
        if (block_count(c, sh) >= k) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      f.zthr = spec::key_float(uint32_t(lo));
    }
    float a = 0.0f;
    for (int64_t v = threadIdx.x; v < p.V; v += kThreads) {
      const float zv = z(v);
      a = spec::add(a, zv >= f.zthr ? spec::exp2_neg(spec::sub(zv, f.m)) : 0.0f);
    }
    f.S = block_sum(a, sh);
    if (use_p) {
      const float target = spec::mul(top_p, f.S);
      uint32_t lo = 0, hi = 0x3f800001u;
      float mass_lo = f.S;
      while (hi - lo > 1) {
        const uint32_t mid = lo + (hi - lo) / 2;
        const float tau = bits_float(mid);
        float s2 = 0.0f;
        for (int64_t v = threadIdx.x; v < p.V; v += kThreads) {
          const float zv = z(v);
          const float e = zv >= f.zthr ? spec::exp2_neg(spec::sub(zv, f.m)) : 0.0f;
          s2 = spec::add(s2, e >= tau ? e : 0.0f);
        }
        const float mass = block_sum(s2, sh);
        if (mass >= target) {
          lo = mid;
          mass_lo = mass;
        } else {
          hi = mid;
        }
      }
      f.etau = bits_float(lo);
      f.S = mass_lo;
    }
    return f;
  }

  __device__ float prob(float zv, const Filter& f) const {
    const float e = spec::exp2_neg(spec::sub(zv, f.m));
    return zv >= f.zthr && e >= f.etau ? spec::div(e, f.S) : 0.0f;
  }

  // w(v) = max(0, p(v) - q(v)); one_hot: q is 1 there (w = 0) and 0 elsewhere.
  __device__ float weight(int64_t v, const Filter& f, const void* qrow, int64_t one_hot) const {
    const float pv = prob(z(v), f);
    const float d = qrow ? spec::sub(pv, load_q(qrow, p.draft_probs_dtype, v)) : pv;
    return v == one_hot || !(d > 0.0f) ? 0.0f : d;
  }

  // Inverse CDF: the first v whose running sum exceeds u * W, else the last v with positive
  // weight; -1 if every weight is 0.
  __device__ long long sample(const Filter& f, const void* qrow, int64_t one_hot, float u) const {
    float a = 0.0f;
    for (int64_t v = threadIdx.x; v < p.V; v += kThreads)
      a = spec::add(a, weight(v, f, qrow, one_hot));
    const float total = block_sum(a, sh);
    if (!(total > 0.0f)) return -1;
    const float t = spec::mul(u, total);
    float carry = 0.0f;
    long long last = -1;
    for (int64_t t0 = 0; t0 < p.V; t0 += kThreads) {
      const int64_t v = t0 + threadIdx.x;
      const float w = v < p.V ? weight(v, f, qrow, one_hot) : 0.0f;
      float tile = 0.0f;
      const float run = spec::add(carry, block_inclusive_scan(w, tile, sh));
      const bool cand = w > 0.0f && run > t;
      if (block_count(cand ? 1 : 0, sh) > 0) {  // first candidate: thread order is index order
        return block_argmax(cand ? 0.0f : -kInf, cand ? (long long)v : 0x7fffffffffffffffLL, sh);
      }
      if (block_count(w > 0.0f ? 1 : 0, sh) > 0) {  // last positive weight: lowest of -v
        last = -block_argmax(w > 0.0f ? 0.0f : -kInf,
                             w > 0.0f ? -(long long)v : 0x7fffffffffffffffLL, sh);
      }
      carry = spec::add(carry, tile);
    }
    return last;
  }
};

template <DType T>
__global__ void __launch_bounds__(kThreads) spec_verify_kernel(const SpecVerifyParams p) {
  __shared__ SharedScratch sh;
  __shared__ int decision;
  const int64_t b = blockIdx.x;
  int64_t n = p.num_draft ? p.num_draft[b] : p.K;
  n = n < 0 ? 0 : (n > p.K ? p.K : n);  // no host sync to report it: clamp, never read past K
  const float temp = p.temperature ? p.temperature[b] : 0.0f;
  const bool greedy_row = !(temp > 0.0f);
  const float scale = greedy_row ? 1.0f : spec::div(spec::kLog2e, temp);  // log2(e) / T
  const int64_t k = p.top_k ? p.top_k[b] : 0;
  const float top_p = p.top_p ? p.top_p[b] : 1.0f;
  const int64_t seed = p.seeds ? p.seeds[b] : 0, offset = p.offsets ? p.offsets[b] : 0;
  const int64_t* d = p.draft_tokens + b * p.draft_tokens_stride;

  int64_t a = 0;
  long long token = -1;
  for (int64_t j = 0; j <= n; ++j) {
    const void* row = static_cast<const char*>(p.logits) +
                      (b * p.logits_stride_b + j * p.logits_stride_k) * dtype_size(T);
    const Row<T> r{p, sh, row, scale};
    const bool is_draft = j < n;
    const int64_t x = is_draft ? d[j] : -1;
    const bool x_ok = x >= 0 && x < p.V;  // an id outside the vocabulary is rejected, never read
    Filter f{0.0f, 0.0f, -kInf, 0.0f};
    bool greedy = greedy_row;
    if (!greedy) {
      f = r.stats(k, top_p);
      greedy = !(f.S > 0.0f);
    }
    if (greedy) {
      const long long am = r.argmax();
      if (is_draft && x == am) {
        ++a;
        continue;
      }
      token = am;
      break;
    }
    const Philox4x32 rnd = philox_stream(seed, offset, uint32_t(j));
    const void* qrow = is_draft && p.draft_probs
                           ? static_cast<const char*>(p.draft_probs) +
                                 (b * p.draft_probs_stride_b + j * p.draft_probs_stride_k) *
                                     dtype_size(p.draft_probs_dtype)
                           : nullptr;
    if (is_draft) {
      if (threadIdx.x == 0) {
        bool acc = false;
        if (x_ok) {
          const float px = r.prob(r.z(x), f);
          const float qx = qrow ? load_q(qrow, p.draft_probs_dtype, x) : 1.0f;
          acc = spec::mul(uniform_from_bits(rnd.v[0]), qx) < px;
        }
        decision = acc;
      }
      __syncthreads();
      const bool acc = decision;
      __syncthreads();
      if (acc) {
        ++a;
        continue;
      }
    }
    const float u = uniform_from_bits(rnd.v[1]);
    token = r.sample(f, qrow, is_draft && !qrow ? x : -1, u);
    if (token < 0) token = r.sample(f, nullptr, -1, u);
    break;
  }
  int64_t* out = p.tokens + b * p.tokens_stride;
  for (int64_t j = threadIdx.x; j <= p.K; j += kThreads) {
    out[j] = j < a ? d[j] : (j == a ? token : -1);
  }
  if (threadIdx.x == 0) {
    p.num_accepted[b] = a;
    p.num_emitted[b] = a + 1;
  }
}

}  // namespace

Status spec_verify_cuda(const SpecVerifyParams& p, void* stream) {
  const Status s = spec_verify_check(p);
  if (s != Status::kSuccess || p.B == 0) return s;
  if (p.B > 0x7fffffff) return Status::kInvalidArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const dim3 grid(unsigned(p.B));
  switch (p.logits_dtype) {
    case DType::kFloat32:
      spec_verify_kernel<DType::kFloat32><<<grid, kThreads, 0, st>>>(p);
      return cuda_launch_status();
    case DType::kFloat16:
      spec_verify_kernel<DType::kFloat16><<<grid, kThreads, 0, st>>>(p);
      return cuda_launch_status();
    case DType::kBFloat16:
      spec_verify_kernel<DType::kBFloat16><<<grid, kThreads, 0, st>>>(p);
      return cuda_launch_status();
    default:
      break;
  }
  return Status::kInvalidArgument;  // rejected by spec_verify_check
}

}  // namespace bitpress
