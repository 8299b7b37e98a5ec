// Torch glue of fp8_weight_gemm (W8A16) on the CPU: the schema, the checks (fp8_args.h), the CPU
// kernel, and a dense path for many rows of bf16 x with its measured choice.
//
// The dense path (bf16 x, per-tensor or per-channel scales, M >= kDenseMinRows): W decoded once,
// exactly, from E4M3 to bf16 into the calling thread's reused workspace [N, K], then at::mm
// (oneDNN: AMX tiles on Intel Xeons, AVX512-BF16 elsewhere, blocked for large M), then the scales
// and the bias in float32 over the output. At large M both paths are compute-bound and oneDNN's
// blocking can beat the fused engine's microkernel calls, by an amount that depends on the CPU, so
// each process measures it as int4_gemm does (csrc/int4/int4_gemm_dense_torch.cpp): the first call
// of a key (M bucket [2^b, 2^(b+1)), K, N, active CPU ISA path) runs the dense path once untimed
// (its workspace's first-touch faults), then both paths twice, alternating, and that key takes the
// faster from then on (dense must win by 3%: it holds a K x N bf16 workspace). Numerics: at::mm
// rounds its float32 sums to bf16 before the scale, so the dense output is
// bf16(bf16(sum) * s + bias), within one more bf16 rounding of the fused path's bf16(sum * s +
// bias). Block scales change along K and stay on the fused path. BITPRESS_FP8_CPU_PATH=auto|fused|
// dense (read once) forces a path.
#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <tuple>

#include "bitpress/common/dtype.h"
#include "bitpress/fp8/fp8_gemm.h"
#include "common/isa.h"
#include "fp8_args.h"
#include "fp8_gemm_engine.h"
#include "torch/glue.h"

namespace bitpress {
namespace {

constexpr int64_t kDenseMinRows = 128;

enum class Path { kAuto, kFused, kDense };

Path path_mode() {
  static const Path m = [] {
    const char* env = getenv("BITPRESS_FP8_CPU_PATH");
    if (env && !strcmp(env, "fused")) return Path::kFused;
    if (env && !strcmp(env, "dense")) return Path::kDense;
    return Path::kAuto;
  }();
  return m;
}

struct Key {
  int bucket;
  int64_t K, N;
  int isa;
  bool operator<(const Key& o) const {
    return std::tie(bucket, K, N, isa) < std::tie(o.bucket, o.K, o.N, o.isa);
  }
};

std::mutex& table_mutex() {
  static std::mutex m;
  return m;
}
std::map<Key, bool>& table() {
  static std::map<Key, bool> t;
  return t;
}

int bucket_of(int64_t M) {
  int b = 0;
  while ((int64_t(2) << b) <= M) ++b;
  return b;  // 2^b <= M < 2^(b+1)
}

double time_ms(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// The calling thread's bf16 workspace, grown when a call needs more, then reused (steady-state
// calls neither allocate nor fault pages).
// numel 0 frees it.
at::Tensor& workspace(int64_t numel) {
  thread_local at::Tensor ws;
  if (numel == 0) ws = at::Tensor();
  if (numel > 0 && (!ws.defined() || ws.numel() < numel)) {
    ws = at::Tensor();  // free the old one before allocating the larger
    ws = at::empty({numel}, at::TensorOptions().dtype(at::kBFloat16));
  }
  return ws;
}

bool dense_eligible(const Fp8WeightGemmParams& p) {
  return p.x_dtype == DType::kBFloat16 && p.M >= 1 && p.K >= 1 && p.N >= 1 &&
         (p.w_scale.layout == Fp8ScaleLayout::kTensor || p.w_scale.layout == Fp8ScaleLayout::kRow);
}

// out [M, N] bf16 = x [M, K] · decode(w)ᵀ, then * scale[n] + bias[n] in float32, rounded once more.
// (W decoded whole, then one at::mm: in chunks of rows that stay in cache, oneDNN's per-call cost
// made it 4x slower at M = 512 on the AMX Xeon.)
void run_dense(const glue::Fp8WeightGemmPrepared& r) {
  const Fp8WeightGemmParams& p = r.p;
  const int64_t M = p.M, N = p.N, K = p.K;
  at::Tensor& ws = workspace(N * K);
  uint16_t* wd = reinterpret_cast<uint16_t*>(ws.data_ptr());
  const Fp8CpuOptions::Decode decode = fp8_cpu_default_options().decode;
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) fp8_cpu::decode_bf16(p.w + n * p.ldw, wd + n * K, K, decode);
  });
  at::Tensor out2d = r.out.view({M, N});
  at::mm_out(out2d, r.x, ws.narrow(0, 0, N * K).view({N, K}).t());
  uint16_t* o = reinterpret_cast<uint16_t*>(out2d.data_ptr());
  const float* s = p.w_scale.data;
  const bool per_row = p.w_scale.layout == Fp8ScaleLayout::kRow;
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      uint16_t* row = o + m * N;
      for (int64_t n = 0; n < N; ++n) {
        float v = bf16_bits_to_float(row[n]) * (per_row ? s[n * p.w_scale.row_stride] : s[0]);
        if (p.bias) v += load_as_float(p.bias, p.bias_dtype, n);
        row[n] = float_to_bf16_bits(v);
      }
    }
  });
}

