"""The FP8 ops: fp8_quantize, fp8_gemm (W8A8) and fp8_weight_gemm (W8A16).

For each op: the public function (re-exported by :mod:`bitpress.ops`) with its contract, the
Python argument check (for the fake and the reference path; the compiled backends check in C++,
csrc/fp8/fp8_args.h, with the same messages), the fake for ``torch.compile``, the backend
implementations with what each supports, and the op's registry entry.

E4M3 is ``torch.float8_e4m3fn``: max 448, no infinities; quantization rounds to nearest even and
saturates at +-448, NaN stays NaN (``csrc/include/bitpress/fp8/fp8.h``).

Backends
--------
``cpu``        C++ (csrc/fp8/*_cpu.cpp): E4M3 decoded exactly to bf16 / float32, the shared CPU
               GEMM microkernel (AMX / AVX512-BF16 / AVX2) or float32 FMA; exact products.
``cuda``       CUDA C++, registered by the CUDA glue (``TORCH_LIBRARY_IMPL(bitpress, CUDA)``):
               fp8_gemm on sm_90a (wgmma), fp8_weight_gemm and fp8_quantize on sm_80+. Chosen only
               when ``bitpress._C`` holds a CUDA kernel of the op and an image for the device.
``triton``     (its registrations go in the "triton" section below).
``reference``  :mod:`bitpress.fp8.reference` (plain torch, float64), any device.
"""

from __future__ import annotations

import dataclasses

import torch

from bitpress._core import backends, ext
from bitpress._core.backends import Capability, Device, cuda_image_fits
from bitpress._core.checks import FLOAT_DTYPES as _FLOAT_DTYPES
from bitpress._core.checks import check_device as _check_device
from bitpress._core.checks import check_dim as _check_dim
from bitpress._core.checks import check_dtype as _check_dtype
from bitpress._core.checks import check_size as _check_size
from bitpress._core.checks import fail as _fail
from bitpress._core.registry import OpSpec, register_op
from bitpress.fp8 import cases, reference
from bitpress.fp8.reference import BLOCK, E4M3, GRANULARITIES, cdiv, scale_shape

_E4M3 = (E4M3,)
_F32 = (torch.float32,)


@dataclasses.dataclass(frozen=True)
class _CudaKernel(Capability):
    """The ``cuda`` capability of an FP8 op: on top of :class:`Capability`, ``bitpress._C`` must
    hold a CUDA kernel of the op (the CUDA glue registers it; a build without it leaves the CUDA
    dispatch key empty) and, where the kernel is arch-specific (``arch="sm_90a"``), an image of
    that arch fitting the device."""

    op: str = ""
    arch: str | None = None

    def refusal(self, device: Device, dtype: torch.dtype | None = None) -> str | None:
        why = super().refusal(device, dtype)
        if why is not None or device.type != "cuda":
            return why
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bitpress::{self.op}", "CUDA"):
            return f"bitpress._C has no CUDA kernel of {self.op}"
        if self.arch is not None:
            if self.arch not in ext.cuda_archs():
                return f"bitpress._C was built without {self.arch}"
            if device.cc is not None and not cuda_image_fits(device.cc, [self.arch]):
                return f"its kernel is built for {self.arch} only"
        return None


def _cuda(op: str, min_cc: tuple[int, int], arch: str | None = None) -> _CudaKernel:
    return _CudaKernel(devices=("cuda",), min_cc=min_cc, compiled_cuda=True, op=op, arch=arch)


# fp8_gemm needs FP8 tensor cores through wgmma (sm_90a images run on 9.0 only); the weight-only
# GEMM and the quantizer decode / encode with bit operations and run on sm_80+.
_CUDA_FP8_GEMM = _cuda("fp8_gemm", (9, 0), "sm_90a")
_CUDA_FP8_WEIGHT_GEMM = _cuda("fp8_weight_gemm", (8, 0))
_CUDA_FP8_QUANTIZE = _cuda("fp8_quantize", (8, 0))


def _is_single(s: torch.Tensor) -> bool:
    return s.dim() <= 1 and s.numel() == 1


