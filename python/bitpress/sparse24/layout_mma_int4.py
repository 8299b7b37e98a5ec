"""The mma.sp layout of 2:4 + INT4 weights (``Sparse24Layout.MMA`` for ``sparse24_int4_gemm``),
read by the CUDA kernel on sm_80 / sm_90a. Torch only; converts the interchange format to it and
back, bit for bit.

Interchange format (:mod:`bitpress.sparse24.layout`): ``qvalues`` int32 [N, K/16], the kept
values of each row as 4-bit codes in the order of ``values`` (value j in nibble j % 8 of word
j // 8); ``meta`` uint8 [N, K/8] (one nibble idx0 | idx1 << 2 per group of 4 along K);
``scales`` / ``zeros`` [G, N].

Kernel layout (N % 16 == 0, K % 32 == 0, see :func:`supports`; other weights keep ``ROW``):

* ``qvalues_mma`` int32 [N, K/16] (the interchange shape, so that N and K are read from it),
  holding the words [N/16, K/32, 32] in order: word 32 (nt K/32 + kt) + l holds the 8 codes of
  lane l's A fragment of tile (nt, kt) (16 rows of W x 32 dense K), i.e. the values that
  :func:`bitpress.sparse24.layout_mma.to_mma` puts at elements 8 l .. 8 l + 7 of that tile. Code
  v (0..7) sits in nibble ``(v >> 1) + 4 (v & 1)`` (nibbles hold v = 0, 2, 4, 6, 1, 3, 5, 7), so
  that ``(word >> 4p) & 0x000F000F`` puts the codes of A register p (values 2p, 2p + 1) in the
  two 16-bit halves: one lop3 turns them into half2(M + q) for the kernel's decode
  (``csrc/include/bitpress/sparse24/sparse24_int4_mma.h``). A pure permutation of the nibbles.
* ``meta_mma`` int32 [N/16, ceil(K/64), 32]: exactly :func:`layout_mma.to_mma`'s metadata.
* ``scales`` and ``zeros`` stay [G, N] (the kernel copies each block's 64 columns per group);
  the CUDA kernel needs ``group_size % 32 == 0`` or ``-1`` so that a 32-K tile has one group.

The C++ maps (``sparse24_int4_mma_nibble``, ``sparse24_int4_mma_word_index``) are checked against
:func:`mma_int4_code_source` by ``tests/cpp/test_sparse24_int4_mma.cpp``, which rebuilds the same
permutation from the bf16 layout's fixture.
"""

from __future__ import annotations

import torch

from bitpress.sparse24 import layout_mma
from bitpress.sparse24.layout import pack_qvalues, unpack_qvalues

# Nibble of A-fragment value v (0..7) in its lane's word, and the value held by each nibble.
NIBBLE_OF_VALUE = (0, 4, 1, 5, 2, 6, 3, 7)
VALUE_OF_NIBBLE = (0, 2, 4, 6, 1, 3, 5, 7)


def supports(n: int, k: int, group_size: int) -> bool:
    """Whether an [n, k] 2:4 + INT4 weight with ``group_size`` runs on the CUDA kernel: whole
    16 x 32 tiles (:func:`layout_mma.supports`) and groups of whole 32-K tiles."""
    return layout_mma.supports(n, k) and (
        group_size == -1 or (group_size > 0 and group_size % 32 == 0)
    )


def mma_int4_code_source(n: int, k: int) -> torch.Tensor:
    """For every nibble i (0..7) of every word of ``qvalues_mma`` (as [n/16, k/32, 32, 8]), the
    flat index of its code in the interchange codes [n, k/2] (row-major). int64; a permutation."""
    src = layout_mma.mma_value_source(n, k).view(n // 16, k // 32, 32, 8)
    return src[..., list(VALUE_OF_NIBBLE)]


def _check_qvalues(fn: str, qvalues: torch.Tensor) -> tuple[int, int]:
    if qvalues.dim() != 2 or qvalues.dtype != torch.int32:
        raise ValueError(
            f"{fn}: qvalues must be int32 [N, K/16], got {qvalues.dtype} {list(qvalues.shape)}"
        )
    n, k = qvalues.shape[0], 16 * qvalues.shape[1]
    layout_mma._check_nk(fn, n, k)
    return n, k


def to_mma_int4(qvalues: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interchange (qvalues int32 [N, K/16], meta uint8 [N, K/8]) -> (qvalues_mma int32
    [N, K/16], meta_mma int32 [N/16, ceil(K/64), 32]) on qvalues' device. N % 16 == 0,
    K % 32 == 0. ``scales`` and ``zeros`` need no conversion."""
    n, k = _check_qvalues("to_mma_int4", qvalues)
    codes = unpack_qvalues(qvalues)  # [N, K/2] int64, in the order of values
    # The metadata conversion (and its checks) is the bf16 layout's; the codes ride along as a
    # values tensor of the same shape.
    _, meta_mma = layout_mma.to_mma(codes, meta)
    src = mma_int4_code_source(n, k).to(qvalues.device).view(-1)
    nib = codes.reshape(-1)[src].view(-1, 8)
    words = pack_qvalues(nib.view(n, k // 2))
    return words.contiguous(), meta_mma


def from_mma_int4(
    qvalues_mma: torch.Tensor, meta_mma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`to_mma_int4`: (qvalues int32 [N, K/16], meta uint8 [N, K/8]),
    N and K read from ``qvalues_mma``."""
    n, k = _check_qvalues("from_mma_int4", qvalues_mma)
    nib = unpack_qvalues(qvalues_mma).reshape(-1)  # nibble order of the words
    src = mma_int4_code_source(n, k).to(qvalues_mma.device).view(-1)
    codes = torch.empty(n * (k // 2), dtype=torch.int64, device=qvalues_mma.device)
    codes[src] = nib
    placeholder = torch.zeros((n, k // 2), dtype=torch.int16, device=qvalues_mma.device)
    _, meta = layout_mma.from_mma(placeholder, meta_mma)
    return pack_qvalues(codes.view(n, k // 2)), meta
