"""The 2:4 sparse weight formats: the interchange format and the kernel layouts.

2:4 semi-structured sparsity keeps at most 2 of every 4 consecutive weights along K (the input
dimension) of a weight ``W`` [N, K] (a Linear's weight, K-major). K must be a multiple of 8: one
metadata byte describes 8 consecutive weights (two groups of 4).

Interchange format (what checkpoints hold and ``sparse24_compress`` returns)
-----------------------------------------------------------------------------
* ``values`` [N, K/2], the weight's dtype: the two kept weights of each group of 4 along K, in
  K order (group ``g`` of row ``n`` is ``values[n, 2g]``, ``values[n, 2g+1]``). A group with fewer
  than 2 nonzeros keeps zeros at its lowest free positions: its kept positions are its nonzero
  positions plus the lowest zero positions up to two, and their values are read from ``W`` (so a
  kept ``-0.0`` stays ``-0.0``).
* ``meta`` uint8 [N, K/8]: one nibble per group of 4, the group with the lower K in the low
  nibble (group ``g`` is nibble ``g % 2`` of ``meta[n, g // 2]``); nibble ``= idx0 | idx1 << 2``
  with ``idx0 < idx1`` the positions (0..3) of the kept values in the group. The six valid
  nibbles are 0x4, 0x8, 0x9, 0xC, 0xD, 0xE (:data:`VALID_NIBBLES`). Equivalently, bits
  ``2j, 2j+1`` of the row's metadata read as a little-endian bit string hold the position of
  ``values[n, j]`` within its group: the kernels decode a 32-bit word (16 values) with one
  shift per lane.

"Nonzero" means a value other than +0.0 and -0.0 (NaN and infinities are nonzero). The round
trips are exact bit for bit: ``decompress(compress(W)) == W`` for every ``W`` with the pattern,
except that a ``-0.0`` at a position that is not kept comes back as ``+0.0`` (the format has no
place for it); ``compress(decompress(values, meta)) == (values, meta)`` for every canonical pair
(one that ``compress`` can produce).

The dense weight a pair stands for is defined for every nibble (the kernels' arithmetic): each
value is added at its position, ``W[n, 4g + idx] += value`` (so an ordered nibble places two
values; the ops reject unordered nibbles on the CPU, where the check costs nothing).

2:4 + INT4 (``sparse24_int4_gemm``)
-----------------------------------
The kept values are 4-bit codes ``q`` in 0..15, in the order of ``values``: ``qvalues`` int32
[N, K/16], value ``j`` of row ``n`` in bits ``4(j % 8) .. 4(j % 8) + 3`` of
``qvalues[n, j // 8]`` (lowest nibble = lowest K). Quantization groups cover ``group_size``
DENSE K positions (``group_size % 8 == 0``, or ``-1`` for one group over K; G =
ceil(K / group_size)): the value at dense position ``k`` belongs to group ``k // group_size``.
``scales`` [G, N] and ``zeros`` [G, N] are floats (bf16, fp16 or fp32):

* symmetric (``zeros=None``): ``w = (q - 8) * s``,
* asymmetric: ``w = (q - z) * s`` (``z`` a float, GPTQ "v2" zero points, not offset by one).

Kernel layouts (:class:`Sparse24Layout`)
----------------------------------------
Produced once at load from the interchange pair and converted back exactly. Every layout keeps
``values`` as a 2-D [N, K/2] tensor (the shapes N and K are read from it); ``meta`` has the
layout's own shape and dtype.

* ``ROW`` (0): the interchange tensors as they are. The CPU kernels read it: each output row
  ``n`` streams ``values[n]`` and ``meta[n]`` contiguously (1.125 bytes per dense bf16 weight
  instead of 2), which suits both the M = 1 decode path and the panel expansion for the
  microkernel, so no separate CPU layout is needed.
* ``MMA`` (1): the ordered-metadata layout of ``mma.sp`` (sm_80 / sm_90) read by the CUDA kernel,
  defined in :mod:`bitpress.sparse24.layout_mma` (``to_mma`` / ``from_mma``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch

from bitpress._core.checks import fail

# Nibbles idx0 | idx1 << 2 with idx0 < idx1.
VALID_NIBBLES = (0x4, 0x8, 0x9, 0xC, 0xD, 0xE)
# Bit i set: nibble i is valid (the kernels test a nibble with one shift of this mask).
VALID_NIBBLE_MASK = sum(1 << v for v in VALID_NIBBLES)  # 0x7310

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# Readers of the kernel layouts other than ROW: layout -> fn(values, meta) -> (values, meta) in the
# interchange format, exactly. bitpress.sparse24 sets MMA to layout_mma.from_mma when that module
# (it ships with the CUDA kernel) is present.
READERS: dict[int, Callable] = {}
# The same for 2:4 + INT4 weights: layout -> fn(qvalues, meta) -> (qvalues, meta) (layout_mma_int4).
READERS_INT4: dict[int, Callable] = {}


class Sparse24Layout(enum.IntEnum):
    """The kernel layouts of 2:4 weights; the value is the ``layout`` argument of the
    ``bitpress::sparse24_gemm`` / ``sparse24_int4_gemm`` schemas (``bitpress::Sparse24Layout`` in
    ``csrc/include/bitpress/sparse24/sparse24.h``)."""

    ROW = 0  # the interchange tensors: the CPU kernels (and the reference)
    MMA = 1  # mma.sp ordered metadata: the CUDA kernel (bitpress.sparse24.layout_mma)


def nonzero_mask(w: torch.Tensor) -> torch.Tensor:
    """Bool tensor of ``w``'s shape: True where ``w`` is neither +0.0 nor -0.0 (read from the
    bits, so that every float dtype, float8 included, is treated alike)."""
    bits = w.contiguous().view(_INT_VIEW[w.element_size()])
    sign = torch.tensor(1, dtype=bits.dtype) << (8 * w.element_size() - 1)
    return (bits & ~sign) != 0


def check_k(op: str, name: str, K: int) -> None:
    if K % 8:
        fail(
            op,
            f"{name} must be a multiple of 8 (one 2:4 metadata byte covers 8 weights along K), "
            f"got {K}",
        )


def pattern_violation(w: torch.Tensor) -> tuple[int, int, int] | None:
    """The first (row, group, nonzeros) of ``w`` [N, K] whose group of 4 along K holds more than
    2 nonzeros (row-major order), or None when ``w`` has the 2:4 pattern."""
    N, K = w.shape
    counts = nonzero_mask(w).reshape(N, K // 4, 4).sum(-1)
    bad = (counts > 2).flatten().nonzero()
    if not len(bad):
        return None
    i = int(bad[0])
    return i // (K // 4), i % (K // 4), int(counts.flatten()[i])


def pattern_message(row: int, group: int, nonzeros: int) -> str:
    """The message of a broken pattern (the C++ check says the same)."""
    return (
        "w values must have the 2:4 pattern (at most 2 nonzeros in every 4 consecutive weights "
        f"along K): row {row}, group {group} (columns {4 * group}..{4 * group + 3}) has "
        f"{nonzeros} nonzeros"
    )


def compress(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``w`` [N, K] with the 2:4 pattern -> (values [N, K/2] in ``w.dtype``, meta uint8
    [N, K/8]), the interchange format (module docstring). Raises naming the first row and group
    that break the pattern."""
    op = "sparse24_compress"
    if w.dim() != 2:
        fail(op, f"w must be 2-D [N, K], got shape {list(w.shape)}")
    N, K = w.shape
    check_k(op, "w.size(1)", K)
    bad = pattern_violation(w)
    if bad is not None:
        fail(op, pattern_message(*bad))
    nz = nonzero_mask(w).reshape(N, K // 4, 4)
    # Kept positions: the nonzeros first, then the lowest zeros; a stable sort on "is zero" with
    # positions as tie-break gives them in position order once the first two are re-sorted.
    key = (~nz).to(torch.int64) * 4 + torch.arange(4)
    idx = key.argsort(dim=-1)[..., :2].sort(dim=-1).values  # [N, K/4, 2], idx0 < idx1
    # Gathered as integers: bit for bit, and for every float dtype (float8 has no gather).
    wi = w.contiguous().view(_INT_VIEW[w.element_size()]).reshape(N, K // 4, 4)
    vals = torch.gather(wi, 2, idx.to(w.device)).view(w.dtype)
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [N, K/4]
    meta = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return vals.reshape(N, K // 2).contiguous(), meta.contiguous()


def positions(meta: torch.Tensor) -> torch.Tensor:
    """meta uint8 [N, K/8] -> int64 [N, K/2]: the position within its group (0..3) of each
    value (bits 2j, 2j+1 of the row's metadata)."""
    N, K8 = meta.shape
    m = meta.to(torch.int64)
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(N, 2 * K8)  # [N, K/4]
    return torch.stack([nib & 3, nib >> 2], dim=-1).reshape(N, 4 * K8)


def dense_columns(meta: torch.Tensor) -> torch.Tensor:
    """meta uint8 [N, K/8] -> int64 [N, K/2]: the dense column ``4g + idx`` of each value."""
    pos = positions(meta)
    group = torch.arange(pos.shape[1], device=pos.device) // 2
    return group * 4 + pos


def decompress(values: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype | None = None):
    """(values [N, K/2], meta uint8 [N, K/8]) -> dense W [N, K] in ``dtype`` (default
    ``values.dtype``): each value added at its position (module docstring). Exact: for ordered
    nibbles each position receives at most one value."""
    N, K = values.shape[0], values.shape[1] * 2
    out_dtype = dtype or values.dtype
    cols = dense_columns(meta).to(values.device)
    if out_dtype == values.dtype and not torch.compiler.is_compiling():
        if invalid_nibble(meta) is None:
            # Bit-exact placement as integers (keeps -0.0 and NaN payloads; any float dtype).
            vi = values.contiguous().view(_INT_VIEW[values.element_size()])
            w = torch.zeros((N, K), dtype=vi.dtype, device=values.device)
            return w.scatter_(1, cols, vi).view(values.dtype)
    acc = torch.float64 if values.dtype.is_floating_point else values.dtype
    w = torch.zeros((N, K), dtype=acc, device=values.device)
    w.scatter_add_(1, cols, values.to(acc))
    return w.to(out_dtype)


def invalid_nibble(meta: torch.Tensor) -> tuple[int, int, int] | None:
    """The first (row, group, nibble) of ``meta`` [N, K/8] whose nibble is not ``idx0 | idx1 << 2``
    with ``idx0 < idx1``, or None."""
    N, K8 = meta.shape
    m = meta.to(torch.int64)
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(N, 2 * K8)
    bad = ((nib & 3) >= (nib >> 2)).flatten().nonzero()
    if not len(bad):
        return None
    i = int(bad[0])
    return i // nib.shape[1], i % nib.shape[1], int(nib.flatten()[i])


def meta_message(op: str, row: int, group: int, nibble: int) -> str:
    """The message of an unordered metadata nibble (the C++ check says the same)."""
    return (
        f"{op}: meta values must be nibbles idx0 | idx1 << 2 with idx0 < idx1 (0x4, 0x8, 0x9, "
        f"0xC, 0xD or 0xE), got 0x{nibble:X} at row {row}, group {group}"
    )


def pack_qvalues(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes q [N, K/2] (0..15, any integer dtype) -> qvalues int32 [N, K/16], value j in
    nibble j % 8 of word j // 8 (module docstring)."""
    N, H = q.shape
    q = q.to(torch.int64).reshape(N, H // 8, 8)
    shifts = torch.arange(0, 32, 4, device=q.device)
    words = (q << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_qvalues(qvalues: torch.Tensor) -> torch.Tensor:
    """qvalues int32 [N, K/16] -> codes int64 [N, K/2] (0..15)."""
    w = qvalues.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=qvalues.device)
    return ((w.unsqueeze(-1) >> shifts) & 0xF).reshape(qvalues.shape[0], 8 * qvalues.shape[1])


def groups(K: int, group_size: int) -> int:
    """G = ceil(K / group_size); ``group_size = -1``: one group over K (0 when K = 0)."""
    if group_size == -1:
        return 1 if K else 0
    return -(-K // group_size)
