"""The selftest cases of the FP8 ops (``python -m bitpress selftest``): shapes and scale layouts
that cover every kernel path, built from fresh random data, compared against
:mod:`bitpress.fp8.reference`."""

from __future__ import annotations

import torch

from bitpress._core.registry import Case
from bitpress.fp8 import reference
from bitpress.fp8.reference import BLOCK, cdiv


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_e4m3(shape, gen: torch.Generator, amax: float = 448.0) -> torch.Tensor:
    """Random E4M3 values spread over the whole range (NaN codes excluded)."""
    x = torch.randn(shape, generator=gen) * (amax / 4)
    return reference.to_e4m3(x)


def random_scale(layout: str, rows: int, K: int, gen: torch.Generator, weight: bool):
    """A float32 scale of ``layout`` ("tensor", "row", "block") for an operand [rows, K]."""
    if layout == "tensor":
        shape = (1,)
    elif layout == "row":
        shape = (rows, 1)
    else:
        shape = (cdiv(rows, BLOCK) if weight else rows, cdiv(K, BLOCK))
    return torch.rand(shape, generator=gen) * 0.01 + 0.001


def _quantize_case(shape, dtype, granularity, block_size=None, static=False):
    def make(device, gen, backend):
        x = torch.randn(shape, generator=gen).to(dtype) * 3
        scale = None
        if static:
            _, scale = reference.fp8_quantize(x, granularity, None, block_size)
        return (x.to(device), granularity, None if scale is None else scale.to(device), block_size)

    tag = f"x={list(shape)} {_name(dtype)} {granularity}"
    tag += f" {list(block_size)}" if block_size else ""
    tag += " static" if static else ""
    numel = 1
    for s in shape:
        numel *= s
    return Case("fp8_quantize", tag, make, reference.fp8_quantize, 0.0, numel)


def _gemm_case(M, K, N, layout, out_dtype, bias):
    def make(device, gen, backend):
        a = random_e4m3((M, K), gen)
        b = random_e4m3((N, K), gen)
        sa = random_scale(layout, M, K, gen, weight=False)
        sb = random_scale(layout, N, K, gen, weight=True)
        bi = torch.randn(N, generator=gen) if bias else None
        args = (a, b, sa, sb, bi)
        return (*(t if t is None else t.to(device) for t in args), out_dtype)

    tag = f"M={M} K={K} N={N} {layout} -> {_name(out_dtype)}" + (" bias" if bias else "")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[out_dtype]
    return Case("fp8_gemm", tag, make, reference.fp8_gemm, tol, M * N * K // 64)


def _weight_gemm_case(M, K, N, layout, dtype, bias):
    def make(device, gen, backend):
        x = torch.randn(M, K, generator=gen).to(dtype)
        w = random_e4m3((N, K), gen)
        ws = random_scale(layout, N, K, gen, weight=True)
        bi = torch.randn(N, generator=gen).to(dtype) if bias else None
        return (x.to(device), w.to(device), ws.to(device), None if bi is None else bi.to(device))

    tag = f"M={M} K={K} N={N} {layout} {_name(dtype)}" + (" bias" if bias else "")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    return Case("fp8_weight_gemm", tag, make, reference.fp8_weight_gemm, tol, M * N * K // 64)


def fp8_quantize_cases() -> list[Case]:
    return [
        _quantize_case((33, 4096), torch.bfloat16, "token"),
        _quantize_case((7, 300), torch.float32, "tensor"),
        _quantize_case((129, 257), torch.float16, "channel"),
        _quantize_case((5, 1000), torch.bfloat16, "block"),
        _quantize_case((300, 260), torch.float32, "block", (128, 128)),
        _quantize_case((7, 300), torch.float16, "token", static=True),
    ]


def fp8_gemm_cases() -> list[Case]:
    return [
        _gemm_case(1, 4096, 4096, "tensor", torch.bfloat16, False),
        _gemm_case(7, 1000, 300, "row", torch.float16, True),
        _gemm_case(33, 512, 129, "block", torch.float32, True),
    ]


def fp8_weight_gemm_cases() -> list[Case]:
    return [
        _weight_gemm_case(1, 4096, 4096, "row", torch.bfloat16, False),
        _weight_gemm_case(7, 1000, 300, "block", torch.float16, True),
        _weight_gemm_case(33, 520, 129, "tensor", torch.float32, True),
    ]
