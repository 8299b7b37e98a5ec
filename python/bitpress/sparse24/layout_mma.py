"""The mma.sp layout of 2:4 sparse weights (``Sparse24Layout.MMA``), read by the CUDA
``sparse24_gemm`` kernel on sm_80 / sm_90a. Torch only; converts the interchange format to it and
back, bit for bit.

Interchange format (what checkpoints hold and ``sparse24_compress`` returns): ``values``
[N, K/2] in the weight dtype, the two kept weights of each group of 4 along K in K order;
``meta`` uint8 [N, K/8], one nibble per group (low nibble = lower K), nibble = idx0 | idx1 << 2
with idx0 < idx1 the positions of the kept values in the group. K % 8 == 0.

The kernel computes y^T = W x^T with W as the sparse operand A of
``mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{bf16,f16}`` (PTX ISA, "Matrix
multiply-accumulate operation using mma.sp instruction with sparse matrix A": "Sparse matrix
storage" and "Matrix fragments for sparse mma.m16n8k32 with .f16 and .bf16 types", sparsity
selector 0 / 1). A tile is 16 rows of W x 32 dense K (16 x 16 kept values). With g = lane // 4,
t = lane % 4:

* A fragment of lane l: value v (0..7) is row ``g + 8 * ((v >> 1) & 1)``, compressed column
  ``2t + (v & 1) + 8 * (v >> 2)`` of the tile (the dense m16n8k16 A fragment over the
  compressed columns; compressed columns 2j, 2j + 1 are the kept values of group j).
* metadata: with selector s, lanes 4g + 2s + p (p = 0, 1) supply the ``e`` register: bits
  [15:0] = row g, dense columns 16p..16p+15, bits [31:16] = row g + 8, the same columns; one
  interchange nibble per group, lower groups in lower bits. ``::ordered_metadata`` needs
  idx0 < idx1, which the interchange format guarantees (and ``to_mma`` checks).

Kernel layout (N % 16 == 0, K % 32 == 0; other weights keep ``Sparse24Layout.ROW``, see
:func:`supports`):

* ``values_mma`` [N, K/2], weight dtype (the shape of the interchange ``values``, so that N and K
  are read from it as for every layout), holding the tiles [N/16, K/32, 256] in order: tile
  (nt, kt) lane-major, element 256 (nt K/32 + kt) + 8 l + v is value v of lane l's A fragment
  (one 16-byte load per lane per tile). A pure permutation of ``values``.
* ``meta_mma`` int32 [N/16, ceil(K/64), 32]: pair kp holds k-tiles 2kp (selector 0) and 2kp + 1
  (selector 1); word l is lane l's ``e`` register for k-tile 2kp + (t >> 1), half p = t & 1.
  Every lane loads one word per 64 K and passes it to both mma.sp. When K/32 is odd, the second
  half of the last pair is padding: nibbles 0x4 (idx0 0, idx1 1; valid and ordered), never used.

The same maps are written in C++ in ``csrc/include/bitpress/sparse24/sparse24_mma_layout.h``;
``tests/cpp/sparse24_mma_fixture.h`` (generated from :func:`mma_value_source` and
:func:`mma_meta_source`, checked by ``tests/sparse24/test_sparse24_layout_mma.py``) holds both to
one definition.
"""

from __future__ import annotations

import torch

TILE_N = 16  # rows of W per tile: the m of mma.sp.m16n8k32
TILE_K = 32  # dense K per tile: the k of mma.sp.m16n8k32
TILE_VALUES = 256  # kept values per tile: 32 lanes x 8
PAIR_K = 64  # dense K whose metadata one 32-bit word per lane holds (selectors 0 and 1)
PAIR_WORDS = 32  # metadata words per (tile row, pair): one per lane
PAD_NIBBLE = 0x4  # metadata of a padding group: idx0 = 0, idx1 = 1


