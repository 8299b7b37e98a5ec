"""The hostile-input descriptions of the INT4 ops and of the GPTQ checkpoint format (the suite is
``tests/hostile``; the data model is :class:`bitpress._core.registry.HostileSpec`).

Each op says, as plain data, its sizes, its tensor arguments (accepted dtypes, rank, the
arguments their sizes are checked against, whether a stride-0 view or a non-finite value is
valid), and, as plain torch, how to build valid arguments from drawn sizes in the layout a
backend reads, how to call a backend and what the result must be. The suite draws the sizes,
options, strides, storage offsets and corruptions with hypothesis (a test dependency).
"""

from __future__ import annotations

import torch

from bitpress._core.checks import FLOAT_DTYPES
from bitpress._core.registry import (
    CheckpointHostile,
    Dim,
    HostileSpec,
    TensorArg,
    quantize_handler,
    register_checkpoint_hostile,
    register_hostile,
)
from bitpress.int4 import checkpoint as _checkpoint  # noqa: F401  (registers "gptq" first)
from bitpress.int4 import reference
from bitpress.int4.config import Int4Config
from bitpress.int4.layout import LAYOUTS, Int4CpuTiles, Int4MmaTiles, mma_row_order, pack
from bitpress.int4.ops import int4_dequantize, int4_gemm, int4_gemm_repack
from bitpress.int4.packing import pack_int4_along_k, pack_int4_along_n
from bitpress.int4.quantized import QuantizedWeight

I32 = (torch.int32,)
INF = (float("nan"), float("inf"), float("-inf"))
# The selftest's bounds (bitpress.int4.cases): float32 accumulation, one rounding to x.dtype.
GEMM_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GROUP_SIZES = (8, 16, 32, 64, -1)