void run_fused(const glue::Fp8WeightGemmPrepared& r) {
  glue::check_status(fp8_weight_gemm_cpu(r.p, glue::torch_thread_pool()), "fp8_weight_gemm");
}

// Whether this call takes the dense path; *written: the output was already written (first call of
// a key, by the chosen path, as every later call of the key would).
bool choose_dense(const glue::Fp8WeightGemmPrepared& r, bool* written) {
  *written = false;
  const Fp8WeightGemmParams& p = r.p;
  if (!dense_eligible(p) || !r.out.is_contiguous()) return false;
  const Path mode = path_mode();
  if (mode != Path::kAuto) return mode == Path::kDense;
  if (p.M < kDenseMinRows) return false;
  const Key key{bucket_of(p.M), p.K, p.N, int(active_cpu_isa())};
  {
    std::lock_guard<std::mutex> lock(table_mutex());
    const auto it = table().find(key);
    if (it != table().end()) return it->second;
  }
  run_dense(r);
  double dense_ms = 1e300, fused_ms = 1e300;
  for (int round = 0; round < 2; ++round) {
    dense_ms = std::min(dense_ms, time_ms([&] { run_dense(r); }));
    fused_ms = std::min(fused_ms, time_ms([&] { run_fused(r); }));
  }
  const bool dense = dense_ms < 0.97 * fused_ms;
  if (dense) {
    run_dense(r);
  } else {
    workspace(0);  // the fused path won: do not hold K x N bf16 for nothing
  }
  *written = true;
  std::lock_guard<std::mutex> lock(table_mutex());
  table().emplace(key, dense);
  return dense;
}

// x [..., K] fp32/fp16/bf16; w [N, K] float8_e4m3fn; w_scale float32: a single value, [N, 1] (per
// channel) or [ceil(N/128), ceil(K/128)] (128 x 128 blocks); bias [N] or None. Returns [..., N]
// in x.dtype.
at::Tensor fp8_weight_gemm_cpu_impl(const at::Tensor& x, const at::Tensor& w,
                                    const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& bias) {
  glue::Fp8WeightGemmPrepared r = glue::prepare_fp8_weight_gemm(x, w, w_scale, bias);
  bool written = false;
  const bool dense = choose_dense(r, &written);
  if (!written) {
    if (dense) {
      run_dense(r);
    } else {
      run_fused(r);
    }
  }
  return r.out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitpress, m) {
  // y = x (w * w_scale)^T + bias, float32 accumulation; see bitpress.ops.fp8_weight_gemm.
  m.def("fp8_weight_gemm(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitpress, CPU, m) { m.impl("fp8_weight_gemm", &fp8_weight_gemm_cpu_impl); }

}  // namespace bitpress