def padded_k(k: int) -> int:
    """K rounded up to a multiple of 64 (one metadata pair): meta_mma covers this much K."""
    return -(-k // PAIR_K) * PAIR_K


def supports(n: int, k: int) -> bool:
    """Whether an [n, k] weight has an mma layout (n % 16 == 0, k % 32 == 0: whole 16 x 32 tiles,
    so that ``values_mma`` keeps the interchange shape). Every Llama / Qwen projection does."""
    return n >= 0 and k >= 0 and n % TILE_N == 0 and k % TILE_K == 0


def _check_nk(fn: str, n: int, k: int) -> None:
    if n % TILE_N != 0 or n < 0:
        raise ValueError(
            f"{fn}: values must have a multiple of {TILE_N} rows (output features) for the mma "
            f"layout, got {n}; keep Sparse24Layout.ROW for this weight"
        )
    if k % TILE_K != 0 or k < 0:
        raise ValueError(
            f"{fn}: K = 2 * values.size(1) must be a multiple of {TILE_K} for the mma layout, got "
            f"{k}; keep Sparse24Layout.ROW for this weight"
        )


def mma_value_source(n: int, k: int) -> torch.Tensor:
    """For every element of ``values_mma`` (as tiles [n/16, k/32, 256]), its flat index in the
    interchange ``values`` [n, k/2] (row-major). int64; a permutation."""
    _check_nk("mma_value_source", n, k)
    kt_count = k // TILE_K
    nt = torch.arange(n // TILE_N).view(-1, 1, 1, 1)
    kt = torch.arange(kt_count).view(1, -1, 1, 1)
    lane = torch.arange(32).view(1, 1, -1, 1)
    v = torch.arange(8).view(1, 1, 1, -1)
    g, t = lane // 4, lane % 4
    r = g + 8 * ((v >> 1) & 1)
    c = 2 * t + (v & 1) + 8 * (v >> 2)
    row = TILE_N * nt + r
    col = (TILE_K // 2) * kt + c
    return (row * (k // 2) + col).reshape(n // TILE_N, kt_count, TILE_VALUES)


def mma_meta_source(n: int, k: int) -> torch.Tensor:
    """For every nibble i (0..7, bits 4i..4i+3) of every word of ``meta_mma``
    [n/16, ceil(k/64), 32], the flat index of its group in the interchange [n, k/4] (row-major,
    one group of 4 dense columns each), or -1 for padding. int64 [n/16, ceil(k/64), 32, 8]."""
    _check_nk("mma_meta_source", n, k)
    kp_count = padded_k(k) // PAIR_K
    nt = torch.arange(n // TILE_N).view(-1, 1, 1, 1)
    kp = torch.arange(kp_count).view(1, -1, 1, 1)
    lane = torch.arange(32).view(1, 1, -1, 1)
    i = torch.arange(8).view(1, 1, 1, -1)
    g, t = lane // 4, lane % 4
    r = g + 8 * (i >> 2)
    kt = 2 * kp + (t >> 1)
    j = 4 * (t & 1) + (i & 3)
    row = TILE_N * nt + r
    group = (TILE_K // 4) * kt + j
    src = row * (k // 4) + group
    return torch.where(group < k // 4, src, torch.full_like(src, -1))


def _nibbles(meta: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/8] -> uint8 [N, K/4], one group per element, in K order."""
    return torch.stack((meta & 0xF, meta >> 4), dim=-1).reshape(meta.shape[0], 2 * meta.shape[1])


def check_meta(meta: torch.Tensor, fn: str = "to_mma") -> None:
    """Raise ValueError naming the first row and group whose nibble is not idx0 < idx1 (mma.sp
    with ordered metadata has undefined results for any other nibble)."""
    nib = _nibbles(meta)
    bad = (nib & 3) >= (nib >> 2)
    if bool(bad.any()):
        flat = int(torch.nonzero(bad.flatten())[0, 0])
        row, group = divmod(flat, nib.shape[1])
        raise ValueError(
            f"{fn}: meta row {row}, group {group} (columns {4 * group}..{4 * group + 3}) has "
            f"nibble {int(nib[row, group]):#x}; a 2:4 index nibble is idx0 | idx1 << 2 with "
            "idx0 < idx1"
        )


def to_mma(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interchange (values [N, K/2], meta uint8 [N, K/8]) -> (values_mma [N, K/2] in values'
    dtype, meta_mma int32 [N/16, ceil(K/64), 32]) on values' device. N % 16 == 0, K % 32 == 0."""
    if values.dim() != 2:
        raise ValueError(f"to_mma: values must be 2-D [N, K/2], got shape {tuple(values.shape)}")
    if meta.dtype != torch.uint8:
        raise ValueError(f"to_mma: meta must be uint8, got {meta.dtype}")
    n, half_k = values.shape
    k = 2 * half_k
    if tuple(meta.shape) != (n, k // 8) or k % 8 != 0:
        raise ValueError(
            f"to_mma: meta must have shape [N, K/8] = [{n}, {k // 8}] for values "
            f"{tuple(values.shape)} (K = {k}, a multiple of 8), got {tuple(meta.shape)}"
        )
    _check_nk("to_mma", n, k)
    check_meta(meta)
    dev = values.device
    # An index tensor is empty exactly when N or K is 0, so the gathers never index an empty source.
    vsrc = mma_value_source(n, k).to(dev).view(-1)
    vmma = values.contiguous().view(-1)[vsrc].view(n, half_k)
    msrc = mma_meta_source(n, k).to(dev)
    nib = _nibbles(meta.to(dev)).view(-1).to(torch.int64)
    pad = torch.full((), PAD_NIBBLE, dtype=torch.int64, device=dev)
    nibs = torch.where(msrc >= 0, nib[msrc.clamp(min=0)], pad)
    shifts = 4 * torch.arange(8, device=dev, dtype=torch.int64)
    words = (nibs << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return vmma, words.contiguous()


def from_mma(values_mma: torch.Tensor, meta_mma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`to_mma`: (values [N, K/2], meta uint8 [N, K/8]) from the mma layout
    (N and K read from ``values_mma`` [N, K/2])."""
    if values_mma.dim() != 2:
        raise ValueError(
            f"from_mma: values_mma must be 2-D [N, K/2], got shape {tuple(values_mma.shape)}"
        )
    n, half_k = values_mma.shape
    k = 2 * half_k
    _check_nk("from_mma", n, k)
    want_meta = (n // TILE_N, padded_k(k) // PAIR_K, PAIR_WORDS)
    if meta_mma.dtype != torch.int32 or tuple(meta_mma.shape) != want_meta:
        raise ValueError(
            f"from_mma: meta_mma must be int32 {list(want_meta)}, got {meta_mma.dtype} "
            f"{list(meta_mma.shape)}"
        )
    dev = values_mma.device
    vsrc = mma_value_source(n, k).to(dev).view(-1)
    values = torch.empty(n * half_k, dtype=values_mma.dtype, device=dev)
    values[vsrc] = values_mma.contiguous().view(-1)
    msrc = mma_meta_source(n, k).to(dev).view(-1)
    words = meta_mma.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=dev, dtype=torch.int64)
    nibs = ((words.unsqueeze(-1) >> shifts) & 0xF).view(-1)
    keep = msrc >= 0
    nib = torch.empty(n * (k // 4), dtype=torch.int64, device=dev)
    nib[msrc[keep]] = nibs[keep]
    nib = nib.view(n, k // 4)
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    return values.view(n, half_k), meta.contiguous()
