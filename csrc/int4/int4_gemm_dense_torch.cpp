// The dense path of int4_gemm on the CPU (decode once into a reused workspace, then the dense GEMM)
// and the measured choice between it and the fused kernel.
//
// Why measured: at large M both paths are compute-bound, and which one wins depends on the CPU.
// The fused kernel's products are exact (bf16 x small integers) and it reads 0.5 byte per weight,
// but it folds each group's partial sums into the output (a float32 pass per 128 rows of K). The
// dense path writes and re-reads 2 bytes per weight (bf16) before oneDNN's GEMM, which runs on AMX
// tiles on Intel Xeons and on AVX-512 elsewhere and is well blocked for large M. The crossover in M
// differs between an AMX Xeon and a Zen 5 (bench/NOTES.md, "int4_gemm: fused or dense"), so each
// process measures it on its own CPU: the first call of a key (M bucket = [2^b, 2^(b+1)), K, N, x
// dtype, active CPU ISA path) with M >= kMinRows runs the dense path once untimed, then both paths
// twice, alternating, and later calls of that key take the faster one. The dense path must win by
// 3% to be chosen, since it holds a K x N workspace. Its weights are rounded once to x's dtype ((q
// - z) s in float32, then bf16/fp16; exact for fp32 x), which is the only numerical difference from
// the fused path. On AMX with bf16 x the dense path needs no workspace: int4_gemm_cpu_dequant_amx
// decodes the same bf16 weights per 256-long K chunk of 4 tiles and multiplies them on the tiles
// at once, with no per-group fold (bench/NOTES.md, "int4_gemm: dequantized panels on AMX"): at
// M = 512 it ran 10-15% faster than the fused kernel and 1.3-1.5x faster than decode + oneDNN.
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <tuple>

#include "int4_gemm_dense.h"

