"""GPTQ checkpoint tensors (AutoGPTQ / GPTQModel / optimum layout) <-> :class:`QuantizedWeight`.

Layout of one quantized Linear with in_features K, out_features N, G groups:

* ``qweight`` int32 ``[K/8, N]``, packed along K: row ``k = 8r + j`` is bits ``4j..4j+3`` of
  ``qweight[r, n]``.
* ``qzeros`` int32 ``[G, N/8]``, packed along N: column ``n = 8c + j`` is bits ``4j..4j+3`` of
  ``qzeros[g, c]``.
* ``scales`` float16 ``[G, N]`` (bfloat16 / float32 accepted too and kept as they are).
* ``g_idx`` int32 ``[K]``: the group of each row; ``k // group_size`` unless the checkpoint was
  quantized with act-order (``desc_act``), where it is not monotonic.
* ``G = ceil(K / group_size)``; ``group_size = -1`` means one group over all of K (``G = 1``).

Zero points come in two conventions (``checkpoint_format``):

* ``"gptq"`` (v1, what AutoGPTQ wrote and most checkpoints on the hub hold): the stored zero is
  the real zero minus one, masked to 4 bits. Symmetric 4-bit stores 7 in every nibble (word
  ``0x77777777``); the real zero is ``(stored + 1) & 0xF``, as the CUDA / ExLlama readers
  compute it. An asymmetric real zero of 0 is therefore stored as 15.
* ``"gptq_v2"``: the stored zero is the real zero.

``W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]``.
"""

from __future__ import annotations

import torch

from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import (
    TILE_N,
    Int4CpuTiles,
    Int4PackedWeight,
    from_cpu_nibble_order,
    unpack,
)
from bitpress.int4.packing import (
    pack_int4_along_k,
    pack_int4_along_n,
    unpack_int4_along_k,
    unpack_int4_along_n,
)
from bitpress.int4.quantized import QuantizedWeight, check_group_size

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def num_groups(in_features: int, group_size: int) -> int:
    """``G = ceil(K / group_size)``; 1 for ``group_size = -1``."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise ValueError(f"group_size must be -1 or a positive integer, got {group_size}")
    return -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx[k] = k // group_size`` (all zeros for ``group_size = -1``), int32 ``[K]``."""
    k = torch.arange(in_features, dtype=torch.int32)
    return torch.zeros_like(k) if group_size == -1 else k // group_size


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}"
        )


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def gptq_to_quantized(
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    group_size: int,
    sym: bool = True,
    checkpoint_format: str = "gptq",
    bits: int = 4,
) -> QuantizedWeight:
    """Read the tensors of one GPTQ-quantized Linear into a :class:`QuantizedWeight`.

    Parameters
    ----------
    qweight : Tensor, int32, shape [K/8, N]
    qzeros : Tensor, int32, shape [G, ceil(N/8)], or None
        ``None`` is accepted only with ``sym=True`` (every zero point is 8).
    scales : Tensor, float16 / bfloat16 / float32, shape [G, N]
        Kept in its dtype.
    g_idx : Tensor, integer, shape [K], optional
        Values in ``[0, G)``, any order (act-order); a group may be empty. ``None``:
        ``k // group_size``.
    group_size : int
        -1 (one group) or a positive integer; ``G = ceil(K / group_size)``.
    sym : bool
        Symmetric checkpoint: every real zero point must be 8 (v1 stores 7); anything else is an
        error, since a kernel may skip the zeros of a symmetric weight.
    checkpoint_format : "gptq" | "gptq_v2"
        Zero-point convention, see the module docstring.
    bits : int
        Must be 4.

    Notes
    -----
    Sign-extended v1 zeros: some writers pack the v1 zero ``0 - 1 = -1`` without masking it, so
    every higher nibble of the same qzeros word is overwritten with 15 (the zeros of the
    following columns in that word are lost). Such files cannot be repaired exactly. bitpress
    reads every nibble independently with the v1 rule ``(stored + 1) & 0xF``: the nibble that
    held the -1 reads as 0 (its intended value) and every nibble overwritten with 15 reads as 0
    too. No nibble is ever read as 16, and no error is raised, because a nibble of 15 is also
    the legitimate v1 encoding of a real zero of 0.
    """
    zeros, g = read_gptq(
        qweight,
        qzeros,
        scales,
        g_idx,
        group_size=group_size,
        sym=sym,
        checkpoint_format=checkpoint_format,
        bits=bits,
    )
    return QuantizedWeight(
        q=unpack_int4_along_k(qweight),
        scales=scales,
        zeros=zeros,
        g_idx=g,
        group_size=group_size,
        sym=sym,
    )


