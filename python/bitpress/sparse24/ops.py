"""The 2:4 sparse ops: sparse24_compress, sparse24_gemm and sparse24_int4_gemm.

For each op: the public function (re-exported by :mod:`bitpress.ops`) with its contract, the
Python argument check (for the fake and the reference paths; the compiled backends check in C++,
``csrc/sparse24/*_torch.cpp``, with the same messages), the fake for ``torch.compile``, the
backend implementations with what each supports, and the op's registry entry.

Backends: ``cpu`` (C++, ``ROW`` layout), ``cuda`` (``sparse24_gemm`` on sparse tensor cores,
sm_80+, ``MMA`` layout; registered only when ``bitpress._C`` holds a CUDA kernel for it),
``triton`` (see the marked place below), ``reference`` (plain torch, every layout it can read).
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
from bitpress.sparse24 import cases, reference
from bitpress.sparse24.layout import (
    Sparse24Layout,
    check_k,
    invalid_nibble,
    meta_message,
    pattern_message,
    pattern_violation,
)

# Dtypes of a dense weight sparse24_compress accepts (E4M3 for compressed-tensors' FP8 variant).
COMPRESS_DTYPES = (*_FLOAT_DTYPES, torch.float8_e4m3fn)
_LAYOUT_NAMES = {int(v): v.name for v in Sparse24Layout}


def _has_kernel(op: str, key: str) -> bool:
    """Whether bitpress._C registered an implementation of ``bitpress::<op>`` for dispatch key
    ``key``: a backend whose kernel is not compiled in must never be chosen."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"bitpress::{op}", key)
    except RuntimeError:  # no such op
        return False


# mma.sp (m16n8k32 bf16/fp16) exists from sm_80; the kernel reads the MMA layout.
_CUDA_SM80 = Capability(devices=("cuda",), min_cc=(8, 0), compiled_cuda=True)


# --------------------------------------------------------------------------------------------
# sparse24_compress
# --------------------------------------------------------------------------------------------