def _has_shape(s: torch.Tensor, r: int, c: int) -> bool:
    return s.dim() == 2 and s.shape[0] == r and s.shape[1] == c


# --------------------------------------------------------------------------------------------
# fp8_quantize
# --------------------------------------------------------------------------------------------


def fp8_quantize(
    x: torch.Tensor,
    *,
    granularity: str,
    scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | list[int] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Quantize to FP8 E4M3 with float32 scales.

    .. math:: q = \mathrm{sat}_{448}(\mathrm{rne}(x / s)), \qquad
              s = \max(\mathrm{amax}|x| / 448,\ 2^{-126})

    per tensor, row or block; the division in float32, rounding to nearest even, saturation to
    +-448 (also for +-inf), NaN stays NaN: ``(x / s).clamp(-448, 448).to(torch.float8_e4m3fn)``.
    An all-zero set (amax 0) gets the finite scale 2^-126 (the smallest normal float32), as does
    one whose amax / 448 underflows; a NaN in a set makes its scale NaN.

    Parameters
    ----------
    x : Tensor, float32 / float16 / bfloat16, shape [..., K]
    granularity : str
        ``"tensor"``: one scale, shape [1]. ``"token"``: one per row of x (per token),
        shape [..., 1]. ``"channel"``: one per row of a weight x [N, K] (per output channel),
        shape [N, 1]. ``"block"``: one per ``block_size = (rows, cols)`` block: default (1, 128),
        the activation recipe of DeepSeek-V3, scale [..., ceil(K/128)]; (128, 128) for a weight
        [N, K], scale [ceil(N/128), ceil(K/128)] (rows > 1 needs a 2-D x).
    scale : Tensor, float32, optional
        A static scale of the granularity's shape (``[]`` or ``[1]`` for "tensor"), used instead
        of computing one (it is not checked for zeros: x / 0 gives +-448 or NaN).
    block_size : (int, int), optional
        The block of ``granularity="block"`` (only there).
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    (q, scale) : Tensor float8_e4m3fn [..., K]; Tensor float32 of the granularity's shape (a copy
    of a given scale).
    """
    _, impl = backends.select("fp8_quantize", x.device, backend, x.dtype)
    return impl(x, granularity, scale, None if block_size is None else list(block_size))


def _check_fp8_quantize(x, granularity, scale, block_size):
    """Returns the scale shape."""
    op = "fp8_quantize"
    _check_dtype(op, "x", x, _FLOAT_DTYPES)
    if x.dim() < 1:
        _fail(op, "x must be [..., K], got a 0-D tensor")
    if granularity not in GRANULARITIES:
        _fail(
            op,
            f"granularity must be 'tensor', 'token', 'channel' or 'block', got '{granularity}'",
        )
    if block_size is not None and granularity != "block":
        _fail(
            op,
            f"block_size applies to granularity='block' only, got block_size={list(block_size)} "
            f"with granularity='{granularity}'",
        )
    if granularity == "block" and block_size is not None:
        bs = list(block_size)
        if len(bs) != 2 or bs[0] <= 0 or bs[1] <= 0:
            _fail(op, f"block_size must be [block_rows, block_cols] with positive sizes, got {bs}")
    if granularity == "channel":
        _check_dim(op, "x", x, 2, "[N, K] (granularity='channel': a weight)")
    bm, bk = reference.default_block_size(block_size)
    if granularity == "block" and bm != 1 and x.dim() != 2:
        _fail(
            op,
            f"x must be 2-D [R, K] for block_size [{bm}, {bk}] (blocks of more than one row), "
            f"got shape {list(x.shape)}",
        )
    shape = list(scale_shape(x.shape, granularity, block_size))
    if scale is not None:
        _check_dtype(op, "scale", scale, _F32)
        _check_device(op, "scale", scale, x, "x")
        if granularity == "tensor":
            if not _is_single(scale):
                _fail(
                    op,
                    "scale must be a single value (shape [] or [1]) for granularity='tensor', got "
                    f"shape {list(scale.shape)}",
                )
        elif list(scale.shape) != shape:
            _fail(
                op,
                f"scale must have shape {shape} (granularity='{granularity}'), got shape "
                f"{list(scale.shape)}",
            )
    return shape


@torch.library.register_fake("bitpress::fp8_quantize")
def _fp8_quantize_fake(x, granularity, scale=None, block_size=None):
    shape = _check_fp8_quantize(x, granularity, scale, block_size)
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty(shape, dtype=torch.float32)


@backends.register("fp8_quantize", "cpu")
@backends.register("fp8_quantize", "cuda", _CUDA_FP8_QUANTIZE)
def _fp8_quantize_compiled(x, granularity, scale, block_size):
    return torch.ops.bitpress.fp8_quantize(x, granularity, scale, block_size)


@backends.register("fp8_quantize", "reference")
def _fp8_quantize_reference(x, granularity, scale, block_size):
    shape = _check_fp8_quantize(x, granularity, scale, block_size)
    q, s = reference.fp8_quantize(x, granularity, scale, block_size)
    return q, s.float().reshape(shape).clone()


# --------------------------------------------------------------------------------------------
# fp8_gemm
# --------------------------------------------------------------------------------------------


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""FP8 x FP8 GEMM (W8A8): ``y = (a · scale_a)(b · scale_b)ᵀ + bias``.

    .. math:: y[m, n] = \sum_k a[m, k]\, s_a(m, k)\; b[n, k]\, s_b(n, k) + \mathrm{bias}[n]

    with float32 accumulation, rounded once to ``out_dtype``.

    Parameters
    ----------
    a : Tensor, float8_e4m3fn, shape [M, K]
        Activations (row-major).
    b : Tensor, float8_e4m3fn, shape [N, K]
        A Linear's weight (K-major, as Hopper's FP8 tensor cores need).
    scale_a, scale_b : Tensor, float32
        Per tensor: single values (shape [] or [1]); rowwise: scale_a [M, 1] (per token) and
        scale_b [N, 1] (per channel), or either of them a single value (torch._scaled_mm's
        tensorwise and rowwise recipes are two of these combinations); blockwise (DeepSeek-V3):
        scale_a [M, ceil(K/128)] (1 x 128 blocks) with scale_b [ceil(N/128), ceil(K/128)]
        (128 x 128 blocks). Per tensor / row, the scales multiply the float32 sum once; blockwise,
        each 128-long block of K is summed in float32 and scaled before it is added.
    bias : Tensor, float32 / float16 / bfloat16, shape [N], optional
    out_dtype : torch.dtype
        float32, float16 or bfloat16 (default).
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    Tensor, shape [M, N], ``out_dtype``.

    Notes
    -----
    Every product is exact (E4M3 x E4M3 has 8 significant bits; the CPU decodes both operands
    exactly to bf16): the results of the backends differ only by float32 summation order, and
    from torch._scaled_mm's by the same.
    """
    _, impl = backends.select("fp8_gemm", a.device, backend, a.dtype)
    return impl(a, b, scale_a, scale_b, bias, out_dtype)


