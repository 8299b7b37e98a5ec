// fp8_weight_gemm at M = 1 on the dot-product path: weight rows read at once per thread
// (Fp8CpuOptions.dot_streams) against one row at a time, in ONE process, interleaved per round,
// cold weights (every call reads a copy not touched for > 1000 MiB of other copies), bf16 x,
// per-channel scales; 1 thread (thread CPU time: what a loaded machine leaves comparable) and
// T threads (wall time, contiguous row ranges per thread as at::parallel_for splits them).
// T threads also print the process CPU time per call (summed over the threads; run with
// OMP_WAIT_POLICY=passive so that idle threads do not spin). Prints min / median ms per variant and
// the read floor (weight + scale bytes at the bandwidth of a T-thread read of 1 GiB measured in the
// same run).
//
// Build against the CPU-only CMake build of the kernel library (see csrc/README.md):
//   g++ -std=c++20 -O3 -fopenmp -Icsrc/include -Icsrc bench/fp8_dot_streams.cpp \
//       build/cmake/libbitpress_kernels.a -o build/fp8_dot_streams
//   OMP_WAIT_POLICY=passive build/fp8_dot_streams 4096 14336 [--rounds 8] [--threads 2]
//       [--isa avx512|avx2]
#include <omp.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/fp8/fp8.h"
#include "bitpress/fp8/fp8_gemm.h"

using namespace bitpress;

namespace {

int g_threads = 2;

void omp_parallel_for(void*, int64_t begin, int64_t end, int64_t, ParallelBody body, void* ctx) {
  const int64_t n = end - begin;
  const int T = int(std::min<int64_t>(g_threads, n));
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
    const int64_t b = begin + n * t / T, e = begin + n * (t + 1) / T;
    if (b < e) body(ctx, b, e);
  }
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double cpu_ms(clockid_t clock) {
  timespec ts;
  clock_gettime(clock, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// Bytes per second of a T-thread float sum over 1 GiB (best of 5), as bench_util.read_bandwidth.
double read_bandwidth() {
  const size_t n = size_t(1) << 28;
  std::vector<float> x(n, 1.f);
  double best = 1e30, sink = 0;
  for (int r = 0; r < 6; ++r) {
    const double t0 = now_ms();
    double s = 0;
#pragma omp parallel num_threads(g_threads) reduction(+ : s)
    {
      float acc[16] = {};  // 16 independent sums: a vector add per 64 bytes, not a chain
#pragma omp for schedule(static)
      for (size_t i = 0; i < n; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += x[i + j];
      for (float a : acc) s += a;
    }
    best = std::min(best, now_ms() - t0);
    sink += s;
  }
  if (sink < 0) std::printf(" ");
  return n * 4.0 / (best * 1e-3);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s K N [--rounds R] [--threads T] [--isa avx512|avx2]\n", argv[0]);
    return 2;
  }
  const int64_t K = atoll(argv[1]), N = atoll(argv[2]);
  int rounds = 8;
  CpuIsa isa = CpuIsa::kAvx512;
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--rounds") rounds = atoi(argv[i + 1]);
    if (a == "--threads") g_threads = atoi(argv[i + 1]);
    if (a == "--isa") isa = std::string(argv[i + 1]) == "avx2" ? CpuIsa::kAvx2 : CpuIsa::kAvx512;
  }
  const double bw = read_bandwidth();
  const double floor_ms = (double(N) * K + N * 4.0) / bw * 1e3;
  std::printf("K=%lld N=%lld M=1 isa=%s: read bandwidth %.1f GB/s (%d threads), floor %.2f ms\n",
              (long long)K, (long long)N, cpu_isa_name(isa), bw / 1e9, g_threads, floor_ms);

  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint8_t> w0(size_t(N * K));
  for (auto& c : w0) c = float_to_e4m3(nd(rng) * 100.f);
  const size_t copies = std::max<size_t>(2, (size_t(1000) << 20) / w0.size() + 1);
  std::vector<std::vector<uint8_t>> ws(copies, w0);
  std::vector<float> scale(static_cast<size_t>(N), 1e-3f);
  std::vector<uint16_t> x(static_cast<size_t>(K)), out(static_cast<size_t>(N));
  for (auto& v : x) v = float_to_bf16_bits(nd(rng));

  Fp8CpuOptions base = fp8_cpu_default_options();
  base.dot_max_rows = 1;
  base.dot_isa = isa;
  const int streams[] = {1, 2, 4};
  CpuThreadPool pool{omp_parallel_for, nullptr};
  size_t next = 0;
  for (int threads : {1, g_threads}) {
    std::vector<std::vector<double>> t(3), c(3);
    for (int r = 0; r <= rounds; ++r) {
      for (int v = 0; v < 3; ++v) {
        Fp8CpuOptions o = base;
        o.dot_streams = streams[v];
        Fp8WeightGemmParams p;
        p.x = x.data();
        p.x_dtype = DType::kBFloat16;
        p.ldx = K;
        p.w = ws[next++ % copies].data();
        p.ldw = K;
        p.w_scale.data = scale.data();
        p.w_scale.layout = Fp8ScaleLayout::kRow;
        p.w_scale.row_stride = 1;
        p.out = out.data();
        p.ldo = N;
        p.M = 1;
        p.N = N;
        p.K = K;
        const clockid_t clk = threads > 1 ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_THREAD_CPUTIME_ID;
        const double c0 = cpu_ms(clk), w0t = now_ms();
        const Status st = fp8_weight_gemm_cpu_with(p, threads > 1 ? &pool : nullptr, o);
        const double c1 = cpu_ms(clk), w1t = now_ms();
        if (st != Status::kSuccess) {
          std::fprintf(stderr, "status %d\n", int(st));
          return 1;
        }
        if (r) t[v].push_back(threads > 1 ? w1t - w0t : c1 - c0);
        if (r) c[v].push_back(c1 - c0);
      }
    }
    std::printf("%d thread%s (%s):", threads, threads > 1 ? "s" : "",
                threads > 1 ? "wall" : "thread CPU time");
    for (int v = 0; v < 3; ++v) {
      const double med = median(t[v]);
      std::printf(" | %d stream%s %.2f / %.2f ms (%.0f%% of floor)", streams[v],
                  streams[v] > 1 ? "s" : "", *std::min_element(t[v].begin(), t[v].end()), med,
                  100 * floor_ms / med);
    }
    if (threads > 1) {
      std::printf("\n%d threads (process CPU time, summed):", threads);
      for (int v = 0; v < 3; ++v) {
        std::printf(" | %d stream%s %.2f / %.2f ms", streams[v], streams[v] > 1 ? "s" : "",
                    *std::min_element(c[v].begin(), c[v].end()), median(c[v]));
      }
    }
    std::printf("\n");
    std::fflush(stdout);
  }
  return 0;
}