def sparse24_compress(
    w: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Compress a dense weight with the 2:4 pattern into the interchange format.

    Parameters
    ----------
    w : Tensor, float32 / float16 / bfloat16 / float8_e4m3fn, shape [N, K]
        At most 2 nonzeros (neither +0.0 nor -0.0) in every group of 4 consecutive weights along
        K; K a multiple of 8.
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    values : Tensor, shape [N, K/2], ``w.dtype``
        The two kept weights of each group in K order (a group with fewer than 2 nonzeros keeps
        zeros at its lowest free positions).
    meta : Tensor, uint8, shape [N, K/8]
        One nibble ``idx0 | idx1 << 2`` per group (``idx0 < idx1``), the lower group in the low
        nibble (:mod:`bitpress.sparse24.layout`).

    Raises
    ------
    RuntimeError
        ``sparse24_compress: w values must have the 2:4 pattern ...: row r, group g ...``,
        naming the first group (row-major) with more than 2 nonzeros.
    """
    _, impl = backends.select("sparse24_compress", w.device, backend, w.dtype)
    return impl(w)


def _check_compress(w):
    op = "sparse24_compress"
    _check_dtype(op, "w", w, COMPRESS_DTYPES)
    _check_dim(op, "w", w, 2, "[N, K]")
    check_k(op, "w.size(1)", w.shape[1])
    return w.shape


def _compress_fake(w):
    N, K = _check_compress(w)
    return w.new_empty((N, K // 2)), w.new_empty((N, K // 8), dtype=torch.uint8)


@backends.register("sparse24_compress", "reference")
def _compress_reference(w):
    _check_compress(w)
    if not torch.compiler.is_compiling():
        bad = pattern_violation(w)
        if bad is not None:
            _fail("sparse24_compress", pattern_message(*bad))
    return reference.sparse24_compress(w)


# --------------------------------------------------------------------------------------------
# sparse24_gemm
# --------------------------------------------------------------------------------------------


def sparse24_gemm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    layout: int = Sparse24Layout.ROW,
    backend: str | None = None,
) -> torch.Tensor:
    r"""2:4 sparse linear layer: ``y = x · Wᵀ + bias``, W [N, K] the dense weight of
    (values, meta).

    Parameters
    ----------
    x : Tensor, float32 / float16 / bfloat16, shape [..., K]
        Activations (M = product of the leading dims); K a multiple of 8.
    values : Tensor, ``x.dtype``, shape [N, K/2]
        The kept weights (:mod:`bitpress.sparse24.layout`).
    meta : Tensor
        The positions of the kept weights: uint8 [N, K/8] in the ``ROW`` layout (nibbles
        ``idx0 | idx1 << 2``, ``idx0 < idx1``); the ``MMA`` layout's own tensor otherwise.
    bias : Tensor, float32 / float16 / bfloat16, shape [N], optional
    layout : Sparse24Layout
        ``ROW`` (the ``cpu`` and ``reference`` backends) or ``MMA`` (``cuda``; the reference
        converts it back).
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    Tensor, shape [..., N], ``x.dtype``.

    Notes
    -----
    Precision (``cpu``): float32 accumulation, bias added in float32, one rounding to x.dtype.
    bf16: the products of bf16 values are exact in float32 (AMX-BF16 / AVX512-BF16 round
    subnormal inputs and outputs to zero, as every bf16 dot-product unit does); fp16: x and the
    values are widened exactly to float32 and multiplied with float32 FMA; fp32: float32 FMA.
    The CPU glue rejects metadata nibbles that are not ordered (``idx0 < idx1``).

    CPU paths (``csrc/include/bitpress/sparse24/sparse24_cpu.h``): a read stream of the compressed
    rows for small M (up to 16 rows; bf16 on AMX up to 8); above, bf16 runs the shared microkernel
    (AMX / AVX512-BF16 / AVX2) on weight panels expanded once per call, fp16 / fp32 a dense float32
    GEMM on the decompressed weight. A non-finite x at a pruned position is not read by the
    stream, and multiplied by zero (NaN) on the other paths, as by ``F.linear``.
    """
    _, impl = backends.select("sparse24_gemm", x.device, backend, x.dtype)
    return impl(x, values, meta, bias, int(layout))


def _check_layout(op, layout, want=None):
    if layout not in _LAYOUT_NAMES:
        _fail(op, f"layout must be 0 (ROW) or 1 (MMA), got {layout}")
    if want is not None and layout != want:
        _fail(
            op,
            f"layout must be {_LAYOUT_NAMES[want]} ({int(want)}) on this backend, got "
            f"{_LAYOUT_NAMES[layout]} ({layout})",
        )


def _check_x(op, x, multiple):
    _check_dtype(op, "x", x, _FLOAT_DTYPES)
    if x.dim() < 1:
        _fail(op, "x must be [..., K], got a 0-D tensor")
    K = x.shape[-1]
    if K % multiple:
        _fail(
            op,
            f"x.size(-1) must be a multiple of {multiple} (K; {multiple} weights per "
            f"{'metadata byte' if multiple == 8 else 'int32 of qvalues'}), got shape "
            f"{list(x.shape)}",
        )
    return K


def _check_meta(op, meta, x, N, K):
    _check_dtype(op, "meta", meta, (torch.uint8,))
    _check_dim(op, "meta", meta, 2, "[N, K/8]")
    _check_size(op, "meta", meta, 0, N, "N = values.size(0)")
    _check_size(op, "meta", meta, 1, K // 8, "K/8 = x.size(-1) / 8")
    _check_device(op, "meta", meta, x, "x")


def _check_bias(op, bias, x, N, what):
    if bias is not None:
        _check_dtype(op, "bias", bias, _FLOAT_DTYPES)
        _check_dim(op, "bias", bias, 1, "[N]")
        _check_size(op, "bias", bias, 0, N, what)
        _check_device(op, "bias", bias, x, "x")


def _check_gemm(x, values, meta, bias, layout, want=None):
    """Checks of sparse24_gemm, with the messages of csrc/sparse24/sparse24_gemm_torch.cpp;
    returns (K, N). The MMA layout's meta is checked by the CUDA glue and ``from_mma``."""
    op = "sparse24_gemm"
    _check_layout(op, layout, want)
    K = _check_x(op, x, 8)
    _check_dtype(op, "values", values, (x.dtype,))
    _check_dim(op, "values", values, 2, "[N, K/2]")
    N = values.shape[0]
    _check_size(op, "values", values, 1, K // 2, "K/2 = x.size(-1) / 2")
    _check_device(op, "values", values, x, "x")
    if layout == Sparse24Layout.ROW:
        _check_meta(op, meta, x, N, K)
    else:
        _check_device(op, "meta", meta, x, "x")
    _check_bias(op, bias, x, N, "N = values.size(0)")
    return K, N


def _gemm_fake(x, values, meta, layout, bias=None):
    _, N = _check_gemm(x, values, meta, bias, layout)
    return x.new_empty((*x.shape[:-1], N))


def _check_meta_values(op, meta):
    """The value check of the CPU glue (CPU tensors, outside torch.compile: it syncs)."""
    if meta.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = invalid_nibble(meta)
    if bad is not None:
        _fail(op, meta_message(op, *bad).removeprefix(f"{op}: "))


@backends.register("sparse24_gemm", "reference")
def _gemm_reference(x, values, meta, bias, layout):
    _check_gemm(x, values, meta, bias, layout)
    if layout == Sparse24Layout.ROW:
        _check_meta_values("sparse24_gemm", meta)
    return reference.sparse24_gemm(x, values, meta, bias, layout)


# --------------------------------------------------------------------------------------------
# sparse24_int4_gemm
# --------------------------------------------------------------------------------------------


def sparse24_int4_gemm(
    x: torch.Tensor,
    qvalues: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    *,
    group_size: int = 128,
    bias: torch.Tensor | None = None,
    layout: int = Sparse24Layout.ROW,
    backend: str | None = None,
) -> torch.Tensor:
    r"""2:4 sparse INT4 linear layer: ``y = x · Wᵀ + bias`` with

    .. math:: W[n, k] = (q - z[g, n]) \cdot s[g, n], \quad g = k \,//\, \text{group\_size}

    at the kept positions ``k`` (and 0 elsewhere).

    Parameters
    ----------
    x : Tensor, float32 / float16 / bfloat16, shape [..., K]
        K a multiple of 16.
    qvalues : Tensor, int32, shape [N, K/16]
        The kept values as 4-bit codes 0..15, 8 per int32, lowest nibble = lowest K, in the
        order of the values of the interchange format.
    meta : Tensor, uint8, shape [N, K/8]
        Positions of the kept values (as for :func:`sparse24_gemm`).
    scales : Tensor, float32 / float16 / bfloat16, shape [G, N], G = ceil(K / group_size)
    zeros : Tensor, float32 / float16 / bfloat16, shape [G, N], optional
        Float zero points ``z`` (asymmetric). ``None``: symmetric, ``z = 8``.
    group_size : int
        Dense K positions per group: a positive multiple of 8, or -1 (one group over K).
    bias : Tensor, shape [N], optional
    layout : Sparse24Layout
        ``ROW`` (the ``cpu`` backend) or ``MMA`` (the ``cuda`` backend when its kernel is
        compiled in: ``bitpress.sparse24.layout_mma_int4.to_mma_int4``, qvalues [N, K/16] and
        meta int32 [N/16, ceil(K/64), 32]; the reference converts it back).
    backend : str, optional

    Returns
    -------
    Tensor, shape [..., N], ``x.dtype``.

    Notes
    -----
    Precision (``cpu``): float32 accumulation, one rounding to x.dtype. bf16 x with
    ``group_size % 64 == 0`` on AVX512-BF16: exact products x (128 + q) and the group sums of x,
    folded per group as ``s (sum x (128 + q) - (128 + z) sum x)``; otherwise ``(q - z) * s`` in
    float32 times x in float32. M > 16: the weight is dequantized to float32 once per call and a
    dense float32 GEMM takes the product.
    """
    _, impl = backends.select("sparse24_int4_gemm", x.device, backend, x.dtype)
    return impl(x, qvalues, meta, scales, zeros, group_size, bias, int(layout))


def _check_int4_gemm(x, qvalues, meta, scales, zeros, group_size, bias, layout):
    """Checks of sparse24_int4_gemm (csrc/sparse24/sparse24_int4_gemm_torch.cpp); (K, N, G)."""
    op = "sparse24_int4_gemm"
    _check_layout(op, layout)
    K = _check_x(op, x, 16)
    _check_dtype(op, "qvalues", qvalues, (torch.int32,))
    _check_dim(op, "qvalues", qvalues, 2, "[N, K/16]")
    N = qvalues.shape[0]
    _check_size(op, "qvalues", qvalues, 1, K // 16, "K/16 = x.size(-1) / 16")
    _check_device(op, "qvalues", qvalues, x, "x")
    if layout == Sparse24Layout.ROW:
        _check_meta(op, meta, x, N, K)
    else:  # the MMA layout's meta (int32 [N/16, ceil(K/64), 32]) is checked by the CUDA glue
        _check_device(op, "meta", meta, x, "x")
    if not ((group_size > 0 and group_size % 8 == 0) or group_size == -1):
        _fail(op, f"group_size must be a positive multiple of 8 or -1 (all of K), got {group_size}")
    G = (1 if K else 0) if group_size == -1 else -(-K // group_size)
    _check_dtype(op, "scales", scales, _FLOAT_DTYPES)
    _check_dim(op, "scales", scales, 2, "[G, N]")
    _check_size(op, "scales", scales, 0, G, "G = ceil(K / group_size)")
    _check_size(op, "scales", scales, 1, N, "N = qvalues.size(0)")
    _check_device(op, "scales", scales, x, "x")
    if zeros is not None:
        _check_dtype(op, "zeros", zeros, _FLOAT_DTYPES)
        _check_dim(op, "zeros", zeros, 2, "[G, N]")
        _check_size(op, "zeros", zeros, 0, G, "G = ceil(K / group_size)")
        _check_size(op, "zeros", zeros, 1, N, "N = qvalues.size(0)")
        _check_device(op, "zeros", zeros, x, "x")
    _check_bias(op, bias, x, N, "N = qvalues.size(0)")
    return K, N, G


def _int4_gemm_fake(x, qvalues, meta, scales, zeros, group_size, layout, bias=None):
    _, N, _ = _check_int4_gemm(x, qvalues, meta, scales, zeros, group_size, bias, layout)
    return x.new_empty((*x.shape[:-1], N))


@backends.register("sparse24_int4_gemm", "reference")
def _int4_gemm_reference(x, qvalues, meta, scales, zeros, group_size, bias, layout):
    _check_int4_gemm(x, qvalues, meta, scales, zeros, group_size, bias, layout)
    if layout == Sparse24Layout.ROW:
        _check_meta_values("sparse24_int4_gemm", meta)
    return reference.sparse24_int4_gemm(x, qvalues, meta, scales, zeros, group_size, bias, layout)


# --------------------------------------------------------------------------------------------
# Compiled backends (bitpress._C: csrc/sparse24/*_torch.cpp define the schemas)
# --------------------------------------------------------------------------------------------

torch.library.register_fake("bitpress::sparse24_compress")(_compress_fake)
torch.library.register_fake("bitpress::sparse24_gemm")(_gemm_fake)
torch.library.register_fake("bitpress::sparse24_int4_gemm")(_int4_gemm_fake)


@backends.register("sparse24_compress", "cpu")
def _compress_compiled(w):
    return torch.ops.bitpress.sparse24_compress(w)


@backends.register("sparse24_gemm", "cpu")
def _gemm_compiled(x, values, meta, bias, layout):
    return torch.ops.bitpress.sparse24_gemm(x, values, meta, layout, bias)


@backends.register("sparse24_int4_gemm", "cpu")
def _int4_gemm_compiled(x, qvalues, meta, scales, zeros, group_size, bias, layout):
    return torch.ops.bitpress.sparse24_int4_gemm(
        x, qvalues, meta, scales, zeros, group_size, layout, bias
    )


# The CUDA kernel of sparse24_gemm (mma.sp, MMA layout) registers
# TORCH_LIBRARY_IMPL(bitpress, CUDA) in its own glue file: the backend exists only when it is
# compiled in. sparse24_int4_gemm has no CUDA kernel yet: register it here the same way when
# one lands (its capability: _CUDA_SM80, layout MMA).
if _has_kernel("sparse24_gemm", "CUDA"):
    backends.register("sparse24_gemm", "cuda", _CUDA_SM80)(_gemm_compiled)
if _has_kernel("sparse24_int4_gemm", "CUDA"):
    backends.register("sparse24_int4_gemm", "cuda", _CUDA_SM80)(_int4_gemm_compiled)

# --------------------------------------------------------------------------------------------
# Triton backend: bitpress.triton_kernels.sparse24_gemm / sparse24_int4_gemm (ROW layout, the
# compressed tiles expanded in registers before tl.dot; sm_80+, or CPU tensors under the
# interpreter). Python custom ops, so that torch.compile sees them as single ops.
# --------------------------------------------------------------------------------------------

try:  # triton is optional (it comes with CUDA builds of torch); without it the backend refuses
    from bitpress.triton_kernels import sparse24_gemm as _tk_gemm
    from bitpress.triton_kernels import sparse24_int4_gemm as _tk_int4_gemm
except ImportError:  # pragma: no cover
    _tk_gemm = _tk_int4_gemm = None

_TRITON_SM80 = Capability(devices=("cuda",), min_cc=(8, 0), interpreter=True)


@torch.library.custom_op("bitpress::sparse24_gemm_triton", mutates_args=())
def _gemm_triton(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    layout: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_gemm(x, values, meta, bias, layout, Sparse24Layout.ROW)
    _check_meta_values("sparse24_gemm", meta)  # CPU (interpreter) only: on CUDA it would sync
    return _tk_gemm.sparse24_gemm(x, values, meta, bias)


torch.library.register_fake("bitpress::sparse24_gemm_triton")(_gemm_fake)


@backends.register("sparse24_gemm", "triton", _TRITON_SM80)
def _gemm_triton_backend(x, values, meta, bias, layout):
    return torch.ops.bitpress.sparse24_gemm_triton(x, values, meta, layout, bias)


@torch.library.custom_op("bitpress::sparse24_int4_gemm_triton", mutates_args=())
def _int4_gemm_triton(
    x: torch.Tensor,
    qvalues: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    layout: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_int4_gemm(x, qvalues, meta, scales, zeros, group_size, bias, layout)
    _check_meta_values("sparse24_int4_gemm", meta)
    return _tk_int4_gemm.sparse24_int4_gemm(x, qvalues, meta, scales, zeros, group_size, bias)


torch.library.register_fake("bitpress::sparse24_int4_gemm_triton")(_int4_gemm_fake)


@backends.register("sparse24_int4_gemm", "triton", _TRITON_SM80)
def _int4_gemm_triton_backend(x, qvalues, meta, scales, zeros, group_size, bias, layout):
    return torch.ops.bitpress.sparse24_int4_gemm_triton(
        x, qvalues, meta, scales, zeros, group_size, layout, bias
    )


register_op(
    OpSpec(
        "sparse24_compress",
        "sparse24",
        sparse24_compress,
        reference.sparse24_compress,
        cases=cases.sparse24_compress_cases,
        bench="bench/bench_sparse24_compress.py",
    )
)
register_op(
    OpSpec(
        "sparse24_gemm",
        "sparse24",
        sparse24_gemm,
        reference.sparse24_gemm,
        cases=cases.sparse24_gemm_cases,
        bench="bench/bench_sparse24_gemm.py",
    )
)
register_op(
    OpSpec(
        "sparse24_int4_gemm",
        "sparse24",
        sparse24_int4_gemm,
        reference.sparse24_int4_gemm,
        cases=cases.sparse24_int4_gemm_cases,
        bench="bench/bench_sparse24_int4_gemm.py",
    )
)
