"""Plain-PyTorch references of the 2:4 ops (the ground truth every backend is tested against).

Imports only torch, core and :mod:`bitpress.sparse24.layout`. The GEMMs compute in float64 and
round once to ``x.dtype``. Weights in a kernel layout other than ``ROW`` are converted to the
interchange format first (:func:`to_row`).
"""

from __future__ import annotations

import torch

from bitpress._core.checks import fail
from bitpress.sparse24 import layout as _layout
from bitpress.sparse24.layout import Sparse24Layout


def to_row(values: torch.Tensor, meta: torch.Tensor, layout: int):
    """A weight in kernel layout ``layout`` -> the interchange (values [N, K/2], meta uint8
    [N, K/8]), exactly."""
    if layout == Sparse24Layout.ROW:
        return values, meta
    if layout in _layout.READERS:
        return _layout.READERS[layout](values, meta)
    fail("sparse24_gemm", f"layout {int(layout)} cannot be read back on this install")


def sparse24_compress(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense w [N, K] -> (values [N, K/2], meta uint8 [N, K/8]); raises on a broken pattern."""
    return _layout.compress(w)


def _dense(values, meta, layout) -> torch.Tensor:
    values, meta = to_row(values, meta, layout)
    return _layout.decompress(values, meta, torch.float64)  # [N, K]


def _linear64(x, w64, bias) -> torch.Tensor:
    y = x.double() @ w64.t().to(x.device)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def sparse24_gemm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    layout: int = Sparse24Layout.ROW,
) -> torch.Tensor:
    """y [..., N] = x [..., K] · Wᵀ + bias in float64, rounded once to x.dtype."""
    return _linear64(x, _dense(values, meta, layout), bias)


def int4_dense(
    qvalues: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    layout: int = Sparse24Layout.ROW,
) -> torch.Tensor:
    """The dense weight W [N, K] (float64) of a 2:4 + INT4 weight (layout module docstring)."""
    if layout != Sparse24Layout.ROW:
        if layout not in _layout.READERS_INT4:
            fail("sparse24_int4_gemm", f"layout {int(layout)} cannot be read back on this install")
        qvalues, meta = _layout.READERS_INT4[layout](qvalues, meta)
    qv = _layout.unpack_qvalues(qvalues).to(torch.float64)  # [N, K/2]
    N, K = qv.shape[0], qv.shape[1] * 2
    cols = _layout.dense_columns(meta).to(qv.device)  # [N, K/2]
    gs = max(K, 1) if group_size == -1 else group_size
    g = cols // gs  # [N, K/2]
    n = torch.arange(N, device=qv.device).unsqueeze(1)
    s = scales.double()[g, n]
    z = zeros.double()[g, n] if zeros is not None else 8.0
    w = torch.zeros((N, K), dtype=torch.float64, device=qv.device)
    return w.scatter_add_(1, cols, (qv - z) * s)


def sparse24_int4_gemm(
    x: torch.Tensor,
    qvalues: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    group_size: int = 128,
    bias: torch.Tensor | None = None,
    layout: int = Sparse24Layout.ROW,
) -> torch.Tensor:
    """y [..., N] = x · Wᵀ + bias in float64 (W from :func:`int4_dense`), rounded once."""
    return _linear64(x, int4_dense(qvalues, meta, scales, zeros, group_size, layout), bias)
