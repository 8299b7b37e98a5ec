"""fp8_quantize on the CPU: activations [M, 4096] bf16, per token / 1 x 128 block / per tensor,
against the plain-torch formula in the same run."""

from __future__ import annotations

import pytest
import torch
from bench_util import Row, record, seconds_of, timeit

from bitpress import ops
from bitpress.fp8 import reference


@pytest.mark.parametrize("granularity", ["token", "block", "tensor"])
@pytest.mark.parametrize("M", [1, 128, 4096])
def bench_fp8_quantize_cpu(benchmark, M, granularity):
    """Activations [M, 4096] bf16 (hot: they come from the previous layer); the baseline is the
    plain-torch formula (amax, divide, clamp, cast) of bitpress.fp8.reference."""
    x = torch.randn(M, 4096, dtype=torch.bfloat16)
    benchmark.group = f"fp8_quantize M={M}"
    benchmark.pedantic(
        lambda: ops.fp8_quantize(x, granularity=granularity), rounds=20, warmup_rounds=2
    )
    t_ours = seconds_of(benchmark)
    t_ref = timeit(lambda: reference.fp8_quantize(x, granularity))
    nbytes = x.numel() * 3  # read bf16, write E4M3
    record(
        Row("fp8_quantize", f"M={M} K=4096 bf16 {granularity}", t_ours, nbytes, 0, "torch", t_ref),
        benchmark,
    )
