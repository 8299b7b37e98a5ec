"""The hostile-input descriptions of the 2:4 ops (the suite is ``tests/hostile``; the data model
is :class:`bitpress._core.registry.HostileSpec`).

x is never drawn with non-finite values: the read-stream paths skip the pruned positions (a
NaN there is not read), while the panel and dense paths, like ``F.linear`` on the dense weight,
multiply it by zero; the contract leaves that case open. Non-finite weights, scales, zeros and
biases are drawn.
"""

from __future__ import annotations

import torch

from bitpress._core.checks import FLOAT_DTYPES
from bitpress._core.registry import Dim, HostileSpec, TensorArg, register_hostile
from bitpress.sparse24 import reference
from bitpress.sparse24.cases import GEMM_TOL, random_24, random_int4_24
from bitpress.sparse24.layout import Sparse24Layout, compress
from bitpress.sparse24.ops import (
    COMPRESS_DTYPES,
    sparse24_compress,
    sparse24_gemm,
    sparse24_int4_gemm,
)

INF = (float("nan"), float("inf"), float("-inf"))
GROUP_SIZES = (8, 16, 32, 48, 128, -1)


def _bad_meta(a, gen):
    """Metadata with one unordered nibble (idx0 >= idx1), at a random place."""
    meta = a["meta"]
    if not meta.numel():
        return []
    bad = []
    for nib in (0x0, 0x5, 0x6, 0xF):
        m = meta.clone()
        i = int(torch.randint(0, m.numel(), (1,), generator=gen))
        flat = m.view(-1)
        flat[i] = (int(flat[i]) & 0xF0) | nib
        bad.append(("meta", {**a, "meta": m}))
    return bad


# --------------------------------------------------------------------------------------------
# sparse24_compress
# --------------------------------------------------------------------------------------------


def _compress_make(sizes, options, gen, backend):
    w = random_24(sizes["N"], sizes["K"], torch.float32, gen, options["fill"])
    return dict(w=w.to(options["dtype"]))


