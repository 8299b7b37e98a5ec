"""sparse24_compress on the CPU (run once per weight at load): Llama-3-8B projection shapes, bf16.

Baseline in the same run: the plain-torch reference (bitpress.sparse24.layout.compress). Bytes:
the dense weight read plus the values and metadata written.
"""

from __future__ import annotations

import pytest
import torch
from bench_util import Row, record, seconds_of, timeit

from bitpress import ops
from bitpress.sparse24.cases import random_24
from bitpress.sparse24.layout import compress

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # Llama-3-8B: q/o, gate/up, down


@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_sparse24_compress_cpu(benchmark, K, N):
    w = random_24(N, K, torch.bfloat16, torch.Generator().manual_seed(K + N))
    benchmark.group = "sparse24_compress"
    benchmark.pedantic(lambda: ops.sparse24_compress(w), rounds=3, warmup_rounds=1)
    t_ours = seconds_of(benchmark)
    t_ref = timeit(lambda: compress(w), min_reps=2, min_time=0.0)
    nbytes = N * K * 2 + N * K + N * K // 8
    record(Row("sparse24_compress", f"K={K} N={N} bf16", t_ours, nbytes, 0, "reference", t_ref),
           benchmark)  # fmt: skip
