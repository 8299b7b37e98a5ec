"""The INT4 ops: int4_dequantize, int4_gemm and int4_gemm_repack.

For each op: the public function (re-exported by :mod:`bitpress.ops`) with its contract, the
Python argument check (for the fake, the Triton and the reference paths; the compiled backends
check in C++ with the same messages), the fake for ``torch.compile``, the backend
implementations with what each supports, and the op's registry entry (reference, selftest cases,
benchmark).
"""

from __future__ import annotations

import torch

from bitpress._core import backends, ext  # noqa: F401  (ext registers the C++ ops)
from bitpress._core.backends import Capability
from bitpress._core.checks import FLOAT_DTYPES as _FLOAT_DTYPES
from bitpress._core.checks import check_device as _check_device
from bitpress._core.checks import check_dim as _check_dim
from bitpress._core.checks import check_dtype as _check_dtype
from bitpress._core.checks import check_size as _check_size
from bitpress._core.checks import fail as _fail
from bitpress._core.registry import OpSpec, register_op
from bitpress.int4 import cases, reference
from bitpress.int4.layout import LAYOUTS, Int4Layout, Int4MmaTiles, Int4PackedWeight

try:  # triton is optional (it comes with CUDA builds of torch); without it the backend refuses
    from bitpress.triton_kernels import int4_dequantize as tk_int4_dequantize
    from bitpress.triton_kernels import int4_gemm as tk_int4_gemm
except ImportError:  # pragma: no cover
    tk_int4_dequantize = tk_int4_gemm = None

# The Triton int4_gemm kernels use tl.dot / mma.sync (sm_80+); the CUDA kernels are compiled for
# sm_80 and sm_90a (the cuda backend also needs an image that fits the device).
_TRITON_SM80 = Capability(devices=("cuda",), min_cc=(8, 0), interpreter=True)
_CUDA_SM80 = Capability(devices=("cuda",), min_cc=(8, 0), compiled_cuda=True)


# --------------------------------------------------------------------------------------------
# int4_dequantize
# --------------------------------------------------------------------------------------------


