// CPU kernel of fp8_quantize (bitpress/fp8/fp8_quantize.h).
//
// One pass over x per row (kRow) or per row block (kBlock): the amax of the row / block, its
// scale, then the codes, while the row is still in L1 (rows of up to 12K float32 elements; the
// row is read twice, the second time from cache). kTensor (dynamic) needs the amax of all of x
// before any code: an amax pass (per-chunk maxima, reduced in chunk order), then the quantize
// pass. The codes are float_to_e4m3(x / scale) (fp8.h): the float32 division of the reference,
// not a multiplication by 1 / scale, which would round differently.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "bitpress/fp8/fp8.h"
#include "bitpress/fp8/fp8_quantize.h"
#include "common/isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bitpress {
namespace {

// NaN-propagating max of |v| (an amax with a NaN is NaN, as torch's amax).
inline float amax_step(float m, float v) {
  const float a = fabsf(v);
  return (a > m || a != a) ? a : m;
}

inline float scale_of(float amax) {
  float s = amax / kE4M3Max;
  return s < kFp8MinScale ? kFp8MinScale : s;  // NaN compares false: stays NaN
}

// x[i] as float for the three dtypes.
inline float load(const void* x, DType t, int64_t i) { return load_as_float(x, t, i); }

float amax_range(const void* row, DType t, int64_t k0, int64_t k1) {
  float m = 0.f;
  switch (t) {
    case DType::kFloat32: {
      const float* x = static_cast<const float*>(row);
      // Two lanes of NaN-aware maxima let the compiler vectorize the loop.
      for (int64_t k = k0; k < k1; ++k) m = amax_step(m, x[k]);
      break;
    }
    default:
      for (int64_t k = k0; k < k1; ++k) m = amax_step(m, load(row, t, k));
      break;
  }
  return m;
}

void quantize_range(const void* row, DType t, int64_t k0, int64_t k1, float scale, uint8_t* q) {
  switch (t) {
    case DType::kFloat32: {
      const float* x = static_cast<const float*>(row);
      for (int64_t k = k0; k < k1; ++k) q[k] = float_to_e4m3(x[k] / scale);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* x = static_cast<const uint16_t*>(row);
      for (int64_t k = k0; k < k1; ++k) q[k] = float_to_e4m3(bf16_bits_to_float(x[k]) / scale);
      break;
    }
    default: {
      const uint16_t* x = static_cast<const uint16_t*>(row);
      for (int64_t k = k0; k < k1; ++k) q[k] = float_to_e4m3(half_bits_to_float(x[k]) / scale);
      break;
    }
  }
}

inline const void* row_ptr(const Fp8QuantizeParams& p, int64_t r) {
  return static_cast<const char*>(p.x) + r * p.x_row_stride * dtype_size(p.x_dtype);
}

}  // namespace

Status fp8_quantize_check(const Fp8QuantizeParams& p) {
  if (!dtype_valid(p.x_dtype)) return Status::kInvalidArgument;
  if (p.R < 0 || p.K < 0) return Status::kInvalidArgument;
  if (p.granularity != Fp8Granularity::kTensor && p.granularity != Fp8Granularity::kRow &&
      p.granularity != Fp8Granularity::kBlock) {
    return Status::kInvalidArgument;
  }
  if (p.granularity == Fp8Granularity::kBlock && (p.block_rows <= 0 || p.block_cols <= 0)) {
    return Status::kInvalidArgument;
  }
  const bool work = p.R > 0 && p.K > 0;
  if (work && (!p.x || !p.q || p.x_row_stride < p.K || p.q_row_stride < p.K)) {
    return Status::kInvalidArgument;
  }
  // A dynamic scale is written even without elements (the scale of an empty set: kFp8MinScale).
  const bool has_scales = p.granularity == Fp8Granularity::kTensor ||
                          (p.granularity == Fp8Granularity::kRow && p.R > 0) || work;
  if (has_scales && !p.scale) return Status::kInvalidArgument;
  if (p.granularity == Fp8Granularity::kBlock && work &&
      p.scale_row_stride < (p.K + p.block_cols - 1) / p.block_cols) {
    return Status::kInvalidArgument;
  }
  return Status::kSuccess;
}

Status fp8_quantize_cpu(const Fp8QuantizeParams& p, const CpuThreadPool* pool) {
  const Status st = fp8_quantize_check(p);
  if (st != Status::kSuccess) return st;
  const int64_t R = p.R, K = p.K;
  const DType t = p.x_dtype;

  if (p.granularity == Fp8Granularity::kTensor) {
    if (!p.static_scale) {
      // Fixed chunks (not one per thread): the result is the same whatever the pool.
      const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K, 1));
      const int64_t n_chunks = R > 0 && K > 0 ? (R + chunk - 1) / chunk : 0;
      std::vector<float> part(size_t(std::max<int64_t>(n_chunks, 1)), 0.f);
      parallel_for(pool, 0, n_chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          float m = 0.f;
          for (int64_t r = c * chunk; r < std::min(R, (c + 1) * chunk); ++r) {
            const float rm = amax_range(row_ptr(p, r), t, 0, K);
            m = (rm > m || rm != rm) ? rm : m;
          }
          part[size_t(c)] = m;
        }
      });
      float m = 0.f;
      for (int64_t c = 0; c < n_chunks; ++c) m = (part[c] > m || part[c] != part[c]) ? part[c] : m;
      p.scale[0] = scale_of(m);
    }
    const float s = p.scale[0];
    parallel_for(pool, 0, K > 0 ? R : 0, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)),
                 [&](int64_t b, int64_t e) {
                   for (int64_t r = b; r < e; ++r) {
                     quantize_range(row_ptr(p, r), t, 0, K, s, p.q + r * p.q_row_stride);
                   }
                 });
    return Status::kSuccess;
  }

  if (p.granularity == Fp8Granularity::kRow) {
    parallel_for(pool, 0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)),
                 [&](int64_t b, int64_t e) {
                   for (int64_t r = b; r < e; ++r) {
                     float* sp = p.scale + r * p.scale_row_stride;
                     if (!p.static_scale) *sp = scale_of(amax_range(row_ptr(p, r), t, 0, K));
                     quantize_range(row_ptr(p, r), t, 0, K, *sp, p.q + r * p.q_row_stride);
                   }
                 });
    return Status::kSuccess;
  }

  // kBlock: one task per block row (block_rows rows of x, every block along K).
  if (K == 0) return Status::kSuccess;
  const int64_t bm = p.block_rows, bk = p.block_cols;
  const int64_t n_brows = (R + bm - 1) / bm, n_bcols = (K + bk - 1) / bk;
  parallel_for(pool, 0, n_brows, 1, [&](int64_t b, int64_t e) {
    for (int64_t br = b; br < e; ++br) {
      const int64_t r0 = br * bm, r1 = std::min(R, r0 + bm);
      float* srow = p.scale + br * p.scale_row_stride;
      for (int64_t bc = 0; bc < n_bcols; ++bc) {
        const int64_t k0 = bc * bk, k1 = std::min(K, k0 + bk);
        if (!p.static_scale) {
          float m = 0.f;
          for (int64_t r = r0; r < r1; ++r) {
            const float rm = amax_range(row_ptr(p, r), t, k0, k1);
            m = (rm > m || rm != rm) ? rm : m;
          }
          srow[bc] = scale_of(m);
        }
        const float s = srow[bc];
        for (int64_t r = r0; r < r1; ++r) {
          quantize_range(row_ptr(p, r), t, k0, k1, s, p.q + r * p.q_row_stride);
        }
      }
    }
  });
  return Status::kSuccess;
}

}  // namespace bitpress