namespace bitpress::int4_dense {
namespace {

std::atomic<int>& mode_ref() {
  static std::atomic<int> m{[] {
    Mode v = Mode::kAuto;
    const char* env = getenv("BITPRESS_INT4_CPU_PATH");
    if (env && *env) mode_from_name(env, &v);  // an unknown name leaves auto
    return int(v);
  }()};
  return m;
}

struct Key {
  int bucket;
  int64_t K, N;
  int dtype, isa;
  bool operator<(const Key& o) const {
    return std::tie(bucket, K, N, dtype, isa) < std::tie(o.bucket, o.K, o.N, o.dtype, o.isa);
  }
};
struct Choice {
  bool dense;
  double fused_ms, dense_ms;
};

std::mutex& table_mutex() {
  static std::mutex m;
  return m;
}
std::map<Key, Choice>& table() {
  static std::map<Key, Choice> t;
  return t;
}

int bucket_of(int64_t M) {
  int b = 0;
  while ((int64_t(2) << b) <= M) ++b;
  return b;  // 2^b <= M < 2^(b+1)
}

// The calling thread's workspace of each dtype: grown when a call needs more, then reused, so
// that steady-state calls neither allocate nor fault pages.
at::Tensor& workspace(at::ScalarType t, int64_t numel) {
  thread_local at::Tensor ws[3];
  const int i = t == at::kFloat ? 0 : t == at::kHalf ? 1 : 2;
  if (!ws[i].defined() || ws[i].numel() < numel) {
    ws[i] = at::Tensor();  // free the old one before allocating the larger
    ws[i] = at::empty({numel}, at::TensorOptions().dtype(t));
  }
  return ws[i];
}

double time_ms(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Mode mode() { return Mode(mode_ref().load(std::memory_order_relaxed)); }
void set_mode(Mode m) { mode_ref().store(int(m), std::memory_order_relaxed); }

bool mode_from_name(const char* name, Mode* m) {
  if (!strcmp(name, "auto")) {
    *m = Mode::kAuto;
  } else if (!strcmp(name, "fused")) {
    *m = Mode::kFused;
  } else if (!strcmp(name, "dense")) {
    *m = Mode::kDense;
  } else {
    return false;
  }
  return true;
}

const char* mode_name(Mode m) {
  return m == Mode::kFused ? "fused" : m == Mode::kDense ? "dense" : "auto";
}

std::vector<std::string> choices() {
  std::lock_guard<std::mutex> lock(table_mutex());
  std::vector<std::string> out;
  for (const auto& [k, c] : table()) {
    char line[256];
    snprintf(line, sizeof line,
             "M %lld-%lld K %lld N %lld %s %s: %s (fused %.2f ms, dense %.2f ms)",
             (long long)(int64_t(1) << k.bucket), (long long)((int64_t(2) << k.bucket) - 1),
             (long long)k.K, (long long)k.N, glue::dtype_name(at::ScalarType(k.dtype)),
             cpu_isa_name(CpuIsa(k.isa)), c.dense ? "dense" : "fused", c.fused_ms, c.dense_ms);
    out.emplace_back(line);
  }
  return out;
}

void clear_choices() {
  std::lock_guard<std::mutex> lock(table_mutex());
  table().clear();
}

void run_dense(const Int4GemmParams& p, const at::Tensor& x2, const at::Tensor& bias,
               at::Tensor& out2d) {
  // On AMX with bf16 x the same arithmetic runs without the workspace: panels decoded per K chunk
  // and multiplied on the tiles as they are made (int4_gemm_cpu_dequant_amx; p already points at
  // out2d and the bias). BITPRESS_INT4_DENSE_GEMM=onednn (read per call) keeps the workspace and
  // oneDNN's GEMM, for comparisons.
  const char* gemm = getenv("BITPRESS_INT4_DENSE_GEMM");
  if (!(gemm && !strcmp(gemm, "onednn")) && int4_gemm_dequant_amx_supported(p)) {
    glue::check_status(int4_gemm_cpu_dequant_amx(p, glue::torch_thread_pool()), "int4_gemm");
    return;
  }
  const at::ScalarType t = x2.scalar_type();
  at::Tensor& ws = workspace(t, p.K * p.N);
  glue::check_status(
      int4_gemm_decode_cpu(p, ws.data_ptr(), glue::to_dtype(t), p.N, glue::torch_thread_pool()),
      "int4_gemm");
  const at::Tensor wt = ws.narrow(0, 0, p.K * p.N).view({p.K, p.N});
  if (bias.defined()) {
    at::addmm_out(out2d, bias.to(t), x2, wt);
  } else {
    at::mm_out(out2d, x2, wt);
  }
}

bool choose(const Int4GemmParams& p, at::ScalarType x_dtype, const std::function<void()>& fused,
            const std::function<void()>& dense, bool* output_written) {
  *output_written = false;
  const Mode m = mode();
  if (m == Mode::kDense) return true;
  if (m == Mode::kFused || p.M < kMinRows) return false;
  const Key key{bucket_of(p.M), p.K, p.N, int(x_dtype), int(active_cpu_isa())};
  {
    std::lock_guard<std::mutex> lock(table_mutex());
    const auto it = table().find(key);
    if (it != table().end()) return it->second.dense;
  }
  // First call of this key: the first run of the dense path pays its first-touch page faults (its
  // workspace grows), so it is not timed; then the paths alternate twice and the faster run of
  // each counts (one run is at the mercy of a preempted thread).
  dense();
  double dense_ms = 1e300, fused_ms = 1e300;
  for (int round = 0; round < 2; ++round) {
    dense_ms = std::min(dense_ms, time_ms(dense));
    fused_ms = std::min(fused_ms, time_ms(fused));
  }
  const Choice c{dense_ms < 0.97 * fused_ms, fused_ms, dense_ms};
  // The output is the chosen path's, as in every later call of the key (two calls on the same
  // input give the same bits).
  if (c.dense) dense();
  *output_written = true;
  std::lock_guard<std::mutex> lock(table_mutex());
  table().emplace(key, c);
  return c.dense;
}

}  // namespace bitpress::int4_dense
