"""AWQ (AutoAWQ "GEMM" layout, llm-awq) tensors <-> :class:`QuantizedWeight`.

Layout of one quantized Linear with in_features K, out_features N (a multiple of 8), G groups:

* ``qweight`` int32 ``[K, N/8]``, packed along **N** (GPTQ packs along K): word ``[k, c]``
  holds columns ``8c .. 8c+7`` in the interleaved order ``0, 2, 4, 6, 1, 3, 5, 7``: nibble ``i``
  (bits ``4i..4i+3``) is column ``8c + AWQ_ORDER[i]``. The interleave lets the AWQ kernel
  convert two nibbles to two fp16 values at once with one LOP3 per pair.
* ``qzeros`` int32 ``[G, N/8]``, the same packing, holding the **real** zero points (no v1-style
  "minus one" offset).
* ``scales`` float16 ``[G, N]``; groups are always ``k // group_size`` (no act-order).

``W[n, k] = (q[k, n] - zero[k // group_size, n]) * scales[k // group_size, n]``.
"""

from __future__ import annotations

import torch

from bitpress.int4.format_gptq import default_g_idx, num_groups
from bitpress.int4.quantized import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> uint8 [R, N] in column order."""
    R, C = words.shape
    nib = (words.unsqueeze(2) >> _SHIFTS.view(1, 1, 8)) & 0xF  # [R, C, nibble i]
    out = torch.empty(R, C, 8, dtype=torch.uint8)
    out[:, :, list(AWQ_ORDER)] = nib.to(torch.uint8)
    return out.reshape(R, C * 8)


def _pack_awq(v: torch.Tensor) -> torch.Tensor:
    """uint8 [R, N] (0..15, N % 8 == 0) -> int32 [R, N/8]."""
    R, N = v.shape
    nib = v.to(torch.int64).reshape(R, N // 8, 8)[:, :, list(AWQ_ORDER)]
    words = (nib << _SHIFTS.to(torch.int64).view(1, 1, 8)).sum(dim=2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_to_quantized(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> QuantizedWeight:
    """Read the tensors of one AWQ-quantized Linear (always asymmetric: ``sym=False``).

    Parameters
    ----------
    qweight : Tensor, int32, shape [K, N/8]
    qzeros : Tensor, int32, shape [G, N/8] (real zero points)
    scales : Tensor, float16 / bfloat16 / float32, shape [G, N] (kept in its dtype)
    group_size : int
        -1 or positive; ``G = ceil(K / group_size)``.
    """
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"qweight must be an int32 tensor [K, N/8], got {_desc(qweight)}")
    K, N = qweight.shape[0], qweight.shape[1] * 8
    if K % 8:
        raise ValueError(f"qweight: K = qweight.size(0) must be a multiple of 8, got {K}")
    G = num_groups(K, group_size)
    if not isinstance(qzeros, torch.Tensor) or qzeros.dtype != torch.int32:
        raise TypeError(f"qzeros must be an int32 tensor [G, N/8], got {_desc(qzeros)}")
    if list(qzeros.shape) != [G, N // 8]:
        raise ValueError(
            f"qzeros must have shape [G, N/8] = [{G}, {N // 8}] (K={K}, group_size={group_size}), "
            f"got {list(qzeros.shape)}"
        )
    if not isinstance(scales, torch.Tensor) or not scales.dtype.is_floating_point:
        raise TypeError(f"scales must be a floating-point tensor [G, N], got {_desc(scales)}")
    if list(scales.shape) != [G, N]:
        raise ValueError(
            f"scales must have shape [G, N] = [{G}, {N}] (K={K}, group_size={group_size}), "
            f"got {list(scales.shape)}"
        )
    return QuantizedWeight(
        q=_unpack_awq(qweight),
        scales=scales,
        zeros=_unpack_awq(qzeros),
        g_idx=default_g_idx(K, group_size),
        group_size=group_size,
        sym=False,
    )


def pack_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The AWQ tensors ``{"qweight", "qzeros", "scales"}`` of ``qw`` (inverse of
    :func:`awq_to_quantized`); ``qw`` must use the default groups (AWQ has no act-order)."""
    K, N = qw.q.shape
    if N % 8:
        raise ValueError(f"out_features N must be a multiple of 8 for AWQ packing, got {N}")
    if not torch.equal(qw.g_idx.to(torch.int32), default_g_idx(K, qw.group_size)):
        raise ValueError("g_idx must be k // group_size: AWQ cannot store act-order groups")
    return {
        "qweight": _pack_awq(qw.q.cpu()),
        "qzeros": _pack_awq(qw.zeros.cpu()),
        "scales": qw.scales.contiguous(),
    }


def _desc(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
    return type(t).__name__
