"""INT4 packing: eight 4-bit values per int32, element j of a word in bits 4j..4j+3.

Two directions, as GPTQ checkpoints use them:

* along K (qweight): ``q [K, N]`` -> ``[K/8, N]``; row k = 8r + j is nibble j of word ``[r, n]``.
* along N (qzeros):  ``z [G, N]`` -> ``[G, ceil(N/8)]``; column n = 8c + j is nibble j of
  word ``[g, c]`` (the last word zero-padded when N is not a multiple of 8).

Values are unsigned 0..15. The words are int32 with the same bits (bit 31 set means negative).
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _check_nibbles(q: torch.Tensor, name: str) -> None:
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of values 0..15, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"{name} values must lie in 0..15, got [{int(q.min())}, {int(q.max())}]")


def pack_int4_along_k(q: torch.Tensor) -> torch.Tensor:
    """``q [K, N]`` (values 0..15, K a multiple of 8) -> int32 ``[K/8, N]``."""
    _check_nibbles(q, "q")
    if q.dim() != 2 or q.shape[0] % 8:
        raise ValueError(f"q must be [K, N] with K a multiple of 8, got shape {tuple(q.shape)}")
    K, N = q.shape
    q = q.to(torch.int64).reshape(K // 8, 8, N)
    words = (q << _SHIFTS.to(q.device, torch.int64).view(1, 8, 1)).sum(dim=1)
    return _to_int32(words)


def unpack_int4_along_k(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[K/8, N]`` -> ``[K, N]`` uint8 values 0..15."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(
            f"qweight must be int32 [K/8, N], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    R, N = qweight.shape
    nib = (qweight.unsqueeze(1) >> _SHIFTS.to(qweight.device).view(1, 8, 1)) & 0xF
    return nib.reshape(R * 8, N).to(torch.uint8)


def pack_int4_along_n(z: torch.Tensor) -> torch.Tensor:
    """``z [G, N]`` (values 0..15) -> int32 ``[G, ceil(N/8)]``."""
    _check_nibbles(z, "z")
    if z.dim() != 2:
        raise ValueError(f"z must be [G, N], got shape {tuple(z.shape)}")
    G, N = z.shape
    pad = (-N) % 8
    z = torch.nn.functional.pad(z.to(torch.int64), (0, pad)).reshape(G, (N + pad) // 8, 8)
    words = (z << _SHIFTS.to(z.device, torch.int64).view(1, 1, 8)).sum(dim=2)
    return _to_int32(words)


def unpack_int4_along_n(qzeros: torch.Tensor, n: int) -> torch.Tensor:
    """int32 ``[G, ceil(n/8)]`` -> ``[G, n]`` uint8 values 0..15."""
    if qzeros.dtype != torch.int32 or qzeros.dim() != 2:
        raise TypeError(f"qzeros must be int32 [G, N/8], got {qzeros.dtype} {tuple(qzeros.shape)}")
    G, C = qzeros.shape
    if C != (n + 7) // 8:
        raise ValueError(f"qzeros.shape[1] must be ceil(N/8) = {(n + 7) // 8}, got {C}")
    nib = (qzeros.unsqueeze(2) >> _SHIFTS.to(qzeros.device).view(1, 1, 8)) & 0xF
    return nib.reshape(G, C * 8)[:, :n].to(torch.uint8)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Values are in [0, 2^32): reinterpret the low 32 bits as int32 (two's complement).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
