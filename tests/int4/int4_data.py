"""Random INT4 test data in the GPTQ layout."""

from __future__ import annotations

import dataclasses

import torch

from bitpress.int4.packing import pack_int4_along_k, pack_int4_along_n


@dataclasses.dataclass
class Int4Data:
    q: torch.Tensor  # [K, N] int64 values 0..15
    z: torch.Tensor | None  # [G, N] real zero points, or None (symmetric)
    scales: torch.Tensor  # [G, N]
    g_idx: torch.Tensor | None  # [K] int32, or None
    group_size: int
    qweight: torch.Tensor  # [K/8, N] int32
    qzeros: torch.Tensor | None  # [G, ceil(N/8)] int32

    def args(self, device="cpu"):
        def mv(t):
            return t.to(device) if t is not None else None

        return (mv(self.qweight), mv(self.scales), mv(self.qzeros), mv(self.g_idx), self.group_size)


def make_int4(
    K, N, group_size=128, dtype=torch.float16, zeros=False, act_order=False, gen=None
) -> Int4Data:
    gen = gen or torch.Generator().manual_seed(K * 1009 + N)
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    q = torch.randint(0, 16, (K, N), generator=gen)
    z = torch.randint(0, 16, (G, N), generator=gen) if zeros else None
    scales = (torch.randn(G, N, generator=gen) * 0.02).to(dtype)
    g_idx = None
    if act_order:
        # desc_act checkpoints: each row keeps a group of size gs, in a permuted order.
        g_idx = (torch.randperm(K, generator=gen) // gs).to(torch.int32)
    return Int4Data(
        q,
        z,
        scales,
        g_idx,
        group_size,
        pack_int4_along_k(q),
        pack_int4_along_n(z) if zeros else None,
    )


def make_quantized(
    K, N, group_size=128, sym=True, act_order=False, scale_dtype=torch.float16, seed=0
):
    """A random QuantizedWeight (bitpress.int4.quantized) with K rows and N columns."""
    from bitpress.int4.quantized import QuantizedWeight

    gen = torch.Generator().manual_seed(seed + 7919 * K + N)
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    q = torch.randint(0, 16, (K, N), generator=gen).to(torch.uint8)
    zeros = (
        torch.full((G, N), 8, dtype=torch.uint8)
        if sym
        else torch.randint(0, 16, (G, N), generator=gen).to(torch.uint8)
    )
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.002).to(scale_dtype)
    if act_order:
        g_idx = (torch.randperm(K, generator=gen) % G).to(torch.int32)
    else:
        g_idx = (torch.arange(K) // gs).to(torch.int32)
    return QuantizedWeight(q, scales, zeros, g_idx, group_size, sym)
