"""``Int4Linear``: a drop-in ``nn.Linear`` with INT4 weights (GPTQ-style groups).

The module holds **one** copy of its weight: the kernel layout of the device it is on
(:class:`~bitpress.int4.layout.Int4CpuTiles` on the CPU, :class:`~bitpress.int4.layout.Int4MmaTiles`
on CUDA), as non-persistent buffers ``packed_qweight``, ``packed_scales``, ``packed_zeros``,
``packed_group_starts`` and ``packed_perm``. In-place edits of those tensors are edits of the
weight the next forward uses.

The state_dict is the GPTQ checkpoint layout (converted on save and on load), so a state_dict is
a checkpoint:

* ``qweight`` int32 [K/8, N] packed along K,
* ``qzeros`` int32 [G, ceil(N/8)] packed along N holding the **real** zero points
  (GPTQ "v2"; ``from_gptq`` converts v1 checkpoints, ``to_gptq`` writes either),
* ``scales`` [G, N] in the module's ``dtype``, ``g_idx`` int32 [K], optional ``bias`` [N].

``.to(device)`` moves the weight, repacking it when the device reads another layout;
``.half()`` / ``.to(dtype)`` change the dtype of the bias and of the saved scales (the kernel
layouts keep float32 scales).
"""

from __future__ import annotations

import torch
from torch import nn

from bitpress.int4 import ops
from bitpress.int4.format_gptq import CHECKPOINT_FORMATS, quantized_to_gptq, read_gptq
from bitpress.int4.layout import (
    MMA_TILE_K,
    MMA_TILE_N,
    NIBBLE_OF_ROW,
    TILE_N,
    Int4CpuTiles,
    Int4MmaTiles,
    Int4PackedWeight,
    default_layout,
    mma_row_order,
    unpack,
)
from bitpress.int4.packing import pack_int4_along_n
from bitpress.int4.quantized import QuantizedWeight, check_group_size
from bitpress.int4.rtn import rtn_quantize

_PACKED = ("qweight", "scales", "zeros", "group_starts", "perm")
_STATE = ("qweight", "qzeros", "scales", "g_idx")
# Words repacked per step: below torch's grain size (32768) elementwise ops run on one thread,
# and a chunk stays in L2: ~10x faster on two busy cores than whole-tensor ops, and the
# temporaries are a few hundred KB whatever the layer's size.
_CHUNK_WORDS = 1 << 15


# --------------------------------------------------------------------------------------------
# Packing from GPTQ words: what layout.pack computes (bit for bit, tested against it), without
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
    budget = _CHUNK_WORDS if perm is None else _CHUNK_WORDS // 8  # a gather reads 8 rows
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