def _gemm_scale_layouts(sa, sb, M, N, K):
    """("tensor" | "row" | "block") of scale_a and scale_b, or the error (fp8_args.h)."""
    op = "fp8_gemm"
    Kb, Nb = cdiv(K, BLOCK), cdiv(N, BLOCK)
    a_single, b_single = _is_single(sa), _is_single(sb)
    a_row, b_row = _has_shape(sa, M, 1), _has_shape(sb, N, 1)
    a_block, b_block = _has_shape(sa, M, Kb), _has_shape(sb, Nb, Kb)
    if a_block and b_block:
        return "block", "block"
    if (a_single or a_row) and (b_single or b_row):
        return ("tensor" if a_single else "row"), ("tensor" if b_single else "row")
    if not (a_single or a_row or a_block):
        _fail(
            op,
            f"scale_a must be a single value (shape [] or [1]), [M, 1] = {[M, 1]} (rowwise) or "
            f"[M, ceil(K/128)] = {[M, Kb]} (blockwise), got shape {list(sa.shape)}",
        )
    if not (b_single or b_row or b_block):
        _fail(
            op,
            f"scale_b must be a single value (shape [] or [1]), [N, 1] = {[N, 1]} (rowwise) or "
            f"[ceil(N/128), ceil(K/128)] = {[Nb, Kb]} (blockwise), got shape {list(sb.shape)}",
        )
    if a_block:
        _fail(
            op,
            f"scale_b must be blockwise [ceil(N/128), ceil(K/128)] = {[Nb, Kb]} as scale_a is "
            f"blockwise, got shape {list(sb.shape)}",
        )
    _fail(
        op,
        f"scale_a must be blockwise [M, ceil(K/128)] = {[M, Kb]} as scale_b is blockwise, got "
        f"shape {list(sa.shape)}",
    )


