"""compressed-tensors / vLLM "marlin-24": 2:4 + INT4 (Sparse-Marlin) checkpoints, read into and
written from :class:`~bitpress.sparse24.modules.Sparse24Int4Linear`.

Definition (compressed-tensors ``Marlin24Compressor``, read by vLLM's
``CompressedTensorsW4A16Sparse24`` and its ``gptq_marlin_24_gemm``); for a Linear with weight
``W`` [N, K], 4-bit symmetric groups (``strategy`` "group" with ``group_size`` 128, or
"channel"), signed codes ``c`` in −8..7 with ``W = c · s``:

1. ``sparse, meta = sparse_semi_structured_from_dense_cutlass(c)`` (c [N, K] as float16): the
   two kept codes of each group of 4 in K order, [N, K/2], and int16 metadata [N, K/16], four
   groups per int16 (group ``4j + i`` in nibble ``i``), nibble ``= idx0 | idx1 << 2`` with
   ``idx0 < idx1``, then scattered into CUTLASS's interleaved column-major order
   (:func:`meta_reorder_offsets`). Which positions a group keeps is read from ``c != 0``: a kept
   code that is 0 counts as pruned, and groups with fewer than 2 nonzeros take CUTLASS's
   positions (e.g. ``[0, 0, 0, 0]`` keeps positions 2 and 3), which changes nothing in W.
2. ``weight_packed`` int32 [K/32, 2N]: ``sparse.t() + 8`` ([K/2, N], 0..15) cut into 16 x 16
   tiles laid out tile row by tile row ([K/32, 16N]), each row of 1024 permuted by Marlin's
   ``perm`` (:func:`marlin24_permutations`), then 8 codes per int32, code ``i`` of a word from
   columns ``i::8`` at bits ``4i``.
3. ``meta`` int16 [K/32, 2N]: the reordered [N, K/16] metadata buffer reinterpreted (``resize_``)
   with that shape.
4. ``scale_packed`` float16 [G, N]: ``s.t()`` with every run of 64 permuted by ``scale_perm``
   when ``group_size < K/2`` (sic: see :func:`_scale_perm`), else left alone (channel, or a
   group as wide as K/2: ``scale_perm_single`` is the identity).

In bitpress terms the codes are the INT4 codes ``q = c + 8`` of
:mod:`bitpress.sparse24.layout` (``w = (q − 8) · s``) and the de-reordered metadata, read as
bytes in little-endian order, is the interchange ``meta`` uint8 [N, K/8]. Shapes the format can
hold: :func:`check_shape`.
"""

from __future__ import annotations

import torch
from torch import nn

from bitpress._core.registry import (
    CompressedTensorsHostile,
    CompressedTensorsScheme,
    register_compressed_tensors_scheme,
)
from bitpress.sparse24 import layout as _layout
from bitpress.sparse24.modules import Sparse24Int4Linear

FORMAT = "marlin-24"