def int4_dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    group_size: int = 128,
    dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Unpack GPTQ-packed INT4 weights into a dense matrix.

    .. math:: w[k, n] = (q[k, n] - z[g(k), n]) \cdot s[g(k), n]

    computed in float32 and rounded once (round to nearest even) to ``dtype``.

    Parameters
    ----------
    qweight : Tensor, int32, shape [K/8, N]
        Packed along K: row ``k = 8r + j`` of column ``n`` is bits ``4j..4j+3`` of
        ``qweight[r, n]`` (lowest nibble first), an unsigned value ``q`` in 0..15.
    scales : Tensor, float32 / float16 / bfloat16, shape [G, N]
        Per-group, per-column scales ``s``.
    qzeros : Tensor, int32, shape [G, ceil(N/8)], optional
        Zero points ``z`` packed along N (column ``n = 8c + j`` in bits ``4j..4j+3`` of
        ``qzeros[g, c]``), holding the real zero points (GPTQ "v2"; ``bitpress.formats`` converts
        v1 checkpoints, whose stored zeros are ``z - 1``). ``None``: symmetric, ``z = 8``.
    g_idx : Tensor, int32, shape [K], optional
        Group of each row (act-order checkpoints); values in ``[0, G)``. ``None``:
        ``g(k) = k // group_size``.
    group_size : int
        Rows per group when ``g_idx`` is None (then ``G = ceil(K / group_size)``); ``-1`` means one
        group over all of K.
    dtype : torch.dtype, optional
        Output dtype (float32, float16 or bfloat16); default ``scales.dtype``.
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    Tensor, shape [K, N], ``dtype``, on the device of ``qweight``.

    Notes
    -----
    On CUDA, a ``g_idx`` value outside ``[0, G)`` cannot be reported without a host sync: the
    affected rows come out as NaN. The CPU backends raise.
    """
    _, impl = backends.select("int4_dequantize", qweight.device, backend, scales.dtype)
    return impl(qweight, scales, qzeros, g_idx, group_size, dtype)


def _check_int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype):
    op = "int4_dequantize"
    _check_dtype(op, "qweight", qweight, (torch.int32,))
    _check_dim(op, "qweight", qweight, 2, "[K/8, N]")
    _check_dtype(op, "scales", scales, _FLOAT_DTYPES)
    _check_dim(op, "scales", scales, 2, "[G, N]")
    _check_device(op, "scales", scales, qweight, "qweight")
    K, N, G = qweight.shape[0] * 8, qweight.shape[1], scales.shape[0]
    _check_size(op, "scales", scales, 1, N, "N = qweight.size(1)")
    if not (group_size > 0 or group_size == -1):
        _fail(op, f"group_size must be positive or -1 (one group over K), got {group_size}")
    if g_idx is not None:
        _check_dtype(op, "g_idx", g_idx, (torch.int32,))
        _check_dim(op, "g_idx", g_idx, 1, "[K]")
        if g_idx.shape[0] != K and g_idx.shape[0] % 8 == 0:
            # g_idx [K] is the plain statement of K: a qweight whose rows disagree is the wrong one.
            Kg = g_idx.shape[0]
            _fail(
                op,
                f"qweight.size(0) must be K/8 = {Kg // 8} (K = g_idx.size(0) = {Kg}), got shape "
                f"{list(qweight.shape)}",
            )
        _check_size(op, "g_idx", g_idx, 0, K, "K = 8 * qweight.size(0)")
        _check_device(op, "g_idx", g_idx, qweight, "qweight")
        if G == 0 and K > 0:
            _fail(op, f"scales must have at least one group, got shape {list(scales.shape)}")
    else:
        gs = max(K, 1) if group_size == -1 else group_size
        _check_size(op, "scales", scales, 0, -(-K // gs), "G = ceil(K / group_size)")
    if qzeros is not None:
        _check_dtype(op, "qzeros", qzeros, (torch.int32,))
        _check_dim(op, "qzeros", qzeros, 2, "[G, ceil(N/8)]")
        _check_size(op, "qzeros", qzeros, 0, G, "G = scales.size(0)")
        _check_size(op, "qzeros", qzeros, 1, -(-N // 8), "ceil(N/8)")
        _check_device(op, "qzeros", qzeros, qweight, "qweight")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        _fail(op, f"dtype must be float32, float16 or bfloat16, got {dtype}", TypeError)
    return K, N, G


@torch.library.register_fake("bitpress::int4_dequantize")
def _int4_dequantize_fake(qweight, scales, qzeros, g_idx, group_size, dtype=None):
    K, N, _ = _check_int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)
    return scales.new_empty((K, N), dtype=dtype or scales.dtype)


@backends.register("int4_dequantize", "cpu")
@backends.register("int4_dequantize", "cuda", _CUDA_SM80)
def _int4_dequantize_compiled(qweight, scales, qzeros, g_idx, group_size, dtype):
    return torch.ops.bitpress.int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)


@torch.library.custom_op("bitpress::int4_dequantize_triton", mutates_args=())
def _int4_dequantize_triton(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    _check_int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)
    return tk_int4_dequantize.int4_dequantize(
        qweight, scales, qzeros, g_idx, group_size, dtype or scales.dtype
    )


torch.library.register_fake("bitpress::int4_dequantize_triton")(_int4_dequantize_fake)


@backends.register("int4_dequantize", "triton", _TRITON_SM80)
def _int4_dequantize_triton_backend(qweight, scales, qzeros, g_idx, group_size, dtype):
    return torch.ops.bitpress.int4_dequantize_triton(
        qweight, scales, qzeros, g_idx, group_size, dtype
    )


@backends.register("int4_dequantize", "reference")
def _int4_dequantize_reference(qweight, scales, qzeros, g_idx, group_size, dtype):
    K, _, G = _check_int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)
    if g_idx is not None and K and not torch.compiler.is_compiling():
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= G:
            _fail("int4_dequantize", f"g_idx values must lie in [0, {G}), got [{lo}, {hi}]")
    return reference.int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)


# --------------------------------------------------------------------------------------------
# int4_gemm
# --------------------------------------------------------------------------------------------


def int4_gemm(
    x: torch.Tensor,
    weight: Int4PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    act_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""INT4 weight-only linear layer: ``y = x · Wᵀ + bias``.

    .. math:: W[n, k] = (q[k, n] - z[g(k), n]) \cdot s[g(k), n]

    Parameters
    ----------
    x : Tensor, float32 / float16 / bfloat16, shape [..., K]
        Activations; any leading shape (M = their product, from 1 to thousands).
    weight : bitpress.int4.layout.Int4CpuTiles or Int4MmaTiles
        The weight in a kernel layout, built once at load time by
        ``bitpress.int4.layout.pack(quantized_weight, layout=...)`` (``Int4Linear`` picks the
        layout of its device), N = ``weight.out_features``, Nt = ceil(N / 64), Np = 64 Nt:

        * ``Int4CpuTiles`` (the ``cpu`` backend): qweight int32 [Nt, Kp/8, 64], scales float32
          [Nt, G, 64], zeros uint8 [Nt, G, 64] or None (symmetric), group_starts int32 [G+1]
          in octets, perm int32 [Kp] or None;
        * ``Int4MmaTiles`` (the ``cuda`` and ``triton`` backends): qweight int32
          [Kp/16, Nt*128] (``mma.m16n8k16`` B fragments), scales float32 [G, Np], zeros uint8
          [G, Np] or None, group_starts int32 [G+1] in 16-row k-tiles (uniform groups),
          perm int32 [Kp] or None.

        The op ``torch.ops.bitpress.int4_gemm`` takes these fields by name
        (``weight.op_kwargs()``), with ``layout`` the :class:`Int4Layout` code.
        ``weight.to(device, layout=...)`` converts exactly; the ``reference`` backend reads both.
    bias : Tensor, shape [N], optional
    act_dtype : None or torch.int8, optional
        None (default): the exact path below. ``torch.int8``: W4A8 (opt-in, ``cpu`` and
        ``reference`` backends): each row of x is quantized on the fly to int8,
        ``sx = amax|x[m]| / 127`` (float32; 1 for an all-zero row),
        ``xq = round_half_even(x / sx)`` in float32, and
        ``y[m, n] = sx[m] * sum_k xq[m, k] (q[k, n] - z[g(k), n]) s[g(k), n] + bias[n]``,
        the int8 x int4 products summed exactly in int32 per group (AMX-INT8 ``tdpbssd``,
        AVX512-VNNI ``vpdpbusd`` or scalar), the groups in float32. Faster on CPUs with AMX-INT8
        or VNNI, at the cost of the activation rounding (bench/NOTES.md, W4A8 has its SQNR and
        perplexity). Backward (dx) is the same as the exact path's (straight-through).
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    Tensor, shape [..., N], ``x.dtype``.

    Notes
    -----
    Accumulation is in float32. On CPUs with AVX512_BF16 the bf16/fp16 path multiplies exact bf16
    representations of x (fp16 x as two bf16 terms), so its error is that of float32
    accumulation; float32 x always takes the float32 FMA path. On CUDA (``cuda`` backend) fp16 /
    bf16 x with M <= 64 (``BITPRESS_INT4_CUDA_MAX_M``) runs the Marlin-class kernel, whose
    dequantized weights are rounded once to x's dtype before the tensor-core product; larger M
    and fp32 x dequantize W once and call cuBLAS.

    Values of ``perm`` and ``group_starts`` are checked on the CPU (a perm value outside [-1, K),
    or a row of x named twice, raises). On CUDA (and Triton) a check would cost a host sync: a
    perm value outside [-1, K) gives NaN rows instead, and a repeated row is counted as many
    times as it appears. A non-finite value in row m of x makes y[m, :] NaN on the CPU kernel
    (the zero point is folded with the row's sum), where the reference gives IEEE infinities.
    """
    if not isinstance(weight, Int4PackedWeight):
        _fail(
            "int4_gemm",
            "weight must be an Int4CpuTiles or Int4MmaTiles (bitpress.int4.layout.pack), got "
            f"{type(weight).__name__}",
            TypeError,
        )
    _check_act_dtype(act_dtype)
    _, impl = backends.select("int4_gemm", x.device, backend, x.dtype)
    if act_dtype is None:
        return impl(x, weight, bias)
    return impl(x, weight, bias, act_dtype)