def _check_bias(op, bias, ref, ref_name, N, what):
    if bias is not None:
        _check_dtype(op, "bias", bias, _FLOAT_DTYPES)
        _check_dim(op, "bias", bias, 1, "[N]")
        _check_size(op, "bias", bias, 0, N, what)
        _check_device(op, "bias", bias, ref, ref_name)


def _check_fp8_gemm(a, b, scale_a, scale_b, bias, out_dtype):
    op = "fp8_gemm"
    _check_dtype(op, "a", a, _E4M3)
    _check_dim(op, "a", a, 2, "[M, K]")
    _check_dtype(op, "b", b, _E4M3)
    _check_dim(op, "b", b, 2, "[N, K]")
    M, K, N = a.shape[0], a.shape[1], b.shape[0]
    _check_size(op, "b", b, 1, K, "K = a.size(1)")
    _check_device(op, "b", b, a, "a")
    _check_dtype(op, "scale_a", scale_a, _F32)
    _check_dtype(op, "scale_b", scale_b, _F32)
    _check_device(op, "scale_a", scale_a, a, "a")
    _check_device(op, "scale_b", scale_b, a, "a")
    _gemm_scale_layouts(scale_a, scale_b, M, N, K)
    _check_bias(op, bias, a, "a", N, "N = b.size(0)")
    od = torch.bfloat16 if out_dtype is None else out_dtype
    if od not in _FLOAT_DTYPES:
        _fail(op, f"out_dtype must be float32, float16 or bfloat16, got {od}", TypeError)
    return M, N, od