def marlin24_permutations() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm [1024], scale_perm [64], scale_perm_single [64]) for 4-bit codes: Marlin-24 lays a
    16 x 64 tile's codes out in the order its threads' mma.sp fragments consume them (the PTX
    ISA's m16n8k16 fragment layout), so that each thread's vector load is already a fragment."""
    perm_list: list[int] = []
    for i in range(32):
        perm1 = []
        col = i // 4
        col_o = col // 2
        for block in (0, 1):
            for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1):
                perm1.append(16 * row + col_o * 256 + 8 * (col % 2) + 4 * block)
        for j in range(4):
            perm_list.extend(p + j for p in perm1)
    perm = torch.tensor(perm_list)
    interleave = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    perm = perm.reshape(-1, 8)[:, interleave].reshape(-1)
    scale_perm = torch.tensor([i * 8 + j for i in range(8) for j in (0, 4, 1, 5, 2, 6, 3, 7)])
    scale_perm_single = torch.arange(64)
    return perm, scale_perm, scale_perm_single


def meta_reorder_offsets(m: int, meta_ncols: int) -> torch.Tensor:
    """int64 [m · meta_ncols]: where element ``(r, c)`` of the row-major int16 metadata [m,
    meta_ncols] goes in CUTLASS's reordered buffer (its ``reorder_meta``: rows regrouped in
    blocks of 32, 2 x 2 blocks swizzled, ``ColumnMajorInterleaved<2>``)."""
    dst_rows = torch.arange(m)[:, None].repeat(1, meta_ncols)
    dst_cols = torch.arange(meta_ncols).repeat(m, 1)
    group_x, group_y = 64, 32  # int16 metadata
    dst_rows = (
        dst_rows // group_x * group_x
        + (dst_rows % 2) * 2
        + (dst_rows % 8) // 4
        + ((dst_rows % group_y) % 4) // 2 * 32
        + ((dst_rows % group_x) // 8) * 4
    )
    topright = ((dst_rows % 2 == 0) & (dst_cols % 2 == 1)).to(torch.int64)
    bottomleft = ((dst_rows % 2 == 1) & (dst_cols % 2 == 0)).to(torch.int64)
    dst_rows = dst_rows + topright - bottomleft
    dst_cols = dst_cols - topright + bottomleft
    interleave = 2
    return ((dst_cols // interleave) * m * interleave + dst_rows * interleave + dst_cols % 2).view(
        -1
    )


def check_shape(N: int, K: int, G: int, what: str) -> None:
    """ValueError naming ``what`` unless the format can hold a [N, K] weight with G groups: the
    CUTLASS metadata reorder works on blocks of 64 rows (N % 64 == 0; compressed-tensors checks
    only N % 32, and its reorder then indexes past the buffer), the [K/32, 2N] reshape needs
    K % 32 == 0, Marlin's 1024-wide permutation K · N % 2048 == 0, the 64-wide scale
    permutation G · N % 64 == 0. (vLLM's kernel asks more: N % 128 == 0, K % 128 == 0,
    group_size 128 or channel.)"""
    if N <= 0 or K <= 0 or N % 64 or K % 32 or (K * N) % 2048 or (G * N) % 64:
        raise ValueError(
            f"{what}: marlin-24 cannot hold a [N, K] = [{N}, {K}] weight with {G} scale group(s) "
            "(needs N % 64 == 0, K % 32 == 0, K·N % 2048 == 0, G·N % 64 == 0)"
        )


def _scale_perm(K: int, group_size: int) -> torch.Tensor:
    # compressed-tensors compares group_size with the row count of the transposed *compressed*
    # codes, K/2 (``pack_scales_24(scale, args, value.shape)`` after ``value = value.t()``),
    # where vLLM's own test packer compares with K: the two disagree for K/2 <= group_size < K
    # (e.g. K = 256, group_size 128). bitpress reads and writes what the producer writes.
    _, scale_perm, single = marlin24_permutations()
    return scale_perm if group_size != -1 and group_size < K // 2 else single


def unpack_marlin24(
    weight_packed: torch.Tensor,
    meta: torch.Tensor,
    scale_packed: torch.Tensor,
    *,
    group_size: int,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """marlin-24 tensors -> Sparse24Int4Linear interchange (qvalues int32 [N, K/16], meta uint8
    [N, K/8], scales [G, N] float16), exactly (module docstring). ``group_size``: 128 or -1
    (channel). Errors are ValueError naming the tensor (``name.weight_packed`` ...)."""
    p = f"{name}." if name else ""
    for t, n, dt, rank in (
        (weight_packed, "weight_packed", torch.int32, 2),
        (meta, "meta", torch.int16, 2),
        (scale_packed, "scale_packed", None, 2),
    ):
        if t.dim() != rank:
            raise ValueError(f"{p}{n}: expected a 2-D tensor, got shape {list(t.shape)}")
        if dt is not None and t.dtype != dt:
            raise ValueError(f"{p}{n}: dtype must be {dt}, got {t.dtype}")
    if not scale_packed.dtype.is_floating_point:
        raise ValueError(f"{p}scale_packed: dtype must be floating point, got {scale_packed.dtype}")
    if weight_packed.shape[1] % 2:
        raise ValueError(
            f"{p}weight_packed: expected shape [K/32, 2N], got {list(weight_packed.shape)}"
        )
    K, N = weight_packed.shape[0] * 32, weight_packed.shape[1] // 2
    if list(meta.shape) != [K // 32, 2 * N]:
        raise ValueError(
            f"{p}meta: expected shape [K/32, 2N] = [{K // 32}, {2 * N}], got {list(meta.shape)}"
        )
    G = 1 if group_size == -1 else -(-K // group_size)
    check_shape(N, K, G, f"{p}weight_packed")
    if list(scale_packed.shape) != [G, N]:
        raise ValueError(
            f"{p}scale_packed: expected shape [G, N] = [{G}, {N}] (group_size {group_size}), got "
            f"{list(scale_packed.shape)}"
        )
    perm, _, _ = marlin24_permutations()
    # 1. codes: unpack the words, undo the 1024-permutation and the 16 x 16 tiling.
    w = weight_packed.cpu().to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4)
    # Code i of word j is column 8j + i (the writer ORs columns i::8 in at bits 4i).
    q = ((w.unsqueeze(-1) >> shifts) & 0xF).reshape(K // 32, 16 * N)
    tiles = q.reshape(-1, perm.numel())
    untiled = torch.empty_like(tiles)
    untiled[:, perm] = tiles
    codes = untiled.reshape(K // 32, N // 16, 16, 16).permute(0, 2, 1, 3).reshape(K // 2, N)
    codes = codes.t().contiguous()  # [N, K/2], 0..15 = signed code + 8
    # 2. metadata: the [N, K/16] buffer, CUTLASS order undone, int16 -> bytes little-endian.
    reordered = meta.cpu().reshape(-1).to(torch.int64) & 0xFFFF
    plain = reordered[meta_reorder_offsets(N, K // 16)].view(N, K // 16)
    meta8 = torch.stack([plain & 0xFF, plain >> 8], dim=-1).reshape(N, K // 8).to(torch.uint8)
    bad = _layout.invalid_nibble(meta8)
    if bad is not None:
        r, g, nib = bad
        raise ValueError(
            f"{p}meta: invalid 2:4 metadata nibble 0x{nib:X} at row {r}, group {g} (valid: idx0 "
            "| idx1 << 2 with idx0 < idx1)"
        )
    # 3. scales.
    sp = _scale_perm(K, group_size)
    s = scale_packed.cpu().reshape(-1, sp.numel())
    scales = torch.empty_like(s)
    scales[:, sp] = s
    return _layout.pack_qvalues(codes), meta8, scales.reshape(G, N)


def _cutlass_positions(nz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CUTLASS's choice of the two kept positions (idx0, idx1) of each group of 4 from its
    nonzero flags ``nz`` [..., 4] (its Espresso-minimised encoding, which also defines the
    groups with fewer than 2 nonzeros)."""
    m0, m1, m2, m3 = nz.unbind(-1)
    expr0 = m0 & m1
    expr1 = ~m0 & m1
    expr2 = ~m0 & ~m1
    idx0 = expr1.to(torch.int64) | (expr2.to(torch.int64) << 1)
    idx1 = (expr0 | expr2 | m3).to(torch.int64) | ((expr1 | ~m1).to(torch.int64) << 1)
    return idx0, idx1


