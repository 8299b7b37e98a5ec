"""sparse24_gemm and sparse24_int4_gemm on the CPU: Llama-3-8B projection shapes, bf16 x.

Cold weights: every measured call (ours and the baselines) takes the next of several copies of
its weights, together more than 2 x the 480 MiB L3 of the Intel development machines, so each
call streams its weights from DRAM.

Per case: our time; the floor = bytes of the compressed weight / read bandwidth measured in this
run; the baseline measured in the same run:

* sparse24_gemm (values bf16 [N, K/2] + meta [N, K/8]: 1.125 bytes per dense weight) against
  F.linear with the dense bf16 weight (2 bytes per weight). Targets (issue 12): M = 1 >= 1.6x,
  M = 16 >= 1.3x, M >= 128 >= 0.95x.
* sparse24_int4_gemm (4-bit codes + meta: 0.375 bytes per dense weight, group 128, symmetric)
  against bitpress's own int4_gemm (dense INT4, group 128) on the same shape. Target: M = 1
  >= 1.25x.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from bench_util import Rotating, Row, record, seconds_of, timeit

from bitpress import ops
from bitpress.int4 import layout as int4_layout
from bitpress.int4.quantized import QuantizedWeight
from bitpress.sparse24.cases import random_24, random_int4_24
from bitpress.sparse24.layout import compress

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # Llama-3-8B: q/o, gate/up, down
MS = [1, 4, 16, 32, 128, 512]
INT4_MS = [1, 4, 16]
GROUP = 128
COLD_BYTES = 1 << 30  # > 2 x 480 MiB


def _rotating(make, nbytes):
    return Rotating(make, nbytes, min_bytes=COLD_BYTES, max_copies=64)


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
        lambda: ops.sparse24_gemm(x, *r_sparse.next()), rounds=max(5, 64 // M), warmup_rounds=2
    )
    t_ours = seconds_of(benchmark)
    t_lin = timeit(lambda: F.linear(x, r_dense.next()))
    case = f"K={K} N={N} M={M} bf16"
    record(Row("sparse24_gemm", case, t_ours, nbytes, 2 * M * K * N, "F.linear bf16", t_lin),
           benchmark)  # fmt: skip


def _int4(K, N):
    key = ("int4", K, N)
    if key not in _CACHE:
        _CACHE.clear()
        gen = torch.Generator().manual_seed(K * N)
        qv, meta, scales, _ = random_int4_24(N, K, GROUP, True, torch.bfloat16, gen)
        nbytes = qv.numel() * 4 + meta.numel() + scales.numel() * 2
        q = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.uint8)
        s = (torch.rand(K // GROUP, N, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
        z = torch.full_like(s, 8, dtype=torch.uint8)
        g_idx = (torch.arange(K) // GROUP).to(torch.int32)
        packed = int4_layout.pack(QuantizedWeight(q, s, z, g_idx, GROUP, True))

        def copy_packed():
            return dataclasses.replace(
                packed, qweight=packed.qweight.clone(), scales=packed.scales.clone()
            )

        _CACHE[key] = (
            nbytes,
            _rotating(lambda: (qv.clone(), meta.clone(), scales.clone()), nbytes),
            _rotating(copy_packed, packed.nbytes),
        )
    return _CACHE[key]


@pytest.mark.parametrize("M", INT4_MS)
@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_sparse24_int4_gemm_cpu(benchmark, K, N, M):
    nbytes, r_sparse, r_int4 = _int4(K, N)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    benchmark.group = f"sparse24_int4_gemm {K}x{N}"

    def ours():
        qv, meta, scales = r_sparse.next()
        return ops.sparse24_int4_gemm(x, qv, meta, scales, group_size=GROUP)

    benchmark.pedantic(ours, rounds=max(5, 64 // M), warmup_rounds=2)
    t_ours = seconds_of(benchmark)
    t_int4 = timeit(lambda: ops.int4_gemm(x, r_int4.next()))
    case = f"K={K} N={N} M={M} bf16 g128 sym"
    record(Row("sparse24_int4_gemm", case, t_ours, nbytes, 2 * M * K * N, "int4_gemm", t_int4),
           benchmark)  # fmt: skip
