"""The hostile-input descriptions of the FP8 ops (the suite is ``tests/hostile``; the data model
is :class:`bitpress._core.registry.HostileSpec`): sizes, tensor arguments and options as plain
data, and plain torch to build valid arguments, call a backend and compute the expected result.
"""

from __future__ import annotations

import torch

from bitpress._core.checks import FLOAT_DTYPES
from bitpress._core.registry import Dim, HostileSpec, TensorArg, register_hostile
from bitpress.fp8 import reference
from bitpress.fp8.cases import random_e4m3, random_scale
from bitpress.fp8.ops import fp8_gemm, fp8_quantize, fp8_weight_gemm
from bitpress.fp8.reference import E4M3

F32 = (torch.float32,)
E4M3S = (E4M3,)
INF = (float("nan"), float("inf"), float("-inf"))
# float32 accumulation, one rounding to the output dtype (bitpress.fp8.cases).
GEMM_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# --------------------------------------------------------------------------------------------
# fp8_quantize
# --------------------------------------------------------------------------------------------


def _quantize_make(sizes, options, gen, backend):
    R, K = sizes["R"], sizes["K"]
    g, bs = options["granularity"], options["block_size"]
    block_size = bs if g == "block" else None
    two_d = g == "channel" or (g == "block" and bs[0] != 1)
    lead = (R,) if two_d else (R,) * options["lead_dims"]
    x = (torch.randn((*lead, K), generator=gen) * 5).to(options["dtype"])
    scale = None
    if options["static"]:
        _, scale = reference.fp8_quantize(x, g, None, block_size)
        scale = scale * 1.5  # some values saturate
    return dict(x=x, scale=scale, granularity=g, block_size=block_size)


