"""Shared helpers of the FP8 tests: random E4M3 data, scales, and the CPU ISA fixture."""

from __future__ import annotations

import pytest
import torch

from bitpress._core import ext as _ext
from bitpress.fp8.reference import BLOCK, E4M3, cdiv, to_e4m3

ISAS = ["scalar", "avx2", "avx512", "amx"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative-error bounds against float64: exact products, float32 sums, one rounding to the
# output dtype (fp16 2^-11, bf16 2^-8 per element).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def isa_ok(isa: str) -> bool:
    return ISAS.index(isa) <= ISAS.index(_ext.C.best_cpu_isa())


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    if not isa_ok(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} path")
    _ext.C.set_cpu_isa(request.param)
    yield request.param
    _ext.C.set_cpu_isa(None)


def e4m3(shape, amax: float = 448.0, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random E4M3 values over the whole range, subnormals included (no NaN codes)."""
    x = torch.randn(shape, generator=gen) * (amax / 4)
    return to_e4m3(x)


def scale(layout: str, rows: int, K: int, weight: bool) -> torch.Tensor:
    if layout == "tensor":
        return torch.rand(()) * 0.01 + 0.001
    if layout == "tensor1":
        return torch.rand(1) * 0.01 + 0.001
    if layout == "row":
        return torch.rand(rows, 1) * 0.01 + 0.001
    return torch.rand(cdiv(rows, BLOCK) if weight else rows, cdiv(K, BLOCK)) * 0.01 + 0.001


def all_codes() -> torch.Tensor:
    """The 256 E4M3 codes, as float8_e4m3fn."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3)