def _check_act_dtype(act_dtype):
    if act_dtype is not None and act_dtype != torch.int8:
        _fail(
            "int4_gemm",
            f"act_dtype must be None (exact activations) or torch.int8 (W4A8), got {act_dtype!r}",
        )


def _check_int4_gemm(
    x, qweight, scales, zeros, group_starts, perm, out_features, layout, bias, backend=None
):
    """Shape/dtype/device checks of int4_gemm for both layouts (named by ``layout``, an
    :class:`Int4Layout` code), with the messages of csrc int4_gemm_args.h; returns (K, N).
    ``backend``: the layout the backend reads, checked first."""
    op = "int4_gemm"
    if layout not in LAYOUTS:
        _fail(op, f"layout must be 0 (Int4CpuTiles) or 1 (Int4MmaTiles), got {layout}")
    if backend is not None and layout != backend:
        want, got = LAYOUTS[backend].__name__, LAYOUTS[layout].__name__
        _fail(
            op,
            f"this backend reads {want} weights, got {got}: convert the weight with "
            f"weight.to(device, layout={want})",
        )
    _check_dtype(op, "x", x, _FLOAT_DTYPES)
    if x.dim() < 1:
        _fail(op, "x must be [..., K], got a 0-D tensor")
    _check_dtype(op, "qweight", qweight, (torch.int32,))
    mma = layout == Int4Layout.MMA_TILES
    _check_dim(
        op, "qweight", qweight, 2 if mma else 3, "[Kp/16, Nt*128]" if mma else "[Nt, Kp/8, 64]"
    )
    lay = "[G, Np]" if mma else "[Nt, G, 64]"
    _check_dtype(op, "scales", scales, (torch.float32,))
    _check_dim(op, "scales", scales, 2 if mma else 3, lay)
    _check_dtype(op, "group_starts", group_starts, (torch.int32,))
    _check_dim(op, "group_starts", group_starts, 1, "[G+1]")
    for name, t in (("qweight", qweight), ("scales", scales), ("group_starts", group_starts)):
        _check_device(op, name, t, x, "x")
    N = out_features
    if N < 0:
        _fail(op, f"out_features must be >= 0, got {N}")
    Nt = -(-N // 64)
    K = x.shape[-1]
    if mma:
        Kp, G = qweight.shape[0] * 16, scales.shape[0]
        _check_size(op, "qweight", qweight, 1, Nt * 128, "128 * ceil(out_features / 64)")
        _check_size(op, "scales", scales, 1, Nt * 64, "Np = 64 * ceil(out_features / 64)")
        if (G == 0 and Kp > 0) or (G > 0 and (Kp // 16) % G):
            _fail(
                op,
                f"the mma layout needs Kp/16 = {Kp // 16} k-tiles split evenly into G = {G} "
                f"groups (scales.size(0)), got qweight shape {list(qweight.shape)}",
            )
        perm_what = "Kp = 16 * qweight.size(0)"
    else:
        Kp, G = qweight.shape[1] * 8, scales.shape[1]
        _check_size(op, "qweight", qweight, 0, Nt, "Nt = ceil(out_features / 64)")
        _check_size(op, "qweight", qweight, 2, 64, "the tile width")
        _check_size(op, "scales", scales, 0, Nt, "Nt = ceil(out_features / 64)")
        _check_size(op, "scales", scales, 2, 64, "the tile width")
        perm_what = "Kp = 8 * qweight.size(1)"
    _check_size(op, "group_starts", group_starts, 0, G + 1, "G + 1 = number of groups + 1")
    if zeros is not None:
        _check_dtype(op, "zeros", zeros, (torch.uint8,))
        _check_dim(op, "zeros", zeros, scales.dim(), lay)
        if zeros.shape != scales.shape:
            _fail(
                op,
                f"zeros must have the shape of scales {list(scales.shape)}, "
                f"got {list(zeros.shape)}",
            )
        _check_device(op, "zeros", zeros, x, "x")
    if perm is not None:
        _check_dtype(op, "perm", perm, (torch.int32,))
        _check_dim(op, "perm", perm, 1, "[Kp]")
        _check_size(op, "perm", perm, 0, Kp, perm_what)
        _check_device(op, "perm", perm, x, "x")
    elif K != Kp:
        _fail(
            op,
            f"x.size(-1) must be K = {Kp} ({perm_what.split('= ')[1]}; the weight has no row "
            f"permutation), got shape {list(x.shape)}",
        )
    if bias is not None:
        _check_dtype(op, "bias", bias, _FLOAT_DTYPES)
        _check_dim(op, "bias", bias, 1, "[N]")
        _check_size(op, "bias", bias, 0, N, "N = out_features")
        _check_device(op, "bias", bias, x, "x")
    return K, N


@torch.library.register_fake("bitpress::int4_gemm")
def _int4_gemm_fake(
    x, qweight, scales, zeros, group_starts, perm, out_features, layout, bias=None, act_dtype=None
):
    _check_act_dtype(act_dtype)
    _, N = _check_int4_gemm(
        x, qweight, scales, zeros, group_starts, perm, out_features, layout, bias
    )
    return x.new_empty((*x.shape[:-1], N))


@backends.register("int4_gemm", "cpu")
@backends.register("int4_gemm", "cuda", _CUDA_SM80)
def _int4_gemm_compiled(x, weight, bias, act_dtype=None):
    return torch.ops.bitpress.int4_gemm(x, *weight.op_args(), bias, act_dtype)


@torch.library.custom_op("bitpress::int4_gemm_triton", mutates_args=())
def _int4_gemm_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_starts: torch.Tensor,
    perm: torch.Tensor | None,
    out_features: int,
    layout: int,
    bias: torch.Tensor | None = None,
    act_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    _check_act_dtype(act_dtype)
    if act_dtype is not None:
        _fail(
            "int4_gemm",
            "act_dtype=torch.int8 (W4A8) is not implemented by the triton backend; use the cpu "
            "backend or act_dtype=None",
            NotImplementedError,
        )
    _check_int4_gemm(
        x, qweight, scales, zeros, group_starts, perm, out_features, layout, bias,
        backend=Int4Layout.MMA_TILES,
    )  # fmt: skip
    return tk_int4_gemm.int4_gemm(x, qweight, scales, zeros, group_starts, perm, out_features, bias)


torch.library.register_fake("bitpress::int4_gemm_triton")(_int4_gemm_fake)


# Autograd: the weight is frozen (quantized), x and bias get gradients, as QLoRA-style adapter
# training on a quantized base needs: dx = dy · W (W [N, K] dequantized), dbias = sum of dy.
# bitpress::int4_gemm has its autograd in C++ (csrc/int4/int4_gemm_autograd_torch.cpp: free when
# no gradient is needed), which calls int4_gemm_backward below for dx; the Python-defined
# int4_gemm_triton registers the same formulas here. The backward dequantizes W from the kernel
# layout with plain torch ops (O(K N) memory traffic per call, no caching: the module keeps one
# copy of its weight).


@torch.library.custom_op("bitpress::int4_gemm_backward", mutates_args=())
def _int4_gemm_backward_op(
    grad: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_starts: torch.Tensor,
    perm: torch.Tensor | None,
    in_features: int,
    out_features: int,
    layout: int,
    x_dtype: torch.dtype,
) -> torch.Tensor:
    """dx [..., K] = dy [..., N] · W [N, K], rounded to ``x_dtype``."""
    weight = LAYOUTS[layout](
        qweight, scales, zeros, group_starts, perm, in_features, out_features, torch.float32
    )
    w = reference.dequantize_packed(weight, torch.float32).to(grad.device)  # [N, K]
    return (grad.to(torch.float32) @ w).to(x_dtype)


@_int4_gemm_backward_op.register_fake
def _(grad, qweight, scales, zeros, group_starts, perm, in_features, out_features, layout, x_dtype):
    return grad.new_empty((*grad.shape[:-1], in_features), dtype=x_dtype)


def _int4_gemm_setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, group_starts, perm, out_features, layout, bias = inputs[:9]
    if scales.requires_grad:
        _fail(
            "int4_gemm",
            "the quantized weight is frozen: scales must not require grad (gradients flow to x "
            "and bias only)",
        )
    ctx.save_for_backward(qweight, scales, zeros, group_starts, perm)
    ctx.meta = (x.shape[-1], out_features, layout, x.dtype, bias is not None)


def _int4_gemm_backward(ctx, grad):
    qweight, scales, zeros, group_starts, perm = ctx.saved_tensors
    K, N, layout, x_dtype, has_bias = ctx.meta
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.bitpress.int4_gemm_backward(
            grad, qweight, scales, zeros, group_starts, perm, K, N, layout, x_dtype
        )
    grad_bias = grad.reshape(-1, N).sum(0) if has_bias and ctx.needs_input_grad[8] else None
    return grad_x, None, None, None, None, None, None, None, grad_bias, None


torch.library.register_autograd(
    "bitpress::int4_gemm_triton", _int4_gemm_backward, setup_context=_int4_gemm_setup_context
)


@backends.register("int4_gemm", "triton", _TRITON_SM80)
def _int4_gemm_triton_backend(x, weight, bias, act_dtype=None):
    return torch.ops.bitpress.int4_gemm_triton(x, *weight.op_args(), bias, act_dtype)


def _check_int4_gemm_values(x, weight):
    """The value checks of the CPU glue (CPU tensors, outside torch.compile: they sync):
    group_starts and perm. On CUDA they would cost a host sync: a bad perm gives NaN there."""
    if weight.qweight.device.type != "cpu" or torch.compiler.is_compiling():
        return
    op, K = "int4_gemm", x.shape[-1]
    g = weight.group_starts.long()
    G = g.numel() - 1
    if isinstance(weight, Int4MmaTiles):
        tiles = weight.qweight.shape[0] // max(G, 1) if G else 0
        expect = torch.arange(G + 1) * tiles
        if not torch.equal(g, expect):
            _fail(op, f"group_starts must be arange(G + 1) * {tiles} (uniform groups, in k-tiles)")
    else:
        end = weight.qweight.shape[1]
        if G and (int(g[0]) != 0 or int(g[-1]) != end):
            _fail(
                op, f"group_starts must run from 0 to Kp/8 = {end}, got [{int(g[0])}, {int(g[-1])}]"
            )
        dec = (g[1:] < g[:-1]).nonzero()
        if len(dec):
            i = int(dec[0])
            _fail(
                op,
                f"group_starts must be non-decreasing, got {int(g[i])} then {int(g[i + 1])} at {i}",
            )
    if weight.perm is not None:
        p = weight.perm.long()
        bad = ((p < -1) | (p >= K)).nonzero()
        if len(bad):
            i = int(bad[0])
            _fail(
                op,
                f"perm values must lie in [-1, {K}) (K = x.size(-1)), got perm[{i}] = {int(p[i])}",
            )
        rows = p[p >= 0]
        if rows.numel() != rows.unique().numel():
            srt = rows.sort().values
            v = int(srt[1:][srt.diff() == 0][0])
            _fail(op, f"perm must name each row of x at most once, got row {v} more than once")


@backends.register("int4_gemm", "reference")
def _int4_gemm_reference(x, weight, bias, act_dtype=None):
    _check_int4_gemm(x, **weight.op_kwargs(), bias=bias)
    _check_int4_gemm_values(x, weight)
    return reference.int4_gemm(x, weight, bias, act_dtype=act_dtype)


def int4_gemm_repack(
    qweight: torch.Tensor, perm: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    r"""Repack GPTQ INT4 weights into the GPU mma layout (``int4_mma_layout.h``), once at load.

    Parameters
    ----------
    qweight : Tensor, int32, shape [K/8, N]
        GPTQ packing along K (row ``k = 8r + j`` in bits ``4j..4j+3`` of ``qweight[r, n]``).
    perm : Tensor, int32, shape [Kp], optional
        Source row of each packed row, ``-1`` for a zero (padding) row, ``Kp % 16 == 0``
        (``int4_layout.mma_row_order``). ``None``: the identity (then ``K % 16 == 0``).
    backend : str, optional
        Force a backend (``cpu``, ``cuda``, ``reference``).

    Returns
    -------
    Tensor, int32, shape [Kp/16, 128 * ceil(N/64)], on the device of ``qweight``: word
    ``kt * Nt*128 + nt*128 + 4*lane + w`` holds lane ``lane``'s ``mma.m16n8k16`` B fragments of
    n8-blocks ``2w, 2w+1`` of the k16 x n64 tile (kt, nt); columns past N are zero.
    """
    _, impl = backends.select("int4_gemm_repack", qweight.device, backend)
    return impl(qweight, perm)


def _check_int4_gemm_repack(qweight, perm):
    op = "int4_gemm_repack"
    _check_dtype(op, "qweight", qweight, (torch.int32,))
    _check_dim(op, "qweight", qweight, 2, "[K/8, N]")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if perm is not None:
        _check_dtype(op, "perm", perm, (torch.int32,))
        _check_dim(op, "perm", perm, 1, "[Kp]")
        _check_device(op, "perm", perm, qweight, "qweight")
        Kp = perm.shape[0]
    else:
        Kp = K
    if Kp % 16:
        what = "perm.size(0)" if perm is not None else "K = 8 * qweight.size(0) (no perm)"
        _fail(op, f"{what} must be a multiple of 16 (the mma k-tile), got {Kp}")
    return Kp, N


@torch.library.register_fake("bitpress::int4_gemm_repack")
def _int4_gemm_repack_fake(qweight, perm=None):
    Kp, N = _check_int4_gemm_repack(qweight, perm)
    return qweight.new_empty((Kp // 16, -(-N // 64) * 128))


@backends.register("int4_gemm_repack", "cpu")
@backends.register("int4_gemm_repack", "cuda", _CUDA_SM80)
def _int4_gemm_repack_compiled(qweight, perm):
    return torch.ops.bitpress.int4_gemm_repack(qweight, perm)


@backends.register("int4_gemm_repack", "reference")
def _int4_gemm_repack_reference(qweight, perm):
    _check_int4_gemm_repack(qweight, perm)
    if perm is not None and perm.numel() and not torch.compiler.is_compiling():
        lo, hi, K = int(perm.min()), int(perm.max()), qweight.shape[0] * 8
        if lo < -1 or hi >= K:
            _fail("int4_gemm_repack", f"perm values must lie in [-1, {K}), got [{lo}, {hi}]")
    return reference.int4_gemm_repack(qweight, perm)


register_op(
    OpSpec(
        "int4_dequantize",
        "int4",
        int4_dequantize,
        reference.int4_dequantize,
        cases=cases.int4_dequantize_cases,
        bench="bench/bench_int4_dequantize.py",
    )
)
register_op(
    OpSpec(
        "int4_gemm",
        "int4",
        int4_gemm,
        reference.int4_gemm,
        cases=cases.int4_gemm_cases,
        gpu_cases=cases.int4_gemm_gpu_cases,
        bench="bench/bench_int4_gemm.py",
    )
)
register_op(
    OpSpec(
        "int4_gemm_repack",
        "int4",
        int4_gemm_repack,
        reference.int4_gemm_repack,
        cases=cases.int4_gemm_repack_cases,
        bench="bench/bench_int4_gemm.py",
    )
)