def _as_bits(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs in a form the suite compares exactly (torch.equal, which treats NaN as unequal
    to itself): the codes as their bytes (stricter: the NaN's sign counts), NaN scales as -1."""
    return q.view(torch.uint8), torch.where(s.isnan(), torch.full_like(s, -1.0), s)


def _quantize_call(backend, a):
    return _as_bits(
        *fp8_quantize(
            a["x"],
            granularity=a["granularity"],
            scale=a["scale"],
            block_size=a["block_size"],
            backend=backend,
        )
    )


def _quantize_reference(a):
    q, s = reference.fp8_quantize(a["x"], a["granularity"], a["scale"], a["block_size"])
    shape = reference.scale_shape(a["x"].shape, a["granularity"], a["block_size"])
    return _as_bits(q, s.float().reshape(shape))


@register_hostile("fp8_quantize")
def fp8_quantize_hostile() -> HostileSpec:
    return HostileSpec(
        op="fp8_quantize",
        dims=(Dim("R", small=9, large=(67,)), Dim("K", small=40, large=(300,))),
        options={
            "granularity": ("token", "tensor", "channel", "block"),
            "block_size": ((1, 128), (128, 128), (1, 16), (3, 8)),
            "static": (False, True),
            "dtype": FLOAT_DTYPES,
            "lead_dims": (1, 0, 2),
        },
        args=(
            TensorArg("x", FLOAT_DTYPES, None, related=("scale",), nonfinite=INF),
            TensorArg("scale", F32, None, related=("x",)),
        ),
        make=_quantize_make,
        call=_quantize_call,
        reference=_quantize_reference,
        tol=lambda options: 0.0,
        work=lambda s: s["R"] * s["K"],
    )


# --------------------------------------------------------------------------------------------
# fp8_gemm
# --------------------------------------------------------------------------------------------


def _gemm_make(sizes, options, gen, backend):
    M, K, N = sizes["M"], sizes["K"], sizes["N"]
    la, lb = options["scales"]
    bias = None
    if options["bias"] is not None:
        bias = torch.randn(N, generator=gen).to(options["bias"])
    return dict(
        a=random_e4m3((M, K), gen),
        b=random_e4m3((N, K), gen),
        scale_a=random_scale(la, M, K, gen, weight=False),
        scale_b=random_scale(lb, N, K, gen, weight=True),
        bias=bias,
        out_dtype=options["out_dtype"],
    )


def _gemm_args(a):
    return a["a"], a["b"], a["scale_a"], a["scale_b"], a["bias"], a["out_dtype"]


@register_hostile("fp8_gemm")
def fp8_gemm_hostile() -> HostileSpec:
    return HostileSpec(
        op="fp8_gemm",
        dims=(
            Dim("M", small=9, large=(67,)),
            Dim("K", small=40, large=(300,)),
            Dim("N", small=40, large=(263,)),
        ),
        options={
            "scales": (("tensor", "tensor"), ("row", "row"), ("block", "block"), ("row", "tensor")),
            "out_dtype": (torch.bfloat16, torch.float32, torch.float16),
            "bias": (None, *FLOAT_DTYPES),
        },
        args=(
            TensorArg("a", E4M3S, 2, related=("b", "scale_a", "scale_b")),
            TensorArg("b", E4M3S, 2, related=("a", "scale_b", "scale_a", "bias")),
            TensorArg("scale_a", F32, None, related=("a", "scale_b")),
            TensorArg("scale_b", F32, None, related=("b", "scale_a")),
            TensorArg("bias", FLOAT_DTYPES, 1, related=("b",), nonfinite=INF),
        ),
        make=_gemm_make,
        call=lambda backend, a: fp8_gemm(*_gemm_args(a), backend=backend),
        reference=lambda a: reference.fp8_gemm(*_gemm_args(a)),
        tol=lambda options: GEMM_TOL[options["out_dtype"]],
        work=lambda s: s["M"] * s["K"] * s["N"],
    )


# --------------------------------------------------------------------------------------------
# fp8_weight_gemm
# --------------------------------------------------------------------------------------------


def _weight_gemm_make(sizes, options, gen, backend):
    M, K, N = sizes["M"], sizes["K"], sizes["N"]
    dtype = options["dtype"]
    bias = None
    if options["bias"] is not None:
        bias = torch.randn(N, generator=gen).to(options["bias"])
    lead = (M,) * options["lead_dims"]
    return dict(
        x=torch.randn((*lead, K), generator=gen).to(dtype),
        w=random_e4m3((N, K), gen),
        w_scale=random_scale(options["w_scale"], N, K, gen, weight=True),
        bias=bias,
    )


def _weight_gemm_args(a):
    return a["x"], a["w"], a["w_scale"], a["bias"]


@register_hostile("fp8_weight_gemm")
def fp8_weight_gemm_hostile() -> HostileSpec:
    return HostileSpec(
        op="fp8_weight_gemm",
        dims=(
            Dim("M", small=9, large=(67,)),
            Dim("K", small=40, large=(300,)),
            Dim("N", small=40, large=(263,)),
        ),
        options={
            "w_scale": ("row", "tensor", "block"),
            "dtype": FLOAT_DTYPES,
            "bias": (None, *FLOAT_DTYPES),
            "lead_dims": (1, 0, 2),
        },
        args=(
            TensorArg("x", FLOAT_DTYPES, None, related=("w",), nonfinite=INF),
            TensorArg("w", E4M3S, 2, related=("x", "w_scale", "bias")),
            TensorArg("w_scale", F32, None, related=("w",)),
            TensorArg("bias", FLOAT_DTYPES, 1, related=("w",), nonfinite=INF),
        ),
        make=_weight_gemm_make,
        call=lambda backend, a: fp8_weight_gemm(*_weight_gemm_args(a), backend=backend),
        reference=lambda a: reference.fp8_weight_gemm(*_weight_gemm_args(a)),
        tol=lambda options: GEMM_TOL[options["dtype"]],
        work=lambda s: s["M"] * s["K"] * s["N"],
    )