def _compress_bad_values(a, gen):
    w = a["w"]
    N, K = w.shape
    if not w.numel():
        return []
    n = int(torch.randint(0, N, (1,), generator=gen))
    g = int(torch.randint(0, K // 4, (1,), generator=gen))
    w2 = w.clone()
    w2[n, 4 * g : 4 * g + 3] = torch.tensor(1.0).to(w.dtype)
    return [("w", {**a, "w": w2})]


@register_hostile("sparse24_compress")
def sparse24_compress_hostile() -> HostileSpec:
    return HostileSpec(
        op="sparse24_compress",
        dims=(Dim("N", small=40, large=(263,)), Dim("K", small=12, large=(520,), multiple=8)),
        options={"dtype": COMPRESS_DTYPES, "fill": (1.0, 0.5, 0.0)},
        # An expanded (stride-0) view of a valid weight repeats its nonzeros: not a 2:4 weight.
        args=(TensorArg("w", COMPRESS_DTYPES, 2, expandable=False),),
        make=_compress_make,
        call=lambda backend, a: sparse24_compress(a["w"], backend=backend),
        reference=lambda a: reference.sparse24_compress(a["w"]),
        tol=lambda options: 0.0,
        bad_values=_compress_bad_values,
        work=lambda s: s["N"] * s["K"],
    )


# --------------------------------------------------------------------------------------------
# sparse24_gemm
# --------------------------------------------------------------------------------------------


def _gemm_make(sizes, options, gen, backend):
    M, K, N = sizes["M"], sizes["K"], sizes["N"]
    dtype = options["dtype"]
    values, meta = compress(random_24(N, K, dtype, gen, options["fill"]))
    lead = (M,) * options["lead_dims"]
    bias = None
    if options["bias"] is not None:
        bias = torch.randn(N, generator=gen).to(options["bias"])
    return dict(
        x=torch.randn((*lead, K), generator=gen).to(dtype),
        values=values,
        meta=meta,
        bias=bias,
        layout=int(Sparse24Layout.ROW),
    )


def _gemm_args(a):
    return a["x"], a["values"], a["meta"], a["bias"]


@register_hostile("sparse24_gemm")
def sparse24_gemm_hostile() -> HostileSpec:
    return HostileSpec(
        op="sparse24_gemm",
        dims=(
            Dim("M", small=20, large=(67,)),
            Dim("K", small=12, large=(520,), multiple=8),
            Dim("N", small=70, large=(263,)),
        ),
        options={
            "dtype": FLOAT_DTYPES,
            "bias": (None, *FLOAT_DTYPES),
            "lead_dims": (1, 0, 2),
            "fill": (1.0, 0.6),
        },
        args=(
            TensorArg("x", FLOAT_DTYPES, None, related=("values", "meta")),
            TensorArg("values", FLOAT_DTYPES, 2, related=("x", "meta"), nonfinite=INF),
            TensorArg("meta", (torch.uint8,), 2, related=("values", "x")),
            TensorArg("bias", FLOAT_DTYPES, 1, related=("values", "meta"), nonfinite=INF),
        ),
        make=_gemm_make,
        call=lambda backend, a: sparse24_gemm(*_gemm_args(a), layout=a["layout"], backend=backend),
        reference=lambda a: reference.sparse24_gemm(*_gemm_args(a), a["layout"]),
        tol=lambda options: GEMM_TOL[options["dtype"]],
        bad_values=_bad_meta,
        work=lambda s: s["M"] * s["K"] * s["N"],
    )


# --------------------------------------------------------------------------------------------
# sparse24_int4_gemm
# --------------------------------------------------------------------------------------------


def _int4_make(sizes, options, gen, backend):
    M, K, N = sizes["M"], sizes["K"], sizes["N"]
    gs = options["group_size"]
    qv, meta, scales, zeros = random_int4_24(N, K, gs, options["sym"], options["scales_dtype"], gen)
    dtype = options["dtype"]
    lead = (M,) * options["lead_dims"]
    bias = None
    if options["bias"] is not None:
        bias = torch.randn(N, generator=gen).to(options["bias"])
    return dict(
        x=torch.randn((*lead, K), generator=gen).to(dtype),
        qvalues=qv,
        meta=meta,
        scales=scales,
        zeros=zeros,
        group_size=gs,
        bias=bias,
        layout=int(Sparse24Layout.ROW),
    )


def _int4_args(a):
    return a["x"], a["qvalues"], a["meta"], a["scales"], a["zeros"]


def _int4_bad_values(a, gen):
    bad = _bad_meta(a, gen)
    for v in (0, 12, -2, 7):
        bad.append(("group_size", {**a, "group_size": v}))
    return bad


@register_hostile("sparse24_int4_gemm")
def sparse24_int4_gemm_hostile() -> HostileSpec:
    return HostileSpec(
        op="sparse24_int4_gemm",
        dims=(
            Dim("M", small=20, large=(67,)),
            Dim("K", small=10, large=(528,), multiple=16),
            Dim("N", small=70, large=(263,)),
        ),
        options={
            "group_size": GROUP_SIZES,
            "sym": (True, False),
            "dtype": FLOAT_DTYPES,
            "scales_dtype": FLOAT_DTYPES,
            "bias": (None, *FLOAT_DTYPES),
            "lead_dims": (1, 0, 2),
        },
        args=(
            TensorArg("x", FLOAT_DTYPES, None, related=("qvalues", "meta")),
            TensorArg("qvalues", (torch.int32,), 2, related=("x", "meta", "scales", "zeros")),
            TensorArg("meta", (torch.uint8,), 2, related=("qvalues", "x")),
            TensorArg("scales", FLOAT_DTYPES, 2, related=("qvalues", "zeros", "x"), nonfinite=INF),
            TensorArg("zeros", FLOAT_DTYPES, 2, related=("scales", "qvalues", "x"), nonfinite=INF),
            TensorArg("bias", FLOAT_DTYPES, 1, related=("qvalues", "scales"), nonfinite=INF),
        ),
        make=_int4_make,
        call=lambda backend, a: sparse24_int4_gemm(
            *_int4_args(a),
            group_size=a["group_size"],
            bias=a["bias"],
            layout=a["layout"],
            backend=backend,
        ),
        reference=lambda a: reference.sparse24_int4_gemm(
            *_int4_args(a), a["group_size"], a["bias"], a["layout"]
        ),
        tol=lambda options: GEMM_TOL[options["dtype"]],
        bad_values=_int4_bad_values,
        work=lambda s: s["M"] * s["K"] * s["N"],
    )
