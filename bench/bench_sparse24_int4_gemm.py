"""sparse24_int4_gemm on the CPU: Llama-3-8B projection shapes, bf16 x, group 128, symmetric.

Cold weights (rotating copies, together more than 2 x the 480 MiB L3 of the Intel development
machines). Bytes: 4-bit codes + metadata + bf16 scales (0.375 bytes per dense weight plus the
scales); baseline in the same run: bitpress's own int4_gemm (dense INT4, group 128, CPU tiles) on
the same shape. Target (issue 12): M = 1 at least 1.25x faster.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from bench_util import Rotating, Row, record, seconds_of, timeit

from bitpress import ops
from bitpress.int4 import layout as int4_layout
from bitpress.int4.quantized import QuantizedWeight
from bitpress.sparse24.cases import random_int4_24

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # Llama-3-8B: q/o, gate/up, down
MS = [1, 4, 16]
GROUP = 128


def _rotating(make, nbytes):
    return Rotating(make, nbytes)


_CACHE: dict = {}


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


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_sparse24_int4_gemm_cpu(benchmark, K, N, M):
    nbytes, r_sparse, r_int4 = _int4(K, N)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    benchmark.group = f"sparse24_int4_gemm {K}x{N}"

    def ours():
        qv, meta, scales = r_sparse.next()
        return ops.sparse24_int4_gemm(x, qv, meta, scales, group_size=GROUP)

    benchmark.pedantic(ours, rounds=max(15, 256 // M), warmup_rounds=2)
    t_ours = seconds_of(benchmark)
    t_int4 = timeit(lambda: ops.int4_gemm(x, r_int4.next()))
    case = f"K={K} N={N} M={M} bf16 g128 sym"
    record(Row("sparse24_int4_gemm", case, t_ours, nbytes, 2 * M * K * N, "int4_gemm", t_int4),
           benchmark)  # fmt: skip
