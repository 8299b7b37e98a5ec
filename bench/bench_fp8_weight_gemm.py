"""fp8_weight_gemm (W8A16) on the CPU at Llama-3-8B projection shapes, per-channel and 128 x 128
block scales, bf16 activations; the setup (cold weights, floor, baselines) is bench_fp8_gemm.py's:
F.linear bf16 and torch._scaled_mm in the same run. Issue targets at 4096 x 14336: M = 1 at least
85% of the read floor (~2x F.linear), M = 16 at least 1.5x F.linear, M >= 128 at least 0.95x."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_fp8_gemm import MS, SHAPES, _rotations, _scaled_mm_cases
from bench_util import Row, record, seconds_of, timeit

from bitpress import ops
from bitpress.fp8.reference import to_e4m3


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("layout", ["channel", "block"])
@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_fp8_weight_gemm_cpu(benchmark, K, N, layout, M):
    if layout == "block" and (K, N) != (4096, 14336):
        pytest.skip("block scales: one shape")
    w, ws, r_w, r_dense = _rotations(K, N, layout)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    benchmark.group = f"fp8_weight_gemm {K}x{N}"

    def ours():
        wi, si = r_w.next()
        return ops.fp8_weight_gemm(x, wi, si)

    benchmark.pedantic(ours, rounds=max(15, 256 // M), warmup_rounds=2)
    t_ours = seconds_of(benchmark)
    t_lin = timeit(lambda: F.linear(x, r_dense.next()))
    case = f"K={K} N={N} M={M} bf16 {layout}"
    nbytes = w.numel() + ws.numel() * 4
    flops = 2 * M * K * N
    record(Row("fp8_weight_gemm", case, t_ours, nbytes, flops, "F.linear bf16", t_lin), benchmark)
    if _scaled_mm_cases(K, N, M) and layout == "channel":
        xq = to_e4m3(x.float())
        one = torch.ones(())

        def scaled_mm():
            wi, si = r_w.next()
            return torch._scaled_mm(xq, wi.t(), one, one, out_dtype=torch.bfloat16)

        t_smm = timeit(scaled_mm, min_time=0.0, min_reps=3, warmup=1)
        record(Row("fp8_weight_gemm", case, t_ours, nbytes, flops, "torch._scaled_mm", t_smm))