def read_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    group_size: int,
    sym: bool = True,
    checkpoint_format: str = "gptq",
    bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every check of :func:`gptq_to_quantized`, and the two tensors it decodes besides ``q``:
    ``(zeros [G, N] uint8 real zero points, g_idx [K] int32)``. ``qweight`` stays packed, for
    loaders that repack the words into a kernel layout without one byte per weight
    (``Int4Linear.from_gptq``)."""
    if bits != 4:
        raise ValueError(f"bits must be 4 (only INT4 GPTQ is supported), got {bits}")
    _check_format(checkpoint_format)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        raise TypeError(f"qweight must be an int32 tensor [K/8, N], got {_desc(qweight)}")
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [K/8, N], got shape {_shape(qweight)}")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    check_group_size(K, group_size)
    G = num_groups(K, group_size)

    if not isinstance(scales, torch.Tensor) or scales.dtype not in _SCALE_DTYPES:
        raise TypeError(f"scales must be a float16/bfloat16/float32 tensor, got {_desc(scales)}")
    if _shape(scales) != [G, N]:
        raise ValueError(
            f"scales must have shape [G, N] = [{G}, {N}] (K={K}, group_size={group_size}), "
            f"got {_shape(scales)}"
        )

    if qzeros is None:
        if not sym:
            raise ValueError("qzeros is required for an asymmetric (sym=False) checkpoint")
        zeros = torch.full((G, N), 8, dtype=torch.uint8)
    else:
        if not isinstance(qzeros, torch.Tensor) or qzeros.dtype != torch.int32:
            raise TypeError(f"qzeros must be an int32 tensor [G, N/8], got {_desc(qzeros)}")
        if _shape(qzeros) != [G, (N + 7) // 8]:
            raise ValueError(
                f"qzeros must have shape [G, ceil(N/8)] = [{G}, {(N + 7) // 8}] "
                f"(K={K}, N={N}, group_size={group_size}), got {_shape(qzeros)}"
            )
        zeros = unpack_int4_along_n(qzeros, N)
        if checkpoint_format == "gptq":
            # v1 stores z - 1 masked to 4 bits; the +1 must wrap (15 -> 0), see the docstring.
            zeros = (zeros + 1) & 0xF
        if sym and bool((zeros != 8).any()):
            bad = (zeros != 8).nonzero()[0].tolist()
            raise ValueError(
                f"qzeros: sym=True needs every real zero point to be 8 ("
                f"{'stored 7, words 0x77777777' if checkpoint_format == 'gptq' else 'stored 8'}"
                f" for checkpoint_format={checkpoint_format!r}), got {int(zeros[bad[0], bad[1]])}"
                f" at [group {bad[0]}, column {bad[1]}]; load it with sym=False"
            )

    if g_idx is None:
        g = default_g_idx(K, group_size)
    else:
        if not isinstance(g_idx, torch.Tensor) or g_idx.dtype.is_floating_point:
            raise TypeError(f"g_idx must be an integer tensor [K], got {_desc(g_idx)}")
        if g_idx.dim() == 1 and g_idx.shape[0] != K and g_idx.shape[0] % 8 == 0:
            # g_idx [K] is the plain statement of K: a qweight whose rows disagree is wrong.
            Kg = g_idx.shape[0]
            raise ValueError(
                f"qweight must have shape [K/8, N] = [{Kg // 8}, {N}] (K = g_idx.size(0) = {Kg}), "
                f"got {_shape(qweight)}"
            )
        if _shape(g_idx) != [K]:
            raise ValueError(f"g_idx must have shape [K] = [{K}], got {_shape(g_idx)}")
        if K and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
            raise ValueError(
                f"g_idx values must lie in [0, G) = [0, {G}) (K={K}, group_size={group_size}), "
                f"got [{int(g_idx.min())}, {int(g_idx.max())}]"
            )
        g = g_idx.to(torch.int32)
    return zeros, g


def quantized_to_gptq(
    qw: QuantizedWeight, checkpoint_format: str = "gptq"
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`gptq_to_quantized`: ``{"qweight", "qzeros", "scales", "g_idx"}``.

    ``"gptq"`` (v1) stores ``(zero - 1) & 0xF`` (symmetric: 0x77777777), ``"gptq_v2"`` the
    zero itself. Scales keep their dtype; ``g_idx`` is always written (int32), as AutoGPTQ does.
    """
    _check_format(checkpoint_format)
    K, N = qw.q.shape
    if K % 8:
        raise ValueError(f"in_features K must be a multiple of 8 to pack qweight, got {K}")
    zeros = qw.zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        zeros = (zeros - 1) & 0xF
    return {
        "qweight": pack_int4_along_k(qw.q),
        "qzeros": pack_int4_along_n(zeros),
        "scales": qw.scales.contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def _desc(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).removeprefix('torch.')} {_shape(t)}"
    return type(t).__name__


def packed_to_gptq(
    w: Int4PackedWeight, group_size: int, sym: bool, checkpoint_format: str
) -> dict[str, torch.Tensor]:
    """``quantized_to_gptq(unpack(w, group_size, sym), checkpoint_format)``; CPU tiles whose rows
    stay in order (any checkpoint without act-order) straight from the words, a block at a
    time."""
    if not isinstance(w, Int4CpuTiles) or w.perm is not None:
        return quantized_to_gptq(unpack(w, group_size, sym), checkpoint_format)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}"
        )
    K, N = w.in_features, w.out_features
    Nt, K8, _ = w.qweight.shape
    G = w.scales.shape[1]
    src = w.qweight.cpu().permute(1, 0, 2)  # [K/8, Nt, TILE_N]
    qweight = torch.empty(K8, N, dtype=torch.int32)
    step = max(1, int4_layout.CHUNK_WORDS // (Nt * TILE_N))
    for o in range(0, K8, step):
        block = src[o : o + step].reshape(-1, Nt * TILE_N)[:, :N]
        qweight[o : o + step] = from_cpu_nibble_order(block)

    def untile(t: torch.Tensor) -> torch.Tensor:
        return t.cpu().permute(1, 0, 2).reshape(G, Nt * TILE_N)[:, :N]

    zeros = torch.full((G, N), 8, dtype=torch.int64) if w.zeros is None else untile(w.zeros)
    zeros = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        zeros = (zeros - 1) & 0xF
    starts = w.group_starts.cpu().long() * 8
    g_idx = torch.bucketize(torch.arange(K), starts[1:], right=True).to(torch.int32)
    return {
        "qweight": qweight,
        "qzeros": pack_int4_along_n(zeros),
        "scales": untile(w.scales).to(w.scale_dtype).contiguous(),
        "g_idx": g_idx,
    }
