"""Plain-PyTorch reference of the INT4 ops: the ground truth of the tests.

Each function computes exactly what the op's docstring in :mod:`bitpress.int4.ops` defines, in
the simplest way, on any device. No kernel tricks and no speed: only clarity. Imports only torch
and the INT4 layouts.
"""

from __future__ import annotations

import torch

from bitpress.int4.layout import Int4PackedWeight, mma_qweight, unpack
from bitpress.int4.packing import unpack_int4_along_k, unpack_int4_along_n


def int4_dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    group_size: int = 128,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n] in float32, rounded once to ``dtype``."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    q = unpack_int4_along_k(qweight).to(torch.int32)
    if g_idx is not None:
        g = g_idx.long()
    else:
        gs = K if group_size == -1 else group_size
        g = torch.arange(K, device=qweight.device) // max(gs, 1)
    z = unpack_int4_along_n(qzeros, N).to(torch.int32)[g] if qzeros is not None else 8
    w = (q - z).to(torch.float32) * scales.to(torch.float32)[g]
    return w.to(dtype or scales.dtype)


def dequantize_packed(weight: Int4PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] of a packed weight (either layout), in ``dtype``, on the CPU."""
    return unpack(weight).dequantize(dtype)


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W4A8's activation quantization: per row (last dim) symmetric int8 with a float32 scale.

    sx = amax|x| / 127 in float32 (1 for an all-zero row), xq = round_half_even(x / sx) computed
    in float32 (IEEE division, then torch.round), clamped to [-127, 127]. Returns (xq as float64,
    sx [..., 1] float32).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    sx = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    xq = torch.round(xf / sx).clamp(-127, 127)
    return xq.double(), sx


def int4_gemm(
    x: torch.Tensor,
    weight: Int4PackedWeight,
    bias: torch.Tensor | None = None,
    act_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x · Wᵀ + bias in float64, rounded once to x.dtype; W unpacked from its layout.

    act_dtype=torch.int8 (W4A8): x replaced by sx * xq (quantize_act_int8), the sum over k of
    xq (q - z) s computed exactly in float64, times sx.
    """
    w = dequantize_packed(weight, torch.float64).to(x.device)  # [N, K]
    if act_dtype is not None:
        xq, sx = quantize_act_int8(x)
        y = (xq @ w.t()) * sx.double()
        if bias is not None:
            y = y + bias.double()
        return y.to(x.dtype)
    y = x.double() @ w.t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def int4_gemm_repack(qweight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """GPTQ qweight [K/8, N] (+ perm [Kp]) -> the GPU mma layout's qweight [Kp/16, Nt*128]."""
    q = unpack_int4_along_k(qweight.cpu())
    return mma_qweight(q, None if perm is None else perm.cpu()).to(qweight.device)