def _groups(K: int, group_size: int) -> int:
    return -(-K // (max(K, 1) if group_size == -1 else group_size))


def _g_idx(K: int, G: int, group_size: int, act_order: bool, gen) -> torch.Tensor:
    if act_order:
        return torch.randint(0, max(G, 1), (K,), generator=gen, dtype=torch.int32)
    return (torch.arange(K) // (max(K, 1) if group_size == -1 else group_size)).int()


def _scales(shape, dtype, gen) -> torch.Tensor:
    """Scales of both signs and a spread of magnitudes (negative scales are valid data)."""
    s = torch.randn(shape, generator=gen) * 0.02
    return s.to(dtype)


# --------------------------------------------------------------------------------------------
# int4_dequantize
# --------------------------------------------------------------------------------------------


def _dequantize_make(sizes, options, gen, backend):
    K, N = sizes["K"], sizes["N"]
    gs, act = options["group_size"], options["act_order"]
    G = sizes["G"] if act else _groups(K, gs)
    q = torch.randint(0, 16, (K, N), generator=gen)
    qzeros = None
    if options["asym"]:
        qzeros = pack_int4_along_n(torch.randint(0, 16, (G, N), generator=gen))
    return dict(
        qweight=pack_int4_along_k(q),
        scales=_scales((G, N), options["scales_dtype"], gen),
        qzeros=qzeros,
        g_idx=_g_idx(K, G, gs, act, gen) if act or options["explicit_g_idx"] else None,
        group_size=gs,
        dtype=options["dtype"],
    )


def _dequantize_args(a):
    return a["qweight"], a["scales"], a["qzeros"], a["g_idx"], a["group_size"], a["dtype"]


def _dequantize_bad_values(a, gen):
    bad = []
    if a["g_idx"] is not None and a["g_idx"].numel():
        G = a["scales"].shape[0]
        for v in (G, -1, 2**31 - 1):
            g = a["g_idx"].clone()
            g[int(torch.randint(0, g.numel(), (1,), generator=gen))] = v
            bad.append(("g_idx", {**a, "g_idx": g}))
    for v in (0, -2, -(2**31)):
        bad.append(("group_size", {**a, "group_size": v, "g_idx": None}))
    return bad


@register_hostile("int4_dequantize")
def int4_dequantize_hostile() -> HostileSpec:
    return HostileSpec(
        op="int4_dequantize",
        dims=(
            Dim("K", small=12, large=(512,), multiple=8),
            Dim("N", small=70, large=(1031,)),
            Dim("G", small=6, min=1),
        ),
        options={
            "group_size": GROUP_SIZES,
            "act_order": (False, True),
            "explicit_g_idx": (False, True),
            "asym": (False, True),
            "scales_dtype": FLOAT_DTYPES,
            "dtype": (None, *FLOAT_DTYPES),
        },
        args=(
            TensorArg("qweight", I32, 2, related=("scales", "g_idx", "qzeros")),
            TensorArg(
                "scales", FLOAT_DTYPES, 2, related=("qweight", "qzeros", "g_idx"), nonfinite=INF
            ),
            TensorArg("qzeros", I32, 2, related=("scales", "qweight")),
            TensorArg("g_idx", I32, 1, related=("qweight", "scales")),
        ),
        make=_dequantize_make,
        call=lambda backend, a: int4_dequantize(*_dequantize_args(a), backend=backend),
        reference=lambda a: reference.int4_dequantize(*_dequantize_args(a)),
        tol=lambda options: 0.0,
        bad_values=_dequantize_bad_values,
        work=lambda s: s["K"] * s["N"],
    )


# --------------------------------------------------------------------------------------------
# int4_gemm: the weight's fields are arguments of their own (the schema's names)
# --------------------------------------------------------------------------------------------

_WEIGHT_FIELDS = ("qweight", "scales", "zeros", "group_starts", "perm")


def _gemm_layout(backend: str, options: dict) -> type:
    if backend in ("cuda", "triton"):
        return Int4MmaTiles
    if backend == "cpu":
        return Int4CpuTiles
    return Int4MmaTiles if options["reference_layout"] == "mma" else Int4CpuTiles


def _gemm_make(sizes, options, gen, backend):
    K, N, M = sizes["K"], sizes["N"], sizes["M"]
    gs, act = options["group_size"], options["act_order"]
    G = sizes["G"] if act else _groups(K, gs)
    if K == 0:
        G = 0
    q = torch.randint(0, 16, (K, N), generator=gen).to(torch.uint8)
    zeros = (
        torch.randint(0, 16, (G, N), generator=gen).to(torch.uint8)
        if options["asym"]
        else torch.full((G, N), 8, dtype=torch.uint8)
    )
    qw = QuantizedWeight(
        q, _scales((G, N), torch.float16, gen), zeros, _g_idx(K, G, gs, act, gen), gs, True
    )
    w = pack(qw, layout=_gemm_layout(backend, options))
    dtype = options["dtype"]
    lead = (M,) * options["lead_dims"]
    x = torch.randn((*lead, K), generator=gen).to(dtype)
    bias = None
    if options["bias"] is not None:
        bias = torch.randn(N, generator=gen).to(options["bias"])
    a = {f: getattr(w, f) for f in _WEIGHT_FIELDS}
    return dict(
        x=x,
        **a,
        out_features=N,
        layout=int(w.layout),
        bias=bias,
        in_features=K,
        scale_dtype=w.scale_dtype,
    )


def _gemm_weight(a):
    fields = {f: a[f] for f in _WEIGHT_FIELDS}
    return LAYOUTS[a["layout"]](
        **fields,
        in_features=a["in_features"],
        out_features=a["out_features"],
        scale_dtype=a["scale_dtype"],
    )


def _gemm_bad_values(a, gen):
    bad = []
    perm = a["perm"]
    K = a["x"].shape[-1]
    if perm is not None and perm.numel():
        i = int(torch.randint(0, perm.numel(), (1,), generator=gen))
        for v in (K, -2, 2**31 - 1):
            p = perm.clone()
            p[i] = v
            bad.append(("perm", {**a, "perm": p}))
        rows = (perm >= 0).nonzero().flatten()
        if rows.numel() >= 2:
            p = perm.clone()
            p[rows[1]] = p[rows[0]]
            bad.append(("perm", {**a, "perm": p}))
    gst = a["group_starts"]
    if gst.numel() >= 2:
        g = gst.clone()
        g[-1] += 1
        bad.append(("group_starts", {**a, "group_starts": g}))
        if gst.numel() >= 3 and int(gst[1]) > 0:
            g = gst.clone()
            g[1] = int(g[2]) + 1
            bad.append(("group_starts", {**a, "group_starts": g}))
    return bad


def _gemm_tol(options):
    return GEMM_TOL[options["dtype"]]


@register_hostile("int4_gemm")
def int4_gemm_hostile() -> HostileSpec:
    return HostileSpec(
        op="int4_gemm",
        dims=(
            Dim("M", small=9, large=(67,)),
            Dim("K", small=12, large=(520,), multiple=8),
            Dim("N", small=70, large=(263,)),
            Dim("G", small=5, min=1),
        ),
        options={
            "group_size": GROUP_SIZES,
            "act_order": (False, True),
            "asym": (False, True),
            "dtype": FLOAT_DTYPES,
            "bias": (None, *FLOAT_DTYPES),
            "lead_dims": (1, 0, 2),
            "reference_layout": ("cpu", "mma"),
        },
        args=(
            TensorArg(
                "x", FLOAT_DTYPES, None, related=("qweight", "perm", "scales"), nonfinite=INF
            ),
            TensorArg("qweight", I32, None, related=("x", "scales", "perm", "group_starts")),
            TensorArg(
                "scales", (torch.float32,), None, related=("qweight", "zeros", "group_starts")
            ),
            TensorArg("zeros", (torch.uint8,), None, related=("scales",)),
            TensorArg("group_starts", I32, 1, related=("scales", "qweight"), expandable=False),
            TensorArg("perm", I32, 1, related=("qweight", "x"), expandable=False),
            TensorArg("bias", FLOAT_DTYPES, 1, related=("qweight", "scales"), nonfinite=INF),
        ),
        make=_gemm_make,
        call=lambda backend, a: int4_gemm(a["x"], _gemm_weight(a), a["bias"], backend=backend),
        reference=lambda a: reference.int4_gemm(a["x"], _gemm_weight(a), a["bias"]),
        tol=_gemm_tol,
        bad_values=_gemm_bad_values,
        work=lambda s: s["M"] * s["K"] * s["N"],
    )


# --------------------------------------------------------------------------------------------
# int4_gemm_repack
# --------------------------------------------------------------------------------------------


def _repack_make(sizes, options, gen, backend):
    K, N = sizes["K"], sizes["N"]
    q = torch.randint(0, 16, (K, N), generator=gen)
    perm = None
    if options["perm"]:
        G = sizes["G"]
        g = torch.randint(0, G, (K,), generator=gen)
        perm = mma_row_order(g, G)[0].int()
    elif K % 16:
        q = torch.cat([q, torch.randint(0, 16, (8, N), generator=gen)])
    return dict(qweight=pack_int4_along_k(q), perm=perm)


def _repack_bad_values(a, gen):
    perm = a["perm"]
    if perm is None or not perm.numel():
        return []
    K = a["qweight"].shape[0] * 8
    bad = []
    for v in (K, -2, 2**31 - 1):
        p = perm.clone()
        p[int(torch.randint(0, p.numel(), (1,), generator=gen))] = v
        bad.append(("perm", {**a, "perm": p}))
    return bad


@register_hostile("int4_gemm_repack")
def int4_gemm_repack_hostile() -> HostileSpec:
    return HostileSpec(
        op="int4_gemm_repack",
        dims=(
            Dim("K", small=12, large=(1000,), multiple=8),
            Dim("N", small=70, large=(1031,)),
            Dim("G", small=5, min=1),
        ),
        options={"perm": (False, True)},
        args=(
            TensorArg("qweight", I32, 2, related=("perm",)),
            TensorArg("perm", I32, 1, related=("qweight",), expandable=False),
        ),
        make=_repack_make,
        call=lambda backend, a: int4_gemm_repack(a["qweight"], a["perm"], backend=backend),
        reference=lambda a: reference.int4_gemm_repack(a["qweight"], a["perm"]),
        tol=lambda options: 0.0,
        bad_values=_repack_bad_values,
        work=lambda s: s["K"] * s["N"],
    )


# --------------------------------------------------------------------------------------------
# The GPTQ checkpoint format
# --------------------------------------------------------------------------------------------


def _quantize_gptq(model):
    """RTN, asymmetric, group 32: ``quantize_`` through the registry (this module sits below
    :mod:`bitpress.quantize`)."""
    config = Int4Config(group_size=32, sym=False)
    return quantize_handler(config)(model, config)


@register_checkpoint_hostile("gptq")
def gptq_checkpoint_hostile() -> CheckpointHostile:
    floats = (torch.float16, torch.bfloat16, torch.float32)
    return CheckpointHostile(
        quantize=_quantize_gptq,
        tensors={
            "qweight": (I32, 2),
            "qzeros": (I32, 2),
            "scales": (floats, 2),
            "g_idx": (I32, 1),
        },
        required=("qweight", "qzeros", "scales"),
        save_options=({"checkpoint_format": "gptq"}, {"checkpoint_format": "gptq_v2"}),
    )
