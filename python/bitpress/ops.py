"""Public functional API: one function per op, each forwarding to ``torch.ops.bitpress.*``.

Every op has a fake (meta) implementation registered here, so that it traces under
``torch.compile(fullgraph=True)``, and an implementation per backend (see bitpress.backends for
how one is chosen). Argument checks live in the C++ glue for the ``cpu``/``cuda`` backends and in
the ``_check_*`` functions here for the fake, ``triton`` and ``reference`` paths; both name the
argument and what was expected.
"""

from __future__ import annotations

import torch

from bitpress import _ext, backends, reference  # noqa: F401  (_ext registers the C++ ops)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(op: str, msg: str, exc: type[Exception] = RuntimeError) -> None:
    raise exc(f"{op}: {msg}")


def _check_dtype(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        _fail(op, f"{name} must be {allowed}, got {str(t.dtype).removeprefix('torch.')}", TypeError)


def _check_dim(op: str, name: str, t: torch.Tensor, dim: int, shape: str) -> None:
    if t.dim() != dim:
        _fail(op, f"{name} must be {dim}-D {shape}, got shape {list(t.shape)}")


def _check_size(op: str, name: str, t: torch.Tensor, d: int, expected: int, what: str) -> None:
    if t.shape[d] != expected:
        _fail(op, f"{name}.size({d}) must be {expected} ({what}), got shape {list(t.shape)}")


def _check_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


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
    _, impl = backends.select("int4_dequantize", qweight.device, backend)
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
@backends.register("int4_dequantize", "cuda")
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
    from bitpress.triton_kernels import int4_dequantize as tk

    K, N, G = _check_int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype)
    return tk.int4_dequantize(qweight, scales, qzeros, g_idx, group_size, dtype or scales.dtype)


torch.library.register_fake("bitpress::int4_dequantize_triton")(_int4_dequantize_fake)


@backends.register("int4_dequantize", "triton")
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
