"""Plain-PyTorch reference of the FP8 ops: the ground truth of the tests.

Each function computes exactly what the op's docstring in :mod:`bitpress.fp8.ops` defines, in the
simplest way, on any device. Imports only torch.

E4M3 is ``torch.float8_e4m3fn`` (max 448, no infinities). The quantization rule of every backend:
``q = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)`` with the division in float32 (round
to nearest even; saturation at +-448, which torch's cast alone does not do; NaN stays NaN), and a
computed scale ``max(amax / 448, FP8_MIN_SCALE)`` in float32.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# The smallest computed scale (csrc/include/bitpress/fp8/fp8.h kFp8MinScale): the smallest normal
# float32. An all-zero row gets it (a finite, nonzero scale), and x / scale never divides by 0.
FP8_MIN_SCALE = torch.finfo(torch.float32).tiny
BLOCK = 128  # the block of the blockwise GEMM scales (DeepSeek-V3: 1 x 128 and 128 x 128)
GRANULARITIES = ("tensor", "token", "channel", "block")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """float32 -> E4M3: round to nearest even, saturate to +-448, NaN stays NaN."""
    return y.float().clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """scale = max(amax / 448, FP8_MIN_SCALE) in float32 (a NaN amax gives a NaN scale)."""
    s = amax.float() / E4M3_MAX
    return torch.where(s < FP8_MIN_SCALE, torch.full_like(s, FP8_MIN_SCALE), s)


def default_block_size(block_size) -> tuple[int, int]:
    return (1, BLOCK) if block_size is None else (int(block_size[0]), int(block_size[1]))


def scale_shape(shape, granularity: str, block_size=None) -> tuple[int, ...]:
    """The shape of the scale of x [..., K] (or a weight [N, K]) for ``granularity``."""
    if granularity == "tensor":
        return (1,)
    if granularity in ("token", "channel"):
        return (*shape[:-1], 1)
    bm, bk = default_block_size(block_size)
    lead = tuple(shape[:-1])
    if bm != 1:
        lead = (cdiv(shape[0], bm),)
    return (*lead, cdiv(shape[-1], bk))


def _expand_block(s: torch.Tensor, shape, bm: int, bk: int) -> torch.Tensor:
    """Block scales [..., ceil(R/bm), ceil(K/bk)] -> one value per element of [..., R, K]."""
    R, K = shape[-2] if len(shape) >= 2 else 1, shape[-1]
    s = s.repeat_interleave(bk, dim=-1)[..., :K]
    if bm != 1:
        s = s.repeat_interleave(bm, dim=-2)[..., :R, :]
    return s


def fp8_quantize(
    x: torch.Tensor,
    granularity: str,
    scale: torch.Tensor | None = None,
    block_size=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with q = to_e4m3(x / scale) elementwise (each element divided by the scale of
    its tensor / row / block) and scale computed from amax|x| over that set unless given."""
    xf = x.float()
    K = x.shape[-1]
    if granularity == "tensor":
        if scale is None:
            amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
            scale = scale_from_amax(amax).reshape(1)
        s = scale.float().reshape(())
        return to_e4m3(xf / s), scale
    if granularity in ("token", "channel"):
        if scale is None:
            if K:
                amax = xf.abs().amax(dim=-1, keepdim=True)
            else:
                amax = xf.new_zeros((*x.shape[:-1], 1))
            scale = scale_from_amax(amax)
        return to_e4m3(xf / scale.float()), scale
    bm, bk = default_block_size(block_size)
    shape = scale_shape(x.shape, "block", (bm, bk))
    if scale is None:
        # amax per block: pad to whole blocks with zeros (which do not change an amax).
        if bm == 1:
            lead = tuple(x.shape[:-1])
            xp = torch.nn.functional.pad(xf.abs(), (0, shape[-1] * bk - K))
            amax = xp.reshape(*lead, shape[-1], bk).amax(dim=-1) if xp.numel() else None
        else:
            R = x.shape[0]
            xp = torch.nn.functional.pad(xf.abs(), (0, shape[1] * bk - K, 0, shape[0] * bm - R))
            amax = xp.reshape(shape[0], bm, shape[1], bk).amax(dim=(1, 3)) if xp.numel() else None
        if amax is None:
            amax = xf.new_zeros(shape)
        scale = scale_from_amax(amax)
    if bm == 1:
        s = _expand_block(scale.float().unsqueeze(-2), (*x.shape[:-1], 1, K), 1, bk).squeeze(-2)
    else:
        s = _expand_block(scale.float(), x.shape, bm, bk)
    return to_e4m3(xf / s), scale


def dequantize_weight(
    w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The dense weight [N, K] = E4M3 value x its scale (per tensor, per channel [N, 1] or per
    128 x 128 block [ceil(N/128), ceil(K/128)]), in ``dtype``."""
    N, K = w.shape
    wf = w.to(dtype)
    s = w_scale.to(dtype)
    if s.dim() <= 1:
        return wf * s.reshape(())
    if s.shape == (N, 1):
        return wf * s
    return wf * _expand_block(s, (N, K), BLOCK, BLOCK)


def dequantize_act(a: torch.Tensor, scale_a: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """The dense activations [M, K] of fp8_gemm's a: per tensor, per row [M, 1] or per 1 x 128
    block [M, ceil(K/128)]."""
    M, K = a.shape
    af = a.to(dtype)
    s = scale_a.to(dtype)
    if s.dim() <= 1:
        return af * s.reshape(())
    if s.shape == (M, 1):
        return af * s
    return af * _expand_block(s, (M, K), 1, BLOCK)


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = (a · scale_a)(b · scale_b)ᵀ + bias in float64, rounded once to out_dtype."""
    y = dequantize_act(a, scale_a) @ dequantize_weight(b, scale_b).t()
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype or torch.bfloat16)


def fp8_weight_gemm(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x · (w · w_scale)ᵀ + bias in float64, rounded once to x.dtype."""
    y = x.double() @ dequantize_weight(w, w_scale).t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
