"""fp8_gemm (W8A8) on the CPU at Llama-3-8B projection shapes, and the shared setup of the FP8
benchmarks (bench_fp8_weight_gemm.py, bench_fp8_quantize.py import it). bf16 activations.

Cold cache: every measured call (ours and the baselines) takes the next of several copies of its
weights, together more than twice the last-level cache (960 MiB: the Intel machines report a
480 MiB L3), so each call streams its weights from DRAM.

Per case: our time; the floor = bytes of the E4M3 weight (1 per weight) plus its scales / read
bandwidth measured in this run; baselines measured in the same run: F.linear with a dense bf16
weight (oneDNN: AMX on the Intel machines) and torch._scaled_mm on the CPU (listed for reference:
~270 ms at M = 1 there; only at 4096 x 14336, M <= 16). GPU section: runs only with a CUDA GPU;
it prints the H100 floors beside the measurement.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_util import Rotating, Row, cuda_timeit, record, seconds_of, timeit

from bitpress import ops
from bitpress.fp8.reference import to_e4m3

SHAPES = [(4096, 14336), (4096, 4096), (14336, 4096)]  # Llama-3-8B: gate/up, q/o, down
MS = [1, 16, 128, 512]


def _weights(K, N, layout):
    gen = torch.Generator().manual_seed(K + N)
    w = to_e4m3(torch.randn(N, K, generator=gen) * 60)
    if layout == "channel":
        ws = torch.rand(N, 1, generator=gen) * 0.01 + 0.001
        dense = (w.float() * ws).to(torch.bfloat16)
    else:  # 128 x 128 blocks
        ws = torch.rand(-(-N // 128), -(-K // 128), generator=gen) * 0.01 + 0.001
        s = ws.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
        dense = (w.float() * s).to(torch.bfloat16)
    return w, ws, dense


_CACHE = {}


def _rotations(K, N, layout):
    key = (K, N, layout)
    if key not in _CACHE:
        _CACHE.clear()
        w, ws, dense = _weights(K, N, layout)
        _CACHE[key] = (
            w,
            ws,
            Rotating(lambda: (w.clone(), ws.clone()), w.numel()),
            Rotating(lambda: dense.clone(), dense.numel() * 2),
        )
    return _CACHE[key]


def _scaled_mm_cases(K, N, M):
    return (K, N) == (4096, 14336) and M <= 16


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", SHAPES[:1], ids=lambda s: str(s))
def bench_fp8_gemm_cpu(benchmark, K, N, M):
    """W8A8, rowwise scales (per token x per channel), activations quantized beforehand."""
    w, ws, r_w, r_dense = _rotations(K, N, "channel")
    x = torch.randn(M, K, dtype=torch.bfloat16)
    xq, sx = ops.fp8_quantize(x, granularity="token")
    benchmark.group = f"fp8_gemm {K}x{N}"

    def ours():
        wi, si = r_w.next()
        return ops.fp8_gemm(xq, wi, sx, si)

    benchmark.pedantic(ours, rounds=max(15, 256 // M), warmup_rounds=2)
    t_ours = seconds_of(benchmark)
    t_lin = timeit(lambda: F.linear(x, r_dense.next()))
    case = f"K={K} N={N} M={M} rowwise"
    nbytes = w.numel() + ws.numel() * 4
    flops = 2 * M * K * N
    record(Row("fp8_gemm", case, t_ours, nbytes, flops, "F.linear bf16", t_lin), benchmark)
    if _scaled_mm_cases(K, N, M):

        def scaled_mm():
            wi, si = r_w.next()
            return torch._scaled_mm(xq, wi.t(), sx, si.t(), out_dtype=torch.bfloat16)

        t_smm = timeit(scaled_mm, min_time=0.0, min_reps=3, warmup=1)
        record(Row("fp8_gemm", case, t_ours, nbytes, flops, "torch._scaled_mm", t_smm))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 16, 128, 4096])
@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_fp8_gemm_gpu(benchmark, K, N, M):
    """GPU: fp8_gemm (rowwise) and fp8_weight_gemm on the best backend of the device, cold L2
    (rotating weights), against F.linear bf16 (cuBLAS). The floor: bytes / 3.35 TB/s or FLOPs /
    1980 TFLOP/s (H100 SXM, fp8), whichever is larger."""
    w, ws, dense = (t.cuda() for t in _weights(K, N, "channel"))
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    xq, sx = ops.fp8_quantize(x, granularity="token")
    r_w = Rotating(lambda: (w.clone(), ws.clone()), w.numel())
    r_dense = Rotating(lambda: dense.clone(), dense.numel() * 2)
    benchmark.group = f"fp8_gemm gpu {K}x{N}"

    def run():
        wi, si = r_w.next()
        ops.fp8_gemm(xq, wi, sx, si)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)

    def gemm():
        wi, si = r_w.next()
        return ops.fp8_gemm(xq, wi, sx, si)

    def weight_only():
        wi, si = r_w.next()
        return ops.fp8_weight_gemm(x, wi, si)

    t_lin = cuda_timeit(lambda: F.linear(x, r_dense.next()))
    nbytes = w.numel() + M * K + M * N * 2
    for name, fn in (("fp8_gemm", gemm), ("fp8_weight_gemm", weight_only)):
        t = cuda_timeit(fn)
        row = Row(name, f"K={K} N={N} M={M}", t, nbytes, 2 * M * K * N, "F.linear bf16", t_lin,
                  device="cuda")  # fmt: skip
        record(row, benchmark if name == "fp8_gemm" else None)
