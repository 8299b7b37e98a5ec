"""sparse24_gemm on the CPU: Llama-3-8B projection shapes, bf16 x (sparse24_int4_gemm:
bench_sparse24_int4_gemm.py).

Cold weights: every measured call (ours and the baselines) takes the next of several copies of
its weights, together more than 2 x the 480 MiB L3 of the Intel development machines, so each
call streams its weights from DRAM.

Per case: our time; the floor = bytes of the compressed weight / read bandwidth measured in this
run; the baseline measured in the same run: sparse24_gemm (values bf16 [N, K/2] + meta
[N, K/8]: 1.125 bytes per dense weight) against F.linear with the dense bf16 weight (2 bytes per
weight). Targets (issue 12): M = 1 >= 1.6x, M = 16 >= 1.3x, M >= 128 >= 0.95x.

The path is chosen per M (bitpress/sparse24/sparse24_cpu.h); BITPRESS_SPARSE24_DIRECT_ROWS
moves the threshold between the direct read stream and the microkernel panels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_util import Rotating, Row, record, seconds_of, timeit

from bitpress import ops
from bitpress.sparse24.cases import random_24
from bitpress.sparse24.layout import compress

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # Llama-3-8B: q/o, gate/up, down
MS = [1, 4, 16, 32, 128, 512]


def _rotating(make, nbytes):
    return Rotating(make, nbytes)


_CACHE: dict = {}


def _sparse(K, N):
    key = ("bf16", K, N)
    if key not in _CACHE:
        _CACHE.clear()
        gen = torch.Generator().manual_seed(K + N)
        w = random_24(N, K, torch.bfloat16, gen)
        values, meta = compress(w)
        nbytes = values.numel() * 2 + meta.numel()
        _CACHE[key] = (
            nbytes,
            _rotating(lambda: (values.clone(), meta.clone()), nbytes),
            _rotating(lambda: w.clone(), w.numel() * 2),
        )
    return _CACHE[key]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_sparse24_gemm_cpu(benchmark, K, N, M):
    nbytes, r_sparse, r_dense = _sparse(K, N)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    benchmark.group = f"sparse24_gemm {K}x{N}"
    benchmark.pedantic(
        lambda: ops.sparse24_gemm(x, *r_sparse.next()), rounds=max(15, 256 // M), warmup_rounds=2
    )
    t_ours = seconds_of(benchmark)
    t_lin = timeit(lambda: F.linear(x, r_dense.next()))
    case = f"K={K} N={N} M={M} bf16"
    record(Row("sparse24_gemm", case, t_ours, nbytes, 2 * M * K * N, "F.linear bf16", t_lin),
           benchmark)  # fmt: skip