def _pack_gptq_words(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    layout: type[Int4PackedWeight],
) -> Int4PackedWeight:
    """``layout.pack(QuantizedWeight(unpack_int4_along_k(qweight), scales, zeros, g_idx))``, from
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
        packed = ops.int4_gemm_repack(
            qweight.contiguous(), None if identity else perm.to(torch.int32), backend="cpu"
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


class Int4Linear(nn.Module):
    """y = x · Wᵀ + b with W stored as INT4 (see the module docstring).

    Build one with :meth:`from_linear` (round-to-nearest), :meth:`from_gptq` (checkpoint
    tensors) or :meth:`from_quantized` (any bitpress quantizer); ``bitpress.quantize_`` swaps every
    Linear of a model. ``Int4Linear(K, N)`` itself holds a zero weight.

    ``act_dtype`` (attribute and keyword): None (default, exact activations) or ``torch.int8``
    (W4A8: x quantized per row to int8 in ``int4_gemm``, see ``bitpress.ops.int4_gemm``). A
    setting of the module, not of its weight: the state_dict is the same either way.
    """

    act_dtype: torch.dtype | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: int = 128,
        sym: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        act_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.act_dtype = _check_module_act_dtype(act_dtype)
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"Int4Linear: out_features must be a positive int, got {out_features}")
        if not isinstance(in_features, int) or in_features < 8 or in_features % 8:
            raise ValueError(
                f"Int4Linear: in_features must be a positive multiple of 8, got {in_features}"
            )
        try:
            gs = check_group_size(in_features, group_size)
        except ValueError as e:
            raise ValueError(f"Int4Linear: {e}") from None
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"Int4Linear: dtype must be float16, bfloat16 or float32, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.sym = group_size, sym
        self.dtype = dtype
        G = -(-in_features // gs)
        zero = QuantizedWeight(
            q=torch.zeros(in_features, out_features, dtype=torch.uint8),
            scales=torch.zeros(G, out_features, dtype=dtype),
            zeros=torch.full((G, out_features), 8, dtype=torch.uint8),
            g_idx=(torch.arange(in_features) // gs).to(torch.int32),
            group_size=group_size,
            sym=sym,
        )
        self._set_weight(_pack_quantized(zero, default_layout(device or "cpu")).to(device or "cpu"))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    # ----------------------------------------------------------------------------------------
    # The weight
    # ----------------------------------------------------------------------------------------

    def _set_weight(self, w: Int4PackedWeight) -> None:
        self._layout = type(w)
        for name in _PACKED:
            self.register_buffer(f"packed_{name}", getattr(w, name), persistent=False)

    @property
    def weight_packed(self) -> Int4PackedWeight:
        """The weight in its kernel layout (the module's buffers themselves, not a copy)."""
        buffers = self._buffers
        w = self.__dict__.get("_weight_view")
        # The view is rebuilt when a buffer was replaced (.to, load_state_dict, assignment) or the
        # dtype changed; in-place edits need nothing (the view holds the same tensors).
        if (
            w is None
            or w.scale_dtype is not self.dtype
            or any(getattr(w, n) is not buffers[f"packed_{n}"] for n in _PACKED)
        ):
            w = self._layout(
                **{n: buffers[f"packed_{n}"] for n in _PACKED},
                in_features=self.in_features,
                out_features=self.out_features,
                scale_dtype=self.dtype,
            )
            self.__dict__["_weight_view"] = w
        return w

    def packed(self, device: torch.device | str | None = None) -> Int4PackedWeight:
        """The weight in the layout ``device`` reads (default: the module's own, not a copy;
        another device: a converted copy, which the module does not keep)."""
        w = self.weight_packed
        if device is None or torch.device(device) == w.device:
            return w
        return w.to(device, layout=default_layout(device))

    @property
    def device(self) -> torch.device:
        return self.packed_qweight.device

    def _apply(self, fn, recurse=True):
        # The packed tensors are not ordinary buffers: a device change may need another layout,
        # and a dtype change (.half()) must not touch their float32 scales or int32 words.
        packed = {n: self._buffers.pop(f"packed_{n}") for n in _PACKED}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update({f"packed_{n}": t for n, t in packed.items()})
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        if probe.device != self.device:
            self._set_weight(self.packed(probe.device))
        return self

    # ----------------------------------------------------------------------------------------
    # state_dict: GPTQ tensors
    # ----------------------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        gptq = _to_gptq(self.weight_packed, self.group_size, self.sym, "gptq_v2")
        for name in _STATE:
            destination[prefix + name] = gptq[name].to(self.device)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        keys = [prefix + name for name in _STATE]
        unexpected_keys[:] = [k for k in unexpected_keys if k not in keys]
        present = [k for k in keys if k in state_dict]
        if not present:
            missing_keys.extend(keys)
            return
        if len(present) < len(keys):
            missing_keys.extend(k for k in keys if k not in state_dict)
            return
        qweight, qzeros, scales, g_idx = (state_dict[k].cpu() for k in keys)
        try:
            zeros, g = read_gptq(
                qweight,
                qzeros,
                scales,
                g_idx,
                group_size=self.group_size,
                sym=self.sym,
                checkpoint_format="gptq_v2",
            )
        except (TypeError, ValueError) as e:
            errors.append(f"While loading {prefix or 'Int4Linear'} (GPTQ tensors): {e}")
            return
        K, N = qweight.shape[0] * 8, qweight.shape[1]
        if K != self.in_features or N != self.out_features:
            errors.append(
                f"size mismatch for {prefix}qweight: the GPTQ tensors hold a "
                f"[{N}, {K}] weight, this Int4Linear is "
                f"[{self.out_features}, {self.in_features}]"
            )
            return
        self.dtype = scales.dtype if scales.dtype != torch.float32 else self.dtype
        w = _pack_gptq_words(qweight, scales, zeros, g, self._layout)
        self._set_weight(w.to(self.device))

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> Int4Linear:
        """From any bitpress quantizer's result (``qw.q`` is [K, N]), on ``qw.q``'s device."""
        K, N = qw.q.shape
        dtype = dtype or qw.scales.dtype
        device = qw.q.device
        try:
            check_group_size(K, qw.group_size)
        except ValueError as e:
            raise ValueError(f"Int4Linear: {e}") from None
        cpu = QuantizedWeight(
            qw.q.cpu(), qw.scales.cpu().to(dtype), qw.zeros.cpu(), qw.g_idx.cpu(), qw.group_size,
            qw.sym,
        )  # fmt: skip
        w = _pack_quantized(cpu, default_layout(device))
        return cls._from_packed(w.to(device), qw.group_size, qw.sym, dtype, bias)

    @classmethod
    def _from_packed(
        cls,
        w: Int4PackedWeight,
        group_size: int,
        sym: bool,
        dtype: torch.dtype,
        bias: torch.Tensor | None,
    ) -> Int4Linear:
        """The module holding ``w`` (not a copy), without packing a zero weight first."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = w.in_features, w.out_features
        m.group_size, m.sym, m.dtype = group_size, sym, dtype
        m._set_weight(w)
        if bias is not None:
            # A copy: ``bias`` may be a view of a memory-mapped checkpoint file.
            m.register_buffer("bias", bias.detach().to(device=w.device, dtype=dtype, copy=True))
        else:
            m.bias = None
        return m

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        sym: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Int4Linear:
        """Round-to-nearest quantization of ``linear.weight`` (``bitpress.int4.rtn``)."""
        dtype = dtype or (
            linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.float16
        )
        qw = rtn_quantize(linear.weight.detach(), group_size=group_size, sym=sym, scale_dtype=dtype)
        return cls.from_quantized(qw, linear.bias, dtype=dtype)

    @classmethod
    def from_gptq(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor | None,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        group_size: int,
        sym: bool = True,
        checkpoint_format: str = "gptq",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Int4Linear:
        """From the tensors of a GPTQ checkpoint (``checkpoint_format`` "gptq" = v1 zeros stored
        minus one, "gptq_v2" = real zeros); see ``bitpress.int4.format_gptq``.

        The words are repacked into the kernel layout of ``device`` (default: that of
        ``qweight``) directly, a chunk at a time: the module's weight plus a few MB is all this
        allocates, and the inputs may be views of a memory-mapped file. ``dtype``: the module's
        dtype (default: that of ``scales``)."""
        zeros, g = read_gptq(
            qweight,
            qzeros,
            scales,
            g_idx,
            group_size=group_size,
            sym=sym,
            checkpoint_format=checkpoint_format,
        )
        dtype = dtype or scales.dtype
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"Int4Linear: dtype must be float16, bfloat16 or float32, got {dtype}")
        device = torch.device(device) if device is not None else qweight.device
        w = _pack_gptq_words(
            qweight.cpu(), scales.cpu().to(dtype), zeros.cpu(), g.cpu(), default_layout(device)
        )
        return cls._from_packed(w.to(device), group_size, sym, dtype, bias)

    # ----------------------------------------------------------------------------------------
    # Views
    # ----------------------------------------------------------------------------------------

    def quantized(self) -> QuantizedWeight:
        """The weight as a QuantizedWeight (q [K, N], real zero points), on the CPU."""
        return unpack(self.weight_packed, self.group_size, self.sym)

    def to_gptq(self, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
        """GPTQ checkpoint tensors (qweight, qzeros, scales, g_idx[, bias]), on the CPU."""
        out = _to_gptq(self.weight_packed, self.group_size, self.sym, checkpoint_format)
        if self.bias is not None:
            out["bias"] = self.bias.cpu()
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [N, K] (nn.Linear orientation), on the module's device."""
        return self.quantized().dequantize(dtype or self.dtype).to(self.device)

    @property
    def nbytes(self) -> int:
        """Bytes of the module's tensors (packed weight and bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    # ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Int4Linear: x.shape[-1] must be in_features = {self.in_features}, "
                f"got shape {list(x.shape)}"
            )
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.act_dtype is not None:
            return ops.int4_gemm(x, self.weight_packed, bias, act_dtype=self.act_dtype)
        return ops.int4_gemm(x, self.weight_packed, bias)

    def extra_repr(self) -> str:
        perm = self.packed_perm
        act = "" if self.act_dtype is None else f", act_dtype={self.act_dtype}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, sym={self.sym}, "
            f"row_perm={perm is not None}, dtype={self.dtype}, layout={self._layout.__name__}"
            f"{act}"
        )


def _check_module_act_dtype(act_dtype):
    if act_dtype is not None and act_dtype != torch.int8:
        raise ValueError(
            f"Int4Linear: act_dtype must be None (exact activations) or torch.int8 (W4A8), got "
            f"{act_dtype!r}"
        )
    return act_dtype


def _pack_quantized(qw: QuantizedWeight, layout: type[Int4PackedWeight]) -> Int4PackedWeight:
    """``layout.pack(qw, layout)`` through the GPTQ words (see :func:`_pack_gptq_words`)."""
    return _pack_gptq_words(_gptq_words(qw.q), qw.scales, qw.zeros, qw.g_idx, layout)


def _from_cpu_nibble_order(words: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_to_cpu_nibble_order`."""

    def expand(v: torch.Tensor) -> torch.Tensor:  # nibbles at 0, 1, 2, 3 -> 0, 2, 4, 6
        v = (v | (v << 8)) & 0x00FF00FF
        return (v | (v << 4)) & 0x0F0F0F0F

    return expand(words & 0xFFFF) | (expand((words >> 16) & 0xFFFF) << 4)


def _to_gptq(
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
    step = max(1, _CHUNK_WORDS // (Nt * TILE_N))
    for o in range(0, K8, step):
        block = src[o : o + step].reshape(-1, Nt * TILE_N)[:, :N]
        qweight[o : o + step] = _from_cpu_nibble_order(block)

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
