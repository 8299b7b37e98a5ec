"""The kernel layouts of INT4 weights, produced once at load time: the CPU tile layout
(``layout="cpu"``, "bitpress int4 tiles", read by the C++ CPU kernel) and the GPU mma layout
(``layout="mma"``, "bitpress int4 mma tiles", read by the CUDA and Triton kernels).

Interchange (checkpoints, ``QuantizedWeight``): q [K, N] values 0..15, per-group scales and
zero points [G, N], a group index per row ``g_idx`` [K]. The kernel wants instead:

* **Groups contiguous, in whole octets.** Rows are reordered so that each group's rows are
  consecutive (act-order checkpoints: sort by g_idx once, as ExLlama does, instead of gathering
  scales per row at run time), and each group is padded with zero rows to a multiple of 8.
  ``perm`` [Kp] gives the original row of each packed row (-1: padding); the kernel gathers
  ``x[:, perm]`` (0 for padding) once per call. ``perm`` is None when it is the identity.
  ``group_starts`` [G+1] holds the first octet of each group.
* **Column tiles of 64.** ``qweight`` [Nt, Kp/8, 64] int32, Nt = ceil(N/64): a thread streams one
  tile's strip contiguously. Columns past N are zero.
* **Pair-interleaved nibbles.** Word ``qweight[t, o, c]`` holds the 8 rows 8o..8o+7 of column
  64t+c with row 8o+j in nibble position ``NIBBLE_OF_ROW[j]``, i.e. nibble i holds row
  ``ROW_OF_NIBBLE[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]``. Then ``(word >> 4p) & 0x000F000F`` holds
  rows (2p, 2p+1) in its two 16-bit halves: OR-ing 0x43004300 makes the bf16 pair
  (128 + q[2p], 128 + q[2p+1]) that one AVX512-BF16 ``vdpbf16ps`` lane consumes (bf16 has 8
  significant bits, so 128..143 are exact). The same word serves the fp32 FMA paths, which
  unpack nibble i as row ROW_OF_NIBBLE[i].
* ``scales`` [Nt, G, 64] float32 and ``zeros`` [Nt, G, 64] uint8 (None when every zero point
  is 8, the symmetric case).

The GPU mma layout (full description: ``csrc/include/bitpress/int4/int4_mma_layout.h``):

* **Uniform groups in whole k-tiles.** Rows reordered as above, but every group padded to the
  same ``group_rows`` (the largest group, rounded up to 16, the k of ``mma.m16n8k16``): the group
  of packed row k is ``k // group_rows``, and no 16-row k-tile straddles two groups.
  ``group_starts`` [G+1] counts k-tiles: ``arange(G + 1) * group_rows / 16``.
* **mma fragments.** ``qweight`` [Kp/16, Nt*128] int32: row kt is k-tile kt; its 128 words of
  n-tile nt are lane-major (word ``nt*128 + 4*lane + w``), and lane l's 4 words are its B
  fragments of ``mma.sync.m16n8k16`` for the 8 n8-blocks of the tile, nibble-interleaved so that
  ``(word >> 4p) & 0x000F000F`` is one half2 register once the magic exponent is OR-ed in.
* ``scales`` [G, Np] float32, ``zeros`` [G, Np] uint8 or None; Np = 64 * Nt.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import ClassVar

import torch

from bitpress._core import ext  # noqa: F401  (registers torch.ops.bitpress.int4_gemm_repack)
from bitpress.int4.packing import pack_int4_along_k
from bitpress.int4.quantized import QuantizedWeight

TILE_N = 64
MMA_TILE_K = 16
MMA_TILE_N = 64
ROW_OF_NIBBLE = (0, 2, 4, 6, 1, 3, 5, 7)
NIBBLE_OF_ROW = tuple(ROW_OF_NIBBLE.index(j) for j in range(8))


class Int4Layout(enum.IntEnum):
    """The kernel layouts of INT4 weights; the value is the ``layout`` argument of the
    ``bitpress::int4_gemm`` schema (``bitpress::Int4Layout`` in ``bitpress/int4/int4_gemm.h``)."""

    CPU_TILES = 0  # "bitpress int4 tiles": the C++ CPU kernel
    MMA_TILES = 1  # "bitpress int4 mma tiles": the CUDA and Triton kernels


@dataclasses.dataclass
class Int4PackedWeight:
    """An INT4 weight in one of the kernel layouts; the concrete type names the layout
    (:class:`Int4CpuTiles`, :class:`Int4MmaTiles`). The fields are the weight arguments of the
    ``bitpress::int4_gemm`` schema, passed by name (:meth:`op_kwargs`)."""

    qweight: torch.Tensor  # int32: CPU tiles [Nt, Kp/8, 64]; mma tiles [Kp/16, Nt*128]
    scales: torch.Tensor  # float32: CPU tiles [Nt, G, 64]; mma tiles [G, Np]
    zeros: torch.Tensor | None  # uint8, the shape of scales; None: all 8
    group_starts: torch.Tensor  # int32 [G+1]: in octets (CPU tiles), in k-tiles (mma tiles)
    perm: torch.Tensor | None  # int32 [Kp]; -1 = padding row; None = identity
    in_features: int  # K
    out_features: int  # N
    scale_dtype: torch.dtype  # dtype of the interchange scales (for the exact round trip)

    layout: ClassVar[Int4Layout]
    TENSORS: ClassVar[tuple[str, ...]] = ("qweight", "scales", "zeros", "group_starts", "perm")

    def __post_init__(self) -> None:
        if type(self) is Int4PackedWeight:
            raise TypeError("Int4PackedWeight is abstract: build an Int4CpuTiles or Int4MmaTiles")

    def op_kwargs(self) -> dict:
        """The weight arguments of ``bitpress::int4_gemm``, by schema name, in schema order."""
        kw = {name: getattr(self, name) for name in self.TENSORS}
        kw["out_features"] = self.out_features
        kw["layout"] = int(self.layout)
        return kw

    def op_args(self) -> tuple:
        """``op_kwargs()`` as a positional tuple (its order is the schema's, which a test checks):
        torch.ops parses positional arguments faster than keywords (~10 us a call)."""
        args = self.__dict__.get("_op_args")
        if args is None or args[0] is not self.qweight or args[1] is not self.scales:
            args = tuple(self.op_kwargs().values())
            self.__dict__["_op_args"] = args
        return args

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device, layout: type[Int4PackedWeight] | None = None) -> Int4PackedWeight:
        """On ``device``, in ``layout`` (default: this one). A layout change repacks exactly."""
        if layout is not None and layout is not type(self):
            return pack(unpack(self), layout=layout).to(device)

        def mv(t):
            return None if t is None else t.to(device)

        return dataclasses.replace(self, **{name: mv(getattr(self, name)) for name in self.TENSORS})

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight (packed nibbles, scales, zeros)."""
        n = self.qweight.numel() * 4 + self.scales.numel() * 4
        return n + (self.zeros.numel() if self.zeros is not None else 0)


class Int4CpuTiles(Int4PackedWeight):
    """The CPU tile layout (module docstring), read by the C++ CPU kernel."""

    layout = Int4Layout.CPU_TILES


class Int4MmaTiles(Int4PackedWeight):
    """The GPU mma layout (module docstring, ``bitpress/int4/int4_mma_layout.h``), read by the
    CUDA and Triton kernels."""

    layout = Int4Layout.MMA_TILES


LAYOUTS = {Int4Layout.CPU_TILES: Int4CpuTiles, Int4Layout.MMA_TILES: Int4MmaTiles}


def _check_g_idx(g: torch.Tensor, K: int, G: int) -> None:
    if g.numel() != K:
        raise ValueError(f"g_idx must have K = {K} entries, got {g.numel()}")
    if K and (int(g.min()) < 0 or int(g.max()) >= G):
        raise ValueError(f"g_idx values must lie in [0, {G}), got [{int(g.min())}, {int(g.max())}]")


def default_layout(device: torch.device | str) -> type[Int4PackedWeight]:
    """The layout the default backend of ``device`` reads: mma tiles on CUDA, CPU tiles
    elsewhere."""
    return Int4MmaTiles if torch.device(device).type == "cuda" else Int4CpuTiles


def pack(qw: QuantizedWeight, layout: type[Int4PackedWeight] = Int4CpuTiles) -> Int4PackedWeight:
    """QuantizedWeight -> kernel layout (exactly invertible by :func:`unpack`)."""
    if layout is Int4MmaTiles:
        return _pack_mma(qw)
    if layout is not Int4CpuTiles:
        raise TypeError(f"layout must be Int4CpuTiles or Int4MmaTiles, got {layout!r}")
    q, g = qw.q, qw.g_idx.long()
    K, N = q.shape
    G = qw.scales.shape[0]
    _check_g_idx(g, K, G)
    order = torch.argsort(g, stable=True)
    counts = torch.bincount(g, minlength=G)
    padded = (counts + 7) // 8 * 8
    rows = []
    start = 0
    for c, p in zip(counts.tolist(), padded.tolist(), strict=True):
        rows.append(order[start : start + c])
        rows.append(torch.full((p - c,), -1, dtype=torch.long))
        start += c
    perm = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    Kp = perm.numel()
    Nt = -(-N // TILE_N)
    Np = Nt * TILE_N

    q_perm = torch.zeros(Kp, Np, dtype=torch.int64)
    valid = perm >= 0
    q_perm[valid, :N] = q[perm[valid]].to(torch.int64)
    q_oct = q_perm.reshape(Kp // 8, 8, Np)
    words = torch.zeros(Kp // 8, Np, dtype=torch.int64)
    for j in range(8):
        words |= q_oct[:, j, :] << (4 * NIBBLE_OF_ROW[j])
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    qweight = words.reshape(Kp // 8, Nt, TILE_N).permute(1, 0, 2).contiguous()

    def tiles(t: torch.Tensor, dtype) -> torch.Tensor:
        t = torch.nn.functional.pad(t.to(dtype), (0, Np - N))
        return t.reshape(G, Nt, TILE_N).permute(1, 0, 2).contiguous()

    scales = tiles(qw.scales.float(), torch.float32)
    zeros = None if bool((qw.zeros == 8).all()) else tiles(qw.zeros, torch.uint8)
    group_starts = torch.zeros(G + 1, dtype=torch.int32)
    group_starts[1:] = torch.cumsum(padded // 8, 0).to(torch.int32)
    identity = Kp == K and bool((perm == torch.arange(K)).all())
    return Int4CpuTiles(
        qweight=qweight,
        scales=scales,
        zeros=zeros,
        group_starts=group_starts,
        perm=None if identity else perm.to(torch.int32),
        in_features=K,
        out_features=N,
        scale_dtype=qw.scales.dtype,
    )


def unpack(p: Int4PackedWeight, group_size: int = -1, sym: bool = True) -> QuantizedWeight:
    """Kernel layout -> QuantizedWeight (the inverse of :func:`pack`)."""
    if isinstance(p, Int4MmaTiles):
        return _unpack_mma(p, group_size, sym)
    K, N = p.in_features, p.out_features
    Nt, K8, _ = p.qweight.shape
    Kp, G = K8 * 8, p.scales.shape[1]
    words = p.qweight.cpu().permute(1, 0, 2).reshape(K8, Nt * TILE_N).to(torch.int64) & 0xFFFFFFFF
    q_perm = torch.empty(K8, 8, Nt * TILE_N, dtype=torch.uint8)
    for j in range(8):
        q_perm[:, j, :] = ((words >> (4 * NIBBLE_OF_ROW[j])) & 0xF).to(torch.uint8)
    q_perm = q_perm.reshape(Kp, Nt * TILE_N)[:, :N]
    perm = torch.arange(K) if p.perm is None else p.perm.cpu().long()
    starts = p.group_starts.cpu().long() * 8
    g_of_packed = torch.bucketize(torch.arange(Kp), starts[1:], right=True)
    q = torch.empty(K, N, dtype=torch.uint8)
    g_idx = torch.empty(K, dtype=torch.int32)
    valid = perm >= 0
    q[perm[valid]] = q_perm[valid]
    g_idx[perm[valid]] = g_of_packed[valid].to(torch.int32)

    def untile(t: torch.Tensor) -> torch.Tensor:
        return t.cpu().permute(1, 0, 2).reshape(G, Nt * TILE_N)[:, :N]

    scales = untile(p.scales).to(p.scale_dtype)
    zeros = torch.full((G, N), 8, dtype=torch.uint8) if p.zeros is None else untile(p.zeros).clone()
    return QuantizedWeight(
        q=q, scales=scales, zeros=zeros, g_idx=g_idx, group_size=group_size, sym=sym
    )


# --------------------------------------------------------------------------------------------
# GPU mma layout
# --------------------------------------------------------------------------------------------


@functools.cache
def _mma_tile_coords() -> tuple[torch.Tensor, torch.Tensor]:
    """(kk, nn) [32, 4, 8]: tile position of nibble i of word w of lane l
    (bitpress/int4/int4_mma_layout.h)."""
    lane = torch.arange(32).view(32, 1, 1)
    w = torch.arange(4).view(1, 4, 1)
    v = torch.tensor(ROW_OF_NIBBLE).view(1, 1, 8)  # value held by nibble i
    g, t = lane // 4, lane % 4
    j, i = 2 * w + v // 4, v % 4
    kk = 2 * t + (i & 1) + 8 * (i >> 1)
    nn = 8 * j + g
    return kk.expand(32, 4, 8).contiguous(), nn.expand(32, 4, 8).contiguous()


def mma_row_order(g_idx: torch.Tensor, G: int) -> tuple[torch.Tensor, int]:
    """(perm [G * group_rows] int64 with -1 for padding, group_rows) of the mma layout."""
    g = g_idx.long()
    counts = torch.bincount(g, minlength=G) if g.numel() else torch.zeros(G, dtype=torch.long)
    group_rows = max(MMA_TILE_K, -(-int(counts.max()) // MMA_TILE_K) * MMA_TILE_K) if G else 0
    order = torch.argsort(g, stable=True)
    perm = torch.full((G, group_rows), -1, dtype=torch.long)
    start = 0
    for gi, c in enumerate(counts.tolist()):
        perm[gi, :c] = order[start : start + c]
        start += c
    return perm.reshape(-1), group_rows


def mma_qweight(q: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """q [K, N] values 0..15, perm [Kp] (-1: zero row; None: identity) -> the mma layout's
    qweight [Kp/16, ceil(N/64)*128] int32. The plain-torch definition the repack kernels
    (``ops.int4_gemm_repack``) are tested against, bit for bit."""
    K, N = q.shape
    if perm is None:
        perm = torch.arange(K)
    perm = perm.long().cpu()
    Kp = perm.numel()
    if Kp % MMA_TILE_K:
        raise ValueError(f"the mma layout needs Kp % 16 == 0, got Kp = {Kp}")
    Nt = -(-N // MMA_TILE_N)
    Np = Nt * MMA_TILE_N
    q_perm = torch.zeros(Kp, Np, dtype=torch.int64)
    valid = perm >= 0
    q_perm[valid, :N] = q.cpu()[perm[valid]].to(torch.int64)
    KT = Kp // MMA_TILE_K
    tiles = q_perm.reshape(KT, MMA_TILE_K, Nt, MMA_TILE_N).permute(0, 2, 1, 3)  # [KT, Nt, 16, 64]
    kk, nn = _mma_tile_coords()
    vals = tiles[:, :, kk, nn]  # [KT, Nt, 32, 4, 8]: nibble i of word w of lane l
    words = (vals << (4 * torch.arange(8))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(KT, Nt * 128)


def _pack_mma(qw: QuantizedWeight) -> Int4MmaTiles:
    q, g = qw.q.cpu(), qw.g_idx.cpu().long()
    K, N = q.shape
    G = qw.scales.shape[0]
    _check_g_idx(g, K, G)
    perm, group_rows = mma_row_order(g, G)
    Kp = perm.numel()
    Np = -(-N // MMA_TILE_N) * MMA_TILE_N
    identity = Kp == K and bool((perm == torch.arange(K)).all())
    if K % 8 == 0:
        # The C++ repack (the CPU kernel of bitpress.ops.int4_gemm_repack, tested bit-exact
        # against mma_qweight): ~80x faster than the plain-torch definition, which builds
        # [Kp/16, Nt, 32, 4, 8] indices.
        qweight = torch.ops.bitpress.int4_gemm_repack(
            pack_int4_along_k(q), None if identity else perm.to(torch.int32)
        )
    else:
        qweight = mma_qweight(q, perm)

    def pad_n(t: torch.Tensor, dtype) -> torch.Tensor:
        return torch.nn.functional.pad(t.cpu().to(dtype), (0, Np - N)).contiguous()

    zeros = None if bool((qw.zeros == 8).all()) else pad_n(qw.zeros, torch.uint8)
    tiles_per_group = group_rows // MMA_TILE_K
    group_starts = (torch.arange(G + 1) * tiles_per_group).to(torch.int32)
    return Int4MmaTiles(
        qweight=qweight,
        scales=pad_n(qw.scales.float(), torch.float32),
        zeros=zeros,
        group_starts=group_starts,
        perm=None if identity else perm.to(torch.int32),
        in_features=K,
        out_features=N,
        scale_dtype=qw.scales.dtype,
    )


def _unpack_mma(p: Int4MmaTiles, group_size: int, sym: bool) -> QuantizedWeight:
    K, N = p.in_features, p.out_features
    KT, W = p.qweight.shape
    Nt = W // 128
    G = p.scales.shape[0]
    words = p.qweight.cpu().to(torch.int64).reshape(KT, Nt, 32, 4, 1) & 0xFFFFFFFF
    vals = (words >> (4 * torch.arange(8))) & 0xF  # [KT, Nt, 32, 4, 8]
    kk, nn = _mma_tile_coords()
    tiles = torch.empty(KT, Nt, MMA_TILE_K, MMA_TILE_N, dtype=torch.int64)
    tiles[:, :, kk, nn] = vals
    q_perm = tiles.permute(0, 2, 1, 3).reshape(KT * MMA_TILE_K, Nt * MMA_TILE_N)[:, :N]
    Kp = KT * MMA_TILE_K
    perm = torch.arange(K) if p.perm is None else p.perm.cpu().long()
    group_rows = Kp // G if G else 0
    g_of_packed = torch.arange(Kp) // max(group_rows, 1)
    q = torch.empty(K, N, dtype=torch.uint8)
    g_idx = torch.empty(K, dtype=torch.int32)
    valid = perm >= 0
    q[perm[valid]] = q_perm[valid].to(torch.uint8)
    g_idx[perm[valid]] = g_of_packed[valid].to(torch.int32)
    scales = p.scales.cpu()[:, :N].to(p.scale_dtype)
    zeros = (
        torch.full((G, N), 8, dtype=torch.uint8)
        if p.zeros is None
        else p.zeros.cpu()[:, :N].clone()
    )
    return QuantizedWeight(
        q=q, scales=scales, zeros=zeros, g_idx=g_idx, group_size=group_size, sym=sym
    )


# Words repacked per step: below torch's grain size (32768) elementwise ops run on one thread,
# and a chunk stays in L2: ~10x faster on two busy cores than whole-tensor ops, and the
# temporaries are a few hundred KB whatever the layer's size.
CHUNK_WORDS = 1 << 15


# --------------------------------------------------------------------------------------------
# Packing from GPTQ words: what :func:`pack` computes (bit for bit, tested against it), without
# one int64 (or even one byte) per weight, so that loading a checkpoint costs about the packed
# weight in memory and a few milliseconds per layer.
# --------------------------------------------------------------------------------------------


def _gptq_words(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] values 0..15 -> int32 [K/8, N] packed along K (GPTQ qweight), in int32."""
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor of values 0..15, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"q values must lie in 0..15, got [{int(q.min())}, {int(q.max())}]")
    K, N = q.shape
    qv = q.reshape(K // 8, 8, N)
    words = torch.zeros(K // 8, N, dtype=torch.int32)
    for j in range(8):
        words |= qv[:, j].to(torch.int32) << (4 * j)
    return words


def _to_cpu_nibble_order(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ words (row 8o+j in nibble j) -> CPU-tile words (row 8o+j in nibble NIBBLE_OF_ROW[j]):
    even rows to the low half-word, odd rows to the high one, each in order. Two nibble
    compactions (15 whole-tensor ops instead of 32 for a nibble-by-nibble move)."""

    def compact(v: torch.Tensor) -> torch.Tensor:  # nibbles at 0, 2, 4, 6 -> 0, 1, 2, 3
        v = (v | (v >> 4)) & 0x00FF00FF
        return (v | (v >> 8)) & 0x0000FFFF

    even = compact(qweight & 0x0F0F0F0F)
    odd = compact((qweight >> 4) & 0x0F0F0F0F)
    return even | (odd << 16)


def _gathered_cpu_words(qweight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """CPU-tile words [len(perm)/8, N] of rows ``perm`` (-1: a zero row) of the GPTQ words."""
    N = qweight.shape[1]
    src = perm.clamp(min=0)
    vals = (qweight.index_select(0, src // 8) >> (4 * (src % 8)).to(torch.int32).view(-1, 1)) & 0xF
    vals[perm < 0] = 0
    vals = vals.view(-1, 8, N)
    words = torch.zeros(vals.shape[0], N, dtype=torch.int32)
    for j in range(8):
        words |= vals[:, j] << (4 * NIBBLE_OF_ROW[j])
    return words


def _cpu_tile_qweight(qweight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The CPU-tile qweight [Nt, Kp/8, TILE_N] of GPTQ words [K/8, N], rows reordered by
    ``perm`` (int64 [Kp], -1: zero row; None: as they are), a block of words at a time."""
    K8, N = qweight.shape
    Kp8 = K8 if perm is None else perm.numel() // 8
    Nt = -(-N // TILE_N)
    out = torch.zeros(Nt, Kp8, TILE_N, dtype=torch.int32)
    dst = out.permute(1, 0, 2)  # [Kp/8, Nt, TILE_N]
    budget = CHUNK_WORDS if perm is None else CHUNK_WORDS // 8  # a gather reads 8 rows
    cols = max(TILE_N, budget // TILE_N * TILE_N)
    step = max(1, budget // min(N, cols))
    for o in range(0, Kp8, step):
        for c0 in range(0, N, cols):
            if perm is None:
                words = _to_cpu_nibble_order(qweight[o : o + step, c0 : c0 + cols])
            else:
                words = _gathered_cpu_words(
                    qweight[:, c0 : c0 + cols], perm[8 * o : 8 * (o + step)]
                )
            rc, w = words.shape
            t0, ft = c0 // TILE_N, w // TILE_N
            if ft:
                dst[o : o + rc, t0 : t0 + ft].copy_(words[:, : ft * TILE_N].view(rc, ft, TILE_N))
            if w > ft * TILE_N:
                dst[o : o + rc, t0 + ft, : w - ft * TILE_N].copy_(words[:, ft * TILE_N :])
    return out


def _cpu_tiles(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, N] (scales, zeros) -> [Nt, R, TILE_N] column tiles in ``dtype``, columns past N zero."""
    R, N = t.shape
    Nt = -(-N // TILE_N)
    t = torch.nn.functional.pad(t.to(dtype), (0, Nt * TILE_N - N))
    return t.reshape(R, Nt, TILE_N).permute(1, 0, 2).contiguous()


def pack_gptq_words(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    layout: type[Int4PackedWeight],
) -> Int4PackedWeight:
    """``pack(QuantizedWeight(unpack_int4_along_k(qweight), scales, zeros, g_idx))``, from
    the GPTQ words (int32 [K/8, N]) directly; every tensor on the CPU. ``scales`` are already
    in the module's dtype (the interchange dtype the layout records)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    G = scales.shape[0]
    g = g_idx.long()
    if g.numel() != K:
        raise ValueError(f"g_idx must have K = {K} entries, got {g.numel()}")
    if K and (int(g.min()) < 0 or int(g.max()) >= G):
        raise ValueError(f"g_idx values must lie in [0, {G}), got [{int(g.min())}, {int(g.max())}]")
    counts = torch.bincount(g, minlength=G) if K else torch.zeros(G, dtype=torch.long)
    sym = zeros.numel() == 0 or bool((zeros == 8).all())
    if layout is Int4MmaTiles:
        perm, group_rows = mma_row_order(g, G)
        Kp = perm.numel()
        Np = -(-N // MMA_TILE_N) * MMA_TILE_N
        identity = Kp == K and bool((perm == torch.arange(K)).all())
        # The C++ repack (the CPU kernel of int4_gemm_repack) reads GPTQ words as they are.
        packed = torch.ops.bitpress.int4_gemm_repack(
            qweight.contiguous(), None if identity else perm.to(torch.int32)
        )

        def pad_n(t: torch.Tensor, dtype) -> torch.Tensor:
            return torch.nn.functional.pad(t.to(dtype), (0, Np - N)).contiguous()

        return Int4MmaTiles(
            qweight=packed,
            scales=pad_n(scales, torch.float32),
            zeros=None if sym else pad_n(zeros, torch.uint8),
            group_starts=(torch.arange(G + 1) * (group_rows // MMA_TILE_K)).to(torch.int32),
            perm=None if identity else perm.to(torch.int32),
            in_features=K,
            out_features=N,
            scale_dtype=scales.dtype,
        )
    if layout is not Int4CpuTiles:
        raise TypeError(f"layout must be Int4CpuTiles or Int4MmaTiles, got {layout!r}")
    padded = (counts + 7) // 8 * 8
    monotonic = K < 2 or bool((g[1:] >= g[:-1]).all())
    if monotonic and bool((padded == counts).all()):
        # Groups in order and in whole octets (any g_idx = k // group_size): no row moves.
        perm = None
    else:
        order = torch.argsort(g, stable=True)
        rows, start = [], 0
        for c, p in zip(counts.tolist(), padded.tolist(), strict=True):
            rows += [order[start : start + c], torch.full((p - c,), -1, dtype=torch.long)]
            start += c
        perm = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    group_starts = torch.zeros(G + 1, dtype=torch.int32)
    group_starts[1:] = torch.cumsum(padded // 8, 0).to(torch.int32)
    return Int4CpuTiles(
        qweight=_cpu_tile_qweight(qweight, perm),
        scales=_cpu_tiles(scales.float(), torch.float32),
        zeros=None if sym else _cpu_tiles(zeros, torch.uint8),
        group_starts=group_starts,
        perm=None if perm is None else perm.to(torch.int32),
        in_features=K,
        out_features=N,
        scale_dtype=scales.dtype,
    )


def pack_fast(qw: QuantizedWeight, layout: type[Int4PackedWeight]) -> Int4PackedWeight:
    """:func:`pack` through the GPTQ words (:func:`pack_gptq_words`): the same result, without
    its per-weight temporaries; what modules and loaders use."""
    return pack_gptq_words(_gptq_words(qw.q), qw.scales, qw.zeros, qw.g_idx, layout)


def from_cpu_nibble_order(words: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_to_cpu_nibble_order`."""

    def expand(v: torch.Tensor) -> torch.Tensor:  # nibbles at 0, 1, 2, 3 -> 0, 2, 4, 6
        v = (v | (v << 8)) & 0x00FF00FF
        return (v | (v << 4)) & 0x0F0F0F0F

    return expand(words & 0xFFFF) | (expand((words >> 16) & 0xFFFF) << 4)
