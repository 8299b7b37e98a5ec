"""The result of every INT4 quantizer, in one format that the modules and the checkpoint code
share.

Conventions (in_features K, out_features N, G groups):

* ``q`` [K, N] uint8, values 0..15 — note K first: this is the transpose of ``nn.Linear.weight``
  ([N, K]), matching the GPTQ checkpoint layout (qweight [K/8, N] packs along K).
* ``scales`` [G, N] float, ``zeros`` [G, N] uint8 real zero points 0..15 (8 for symmetric).
* ``g_idx`` [K] int32: the group of each row k (``k // group_size`` unless act-order).
* The weight represented is ``W[n, k] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n]``.
"""

from __future__ import annotations

import dataclasses

import torch

from bitpress.int4.packing import pack_int4_along_k, pack_int4_along_n


@dataclasses.dataclass
class QuantizedWeight:
    q: torch.Tensor  # [K, N] uint8 0..15
    scales: torch.Tensor  # [G, N]
    zeros: torch.Tensor  # [G, N] uint8 0..15, real zero points
    g_idx: torch.Tensor  # [K] int32
    group_size: int  # -1: one group over K
    sym: bool

    @property
    def in_features(self) -> int:
        return self.q.shape[0]

    @property
    def out_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The represented weight in nn.Linear orientation, [N, K]."""
        g = self.g_idx.long()
        w = (self.q.to(torch.int32) - self.zeros.to(torch.int32)[g]).float()
        return (w * self.scales.float()[g]).t().to(dtype)

    def to_gptq(self) -> dict[str, torch.Tensor]:
        """GPTQ tensors with real zero points ("gptq_v2"): qweight [K/8, N], qzeros
        [G, ceil(N/8)], scales [G, N], g_idx [K]."""
        return {
            "qweight": pack_int4_along_k(self.q),
            "qzeros": pack_int4_along_n(self.zeros),
            "scales": self.scales,
            "g_idx": self.g_idx.to(torch.int32),
        }


def check_group_size(in_features: int, group_size: int) -> int:
    """Validate ``group_size`` against ``K`` and return the effective group width: the one
    validation of every INT4 entry point (modules, configs, formats, checkpoints)."""
    if in_features % 8:
        raise ValueError(f"in_features K must be a multiple of 8 (INT4 packing), got {in_features}")
    if group_size == -1:
        return in_features
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be -1 or a positive multiple of 8, got {group_size}")
    return group_size