@torch.library.register_fake("bitpress::fp8_gemm")
def _fp8_gemm_fake(a, b, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, od = _check_fp8_gemm(a, b, scale_a, scale_b, bias, out_dtype)
    return a.new_empty((M, N), dtype=od)


@backends.register("fp8_gemm", "cpu")
@backends.register("fp8_gemm", "cuda", _CUDA_FP8_GEMM)
def _fp8_gemm_compiled(a, b, scale_a, scale_b, bias, out_dtype):
    return torch.ops.bitpress.fp8_gemm(a, b, scale_a, scale_b, bias, out_dtype)


@backends.register("fp8_gemm", "reference")
def _fp8_gemm_reference(a, b, scale_a, scale_b, bias, out_dtype):
    _check_fp8_gemm(a, b, scale_a, scale_b, bias, out_dtype)
    return reference.fp8_gemm(a, b, scale_a, scale_b, bias, out_dtype)


# --------------------------------------------------------------------------------------------
# fp8_weight_gemm
# --------------------------------------------------------------------------------------------


def fp8_weight_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""FP8 weight-only linear layer (W8A16): ``y = x · (w · w_scale)ᵀ + bias``.

    .. math:: y[m, n] = \sum_k x[m, k]\, w[n, k]\, s_w(n, k) + \mathrm{bias}[n]

    with float32 accumulation, rounded once to x's dtype.

    Parameters
    ----------
    x : Tensor, float32 / float16 / bfloat16, shape [..., K]
        Activations; any leading shape (M = their product).
    w : Tensor, float8_e4m3fn, shape [N, K]
        A Linear's weight.
    w_scale : Tensor, float32
        A single value (shape [] or [1], per tensor), [N, 1] (per output channel) or
        [ceil(N/128), ceil(K/128)] (128 x 128 blocks, DeepSeek-V3 / Qwen3-FP8 checkpoints'
        ``weight_scale_inv``). Per tensor / channel the scale multiplies the float32 sum;
        blockwise, each 128-long block of K is summed in float32 and then scaled.
    bias : Tensor, float32 / float16 / bfloat16, shape [N], optional
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    Tensor, shape [..., N], x's dtype.

    Notes
    -----
    The CPU kernel's products are exact for every x dtype: E4M3 decodes exactly to bf16 and
    float32; bf16 x runs the bf16 microkernel (AMX / AVX512-BF16), fp16 and float32 x multiply in
    float32 (FMA), so the error is that of float32 summation (see csrc/fp8/fp8_weight_gemm_cpu.cpp).
    """
    _, impl = backends.select("fp8_weight_gemm", x.device, backend, x.dtype)
    return impl(x, w, w_scale, bias)


def _check_fp8_weight_gemm(x, w, w_scale, bias):
    op = "fp8_weight_gemm"
    _check_dtype(op, "x", x, _FLOAT_DTYPES)
    if x.dim() < 1:
        _fail(op, "x must be [..., K], got a 0-D tensor")
    _check_dtype(op, "w", w, _E4M3)
    _check_dim(op, "w", w, 2, "[N, K]")
    K, N = x.shape[-1], w.shape[0]
    _check_size(op, "w", w, 1, K, "K = x.size(-1)")
    _check_device(op, "w", w, x, "x")
    _check_dtype(op, "w_scale", w_scale, _F32)
    _check_device(op, "w_scale", w_scale, x, "x")
    Kb, Nb = cdiv(K, BLOCK), cdiv(N, BLOCK)
    if not (_is_single(w_scale) or _has_shape(w_scale, N, 1) or _has_shape(w_scale, Nb, Kb)):
        _fail(
            op,
            f"w_scale must be a single value (shape [] or [1]), [N, 1] = {[N, 1]} (per channel) "
            f"or [ceil(N/128), ceil(K/128)] = {[Nb, Kb]} (128 x 128 blocks), got shape "
            f"{list(w_scale.shape)}",
        )
    _check_bias(op, bias, x, "x", N, "N = w.size(0)")
    return N


@torch.library.register_fake("bitpress::fp8_weight_gemm")
def _fp8_weight_gemm_fake(x, w, w_scale, bias=None):
    N = _check_fp8_weight_gemm(x, w, w_scale, bias)
    return x.new_empty((*x.shape[:-1], N))


@backends.register("fp8_weight_gemm", "cpu")
@backends.register("fp8_weight_gemm", "cuda", _CUDA_FP8_WEIGHT_GEMM)
def _fp8_weight_gemm_compiled(x, w, w_scale, bias):
    return torch.ops.bitpress.fp8_weight_gemm(x, w, w_scale, bias)


@backends.register("fp8_weight_gemm", "reference")
def _fp8_weight_gemm_reference(x, w, w_scale, bias):
    _check_fp8_weight_gemm(x, w, w_scale, bias)
    return reference.fp8_weight_gemm(x, w, w_scale, bias)


# --------------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------------
# The Triton kernels (bitpress/triton_kernels/fp8_gemm.py, fp8_weight_gemm.py, fp8_quantize.py)
# register here as the int4 ones do in bitpress.int4.ops: a torch.library.custom_op
# "bitpress::<op>_triton" whose body runs the check of this module (_check_<op>) and the kernel,
# the fake of the op above for it, and backends.register("<op>", "triton", Capability(
# devices=("cuda",), min_cc=..., interpreter=True)) calling it with the arguments of the backend
# functions above.


register_op(
    OpSpec(
        "fp8_quantize",
        "fp8",
        fp8_quantize,
        reference.fp8_quantize,
        cases=cases.fp8_quantize_cases,
        bench="bench/bench_fp8_gemm.py",
    )
)
register_op(
    OpSpec(
        "fp8_gemm",
        "fp8",
        fp8_gemm,
        reference.fp8_gemm,
        cases=cases.fp8_gemm_cases,
        bench="bench/bench_fp8_gemm.py",
    )
)
register_op(
    OpSpec(
        "fp8_weight_gemm",
        "fp8",
        fp8_weight_gemm,
        reference.fp8_weight_gemm,
        cases=cases.fp8_weight_gemm_cases,
        bench="bench/bench_fp8_gemm.py",
    )
)
