"""Round-to-nearest INT4 quantization, with the per-group parameters GPTQ uses.

Per group of ``group_size`` input columns and per output row (``maxq = 15``):

* symmetric: ``scale = 2·max|w| / 15``, ``zero = 8``;
* asymmetric: ``lo = min(min w, 0)``, ``hi = max(max w, 0)``, ``scale = (hi − lo) / 15``,
  ``zero = round(−lo / scale)`` (in 0..15 because the range contains 0);
* ``q = clamp(round(w / scale) + zero, 0, 15)``, ``ŵ = (q − zero) · scale``.

These are the formulas of the GPTQ reference quantizer (``Quantizer.find_params``), with two
deliberate differences:

* The reference's symmetric scale is ``max(|lo|, hi) · 2 / 15`` only when the group has a
  negative value; a group with no negative value gets ``hi / 15`` and then clips everything
  above ``7·scale``. bitpress always uses ``2·max|w| / 15``.
* The scale is rounded to ``scale_dtype`` (float16, what checkpoints store) *before* ``q`` is
  computed, so the stored ``(q, zero, scale)`` represent exactly the weight the quantizer (and
  GPTQ's error feedback) worked with.

An all-zero group (``hi = lo = 0``) gets the reference's range ``[−1, 1]`` (``scale = 2/15``,
``zero = 8``): every weight quantizes to ``q = zero`` and is reproduced exactly (0). A scale that
underflows ``scale_dtype`` is set to 1 for the same reason.
"""

from __future__ import annotations

import torch

from bitpress.int4.quantized import QuantizedWeight, check_group_size

MAXQ = 15


def find_params(
    w: torch.Tensor, sym: bool, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of ``w [N, cols]`` (float32), as floats.

    ``scale`` holds values already representable in ``scale_dtype``; ``zero`` holds integers.
    """
    w = w.float()
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / MAXQ).to(scale_dtype).float()
    scale = torch.where(scale == 0, 1.0, scale)
    if sym:
        zero = torch.full_like(scale, (MAXQ + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, MAXQ)
    return scale, zero


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``clamp(round(w / scale) + zero, 0, 15)`` (float; broadcast scale/zero over ``w``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, MAXQ)


def rtn_quantize(
    weight: torch.Tensor,
    group_size: int = 128,
    sym: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Round-to-nearest INT4 quantization of ``weight [N, K]`` (nn.Linear orientation).

    Parameters
    ----------
    weight : Tensor, float, shape [N, K]
    group_size : int
        -1 (one group over K) or a positive multiple of 8; ``G = ceil(K / group_size)``.
    sym : bool
        Symmetric (zero 8) or asymmetric (min/max) groups; formulas in the module docstring.
    scale_dtype : torch.dtype
        dtype of the returned scales (float16, as GPTQ checkpoints store them).

    Returns
    -------
    QuantizedWeight with ``q [K, N]``, ``scales [G, N]`` (``scale_dtype``), ``zeros [G, N]``,
    ``g_idx = k // group_size``.
    """
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(
            f"weight must be a floating-point [N, K] tensor, "
            f"got {weight.dtype} {list(weight.shape)}"
        )
    N, K = weight.shape
    gs = check_group_size(K, group_size)
    w = weight.detach().float().cpu().contiguous()
    q = torch.empty(N, K)
    scales, zeros = [], []
    # The full groups at once, as rows of [N * G, gs] (contiguous in a row-major weight; a loop
    # over strided column blocks took seconds per Llama-sized layer), then a partial last group.
    full = K // gs * gs
    if full:
        blk = w[:, :full].reshape(-1, gs)
        scale, zero = find_params(blk, sym, scale_dtype)
        q[:, :full] = quantize_values(blk, scale[:, None], zero[:, None]).reshape(N, full)
        scales += list(scale.reshape(N, -1).t())
        zeros += list(zero.reshape(N, -1).t())
    if full < K:
        blk = w[:, full:]
        scale, zero = find_params(blk, sym, scale_dtype)
        q[:, full:] = quantize_values(blk, scale[:, None], zero[:, None])
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(K, dtype=torch.int32) // gs
    return QuantizedWeight(
        q=q.t().contiguous().to(torch.uint8),
        scales=torch.stack(scales).to(scale_dtype),
        zeros=torch.stack(zeros).to(torch.uint8),
        g_idx=g_idx,
        group_size=group_size,
        sym=sym,
    )
