"""The selftest cases of the 2:4 ops (``python -m bitpress selftest``): shapes that cover every
kernel path (M = 1 decode, small M, the panel path; odd N; every dtype), from fresh random data,
compared against :mod:`bitpress.sparse24.reference`."""

from __future__ import annotations

import torch

from bitpress._core.registry import Case
from bitpress.sparse24 import reference
from bitpress.sparse24.layout import Sparse24Layout, compress, pack_qvalues

GEMM_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_24(N: int, K: int, dtype: torch.dtype, gen: torch.Generator, fill: float = 1.0):
    """A random dense [N, K] weight with the 2:4 pattern: 2 kept positions per group of 4, each
    kept weight nonzero with probability ``fill`` (so groups with 0 or 1 nonzeros occur)."""
    scores = torch.rand(N, K // 4, 4, generator=gen)
    keep = scores.argsort(-1)[..., :2]
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(2, keep, True)
    mask &= torch.rand(N, K // 4, 4, generator=gen) < fill
    w = torch.randn(N, K // 4, 4, generator=gen) * 0.05
    w = torch.where(mask, w, torch.zeros(()))
    return w.reshape(N, K).to(dtype)


def random_int4_24(N: int, K: int, group_size: int, sym: bool, scale_dtype, gen):
    """Random (qvalues, meta, scales, zeros) of a 2:4 + INT4 weight."""
    _, meta = compress(random_24(N, K, torch.float32, gen))
    q = torch.randint(0, 16, (N, K // 2), generator=gen)
    G = (1 if K else 0) if group_size == -1 else -(-K // group_size)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.002).to(scale_dtype)
    zeros = None if sym else (torch.rand(G, N, generator=gen) * 15).to(scale_dtype)
    return pack_qvalues(q), meta, scales, zeros


def _to(device, args: tuple) -> tuple:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compress_case(N, K, dtype, fill):
    def make(device, gen, backend):
        return _to(device, (random_24(N, K, dtype, gen, fill),))

    tag = f"N={N} K={K} {_name(dtype)} fill={fill}"
    return Case("sparse24_compress", tag, make, reference.sparse24_compress, 0.0, N * K)


def _gemm_case(M, K, N, dtype, bias):
    def make(device, gen, backend):
        values, meta = compress(random_24(N, K, dtype, gen))
        x = torch.randn(M, K, generator=gen).to(dtype)
        b = torch.randn(N, generator=gen).to(dtype) if bias else None
        return _to(device, (x, values, meta, b, int(Sparse24Layout.ROW)))

    tag = f"M={M} K={K} N={N} {_name(dtype)}" + (" bias" if bias else "")
    return Case("sparse24_gemm", tag, make, reference.sparse24_gemm, GEMM_TOL[dtype], M * N)


def _int4_case(M, K, N, dtype, group_size, sym, bias):
    def make(device, gen, backend):
        qvalues, meta, scales, zeros = random_int4_24(N, K, group_size, sym, dtype, gen)
        x = torch.randn(M, K, generator=gen).to(dtype)
        b = torch.randn(N, generator=gen).to(dtype) if bias else None
        args = (x, qvalues, meta, scales, zeros, group_size, b, int(Sparse24Layout.ROW))
        return _to(device, args)

    tag = f"M={M} K={K} N={N} g={group_size} {_name(dtype)}" + (" sym" if sym else " asym")
    tag += " bias" if bias else ""
    return Case(
        "sparse24_int4_gemm", tag, make, reference.sparse24_int4_gemm, GEMM_TOL[dtype], M * N
    )


def sparse24_compress_cases() -> list[Case]:
    return [
        _compress_case(4096, 4096, torch.bfloat16, 1.0),
        _compress_case(33, 136, torch.float32, 0.6),
        _compress_case(7, 8, torch.float16, 0.3),
    ]


def sparse24_gemm_cases() -> list[Case]:
    return [
        _gemm_case(1, 4096, 4096, torch.bfloat16, False),
        _gemm_case(7, 1024, 300, torch.float16, True),
        _gemm_case(33, 512, 129, torch.bfloat16, True),
        _gemm_case(5, 264, 61, torch.float32, False),
    ]


def sparse24_int4_gemm_cases() -> list[Case]:
    return [
        _int4_case(1, 4096, 4096, torch.bfloat16, 128, True, False),
        _int4_case(7, 1024, 300, torch.float16, 64, False, True),
        _int4_case(33, 528, 129, torch.float32, -1, False, True),
    ]