def pack_marlin24(
    qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, *, group_size: int
) -> dict[str, torch.Tensor]:
    """Sparse24Int4Linear interchange (symmetric) -> marlin-24 tensors ``{"weight_packed",
    "meta", "scale_packed"}``, as compressed-tensors' compressor writes them from the same
    weight (positions re-derived from the nonzero codes, module docstring)."""
    N, K = qvalues.shape[0], qvalues.shape[1] * 16
    check_shape(N, K, scales.shape[0], "weight")
    codes = _layout.unpack_qvalues(qvalues.cpu())  # [N, K/2], 0..15
    cols = _layout.dense_columns(meta.cpu())
    signed = torch.zeros(N, K, dtype=torch.int64).scatter_(1, cols, codes - 8)
    groups4 = signed.view(N, K // 4, 4)
    idx0, idx1 = _cutlass_positions(groups4 != 0)
    kept = torch.stack(
        [groups4.gather(-1, idx0.unsqueeze(-1)), groups4.gather(-1, idx1.unsqueeze(-1))], dim=-1
    ).reshape(N, K // 2)
    nib = idx0 | (idx1 << 2)  # [N, K/4]
    plain = nib.view(N, K // 16, 4)
    plain = plain[..., 0] | (plain[..., 1] << 4) | (plain[..., 2] << 8) | (plain[..., 3] << 12)
    reordered = torch.empty(N * K // 16, dtype=torch.int64)
    reordered[meta_reorder_offsets(N, K // 16)] = plain.reshape(-1)
    meta16 = torch.where(reordered >= 2**15, reordered - 2**16, reordered).to(torch.int16)
    # codes: [K/2, N] unsigned, 16 x 16 tiles, 1024-permutation, 8 per int32.
    perm, _, _ = marlin24_permutations()
    q = (kept + 8).t().contiguous()
    q = q.reshape(K // 32, 16, N // 16, 16).permute(0, 2, 1, 3).reshape(K // 32, 16 * N)
    q = q.reshape(-1, perm.numel())[:, perm].reshape(K // 32, 16 * N)
    words = torch.zeros(K // 32, 2 * N, dtype=torch.int64)
    for i in range(8):
        words |= q[:, i::8] << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    sp = _scale_perm(K, group_size)
    G = scales.shape[0]
    s = scales.detach().cpu().to(torch.float16).reshape(-1, sp.numel())[:, sp].reshape(G, N)
    return {
        "weight_packed": words,
        "meta": meta16.view(K // 32, 2 * N),
        "scale_packed": s.contiguous(),
    }


# --------------------------------------------------------------------------------------------
# The compressed-tensors scheme
# --------------------------------------------------------------------------------------------

SUFFIXES = ("weight_packed", "meta", "scale_packed", "bias")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _group_size(name: str, cfg: dict) -> int:
    w, where = cfg.get("weights"), f"quantization_config.config_groups.{cfg.get('group')}"
    if w is None:
        raise ValueError(f"{where}.weights: layer {name!r} is marlin-24 without weight args")
    if w["num_bits"] != 4 or w["type"] != "int":
        raise ValueError(
            f"{where}.weights: marlin-24 layers are read as 2:4 + INT4 (num_bits 4, type 'int'), "
            f"got num_bits {w['num_bits']}, type {w['type']!r}"
        )
    if not w["symmetric"]:
        raise ValueError(f"{where}.weights.symmetric: marlin-24 is symmetric, got false")
    if w["strategy"] not in ("group", "channel"):
        raise ValueError(
            f"{where}.weights.strategy must be 'group' or 'channel' for marlin-24, got "
            f"{w['strategy']!r}"
        )
    if w.get("actorder") is not None:
        raise ValueError(f"{where}.weights.actorder: marlin-24 has no activation order")
    if cfg.get("input_activations") is not None or cfg.get("output_activations") is not None:
        raise ValueError(f"{where}.input_activations: marlin-24 is weight-only (W4A16)")
    sc = cfg.get("sparsity_config")
    if sc is not None and sc.get("format") not in ("dense", FORMAT):
        raise ValueError(
            f"quantization_config.sparsity_config.format: {sc.get('format')!r} on a marlin-24 "
            "layer (its sparsity is part of the format)"
        )
    gs = w["group_size"] if w["strategy"] == "group" else -1
    if gs != -1 and gs % 8:
        raise ValueError(f"{where}.weights.group_size must be a multiple of 8, got {gs}")
    return gs


def _load(name: str, linear: nn.Linear, tensors, cfg: dict, dtype, device) -> Sparse24Int4Linear:
    gs = _group_size(name, cfg)
    N, K = linear.out_features, linear.in_features
    got = {}
    for suffix in ("weight_packed", "meta", "scale_packed"):
        key = f"{name}.{suffix}"
        if key not in tensors:
            raise ValueError(f"checkpoint: missing tensor {key!r} (marlin-24 layer)")
        got[suffix] = tensors[key]
    wp = got["weight_packed"]
    if wp.dim() == 2 and list(wp.shape) != [K // 32, 2 * N]:
        raise ValueError(
            f"{name}.weight_packed: expected shape [K/32, 2N] = [{K // 32}, {2 * N}] for the "
            f"model's [{N}, {K}] layer, got {list(wp.shape)}"
        )
    if got["scale_packed"].dtype not in _FLOATS:
        raise ValueError(
            f"{name}.scale_packed: dtype must be float16 (or bfloat16 / float32), got "
            f"{got['scale_packed'].dtype}"
        )
    qvalues, meta, scales = unpack_marlin24(
        got["weight_packed"], got["meta"], got["scale_packed"], group_size=gs, name=name
    )
    if qvalues.shape[0] != N or qvalues.shape[1] * 16 != K:
        raise ValueError(
            f"{name}.weight_packed: holds a [{qvalues.shape[0]}, {qvalues.shape[1] * 16}] "
            f"weight, the model's layer is [{N}, {K}]"
        )
    # The module's dtype, unless that would round the stored scales (float16 -> bfloat16):
    # then float32, which holds them exactly.
    sdtype = dtype if torch.equal(scales.to(dtype).to(scales.dtype), scales) else torch.float32
    bias = tensors[f"{name}.bias"] if f"{name}.bias" in tensors else None
    if bias is not None and (not bias.dtype.is_floating_point or list(bias.shape) != [N]):
        raise ValueError(
            f"{name}.bias: expected a float [{N}] tensor, got {bias.dtype} {list(bias.shape)}"
        )
    return Sparse24Int4Linear.from_interchange(
        qvalues, meta, scales, None, bias, group_size=gs, dtype=sdtype, device=device
    )


def _weight_args(m: Sparse24Int4Linear) -> dict:
    channel = m.group_size == -1
    return {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "channel" if channel else "group",
        "group_size": None if channel else m.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _can_save(m: nn.Module) -> bool:
    if not isinstance(m, Sparse24Int4Linear) or not m.sym:
        return False
    G = m.packed_scales.shape[0]
    try:
        check_shape(m.out_features, m.in_features, G, "weight")
    except ValueError:
        return False
    return True


def _save(name: str, m: Sparse24Int4Linear) -> tuple[dict[str, torch.Tensor], dict]:
    t = m.interchange()
    out = pack_marlin24(t["qvalues"], t["meta"], t["scales"], group_size=m.group_size)
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    cfg = {
        "format": FORMAT,
        "weights": _weight_args(m),
        "input_activations": None,
        "output_activations": None,
    }
    return out, cfg


def _hostile() -> CompressedTensorsHostile:
    def quantize(name: str, linear: nn.Linear):
        N, K = linear.out_features, linear.in_features
        gs = 32
        try:
            check_shape(N, K, K // gs, name)
        except ValueError:
            return None
        return Sparse24Int4Linear.from_linear(linear, group_size=gs, sym=True)

    return CompressedTensorsHostile(
        quantize=quantize,
        tensors={
            "weight_packed": ((torch.int32,), 2),
            "meta": ((torch.int16,), 2),
            "scale_packed": (_FLOATS, 2),
        },
        required=("weight_packed", "meta", "scale_packed"),
    )


MARLIN_24 = register_compressed_tensors_scheme(
    CompressedTensorsScheme(
        format=FORMAT,
        module_types=(Sparse24Int4Linear,),
        load=_load,
        save=_save,
        suffixes=SUFFIXES,
        can_save=_can_save,
        hostile=_hostile,
    )
)
