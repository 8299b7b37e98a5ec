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
from bitpress.int4.format_gptq import packed_to_gptq, read_gptq
from bitpress.int4.layout import (
    Int4PackedWeight,
    default_layout,
    pack_fast,
    pack_gptq_words,
    unpack,
)
from bitpress.int4.quantized import QuantizedWeight, check_group_size
from bitpress.int4.rtn import rtn_quantize

_PACKED = ("qweight", "scales", "zeros", "group_starts", "perm")
_STATE = ("qweight", "qzeros", "scales", "g_idx")


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
        self._set_weight(pack_fast(zero, default_layout(device or "cpu")).to(device or "cpu"))
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
        gptq = packed_to_gptq(self.weight_packed, self.group_size, self.sym, "gptq_v2")
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
        w = pack_gptq_words(qweight, scales, zeros, g, self._layout)
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
        w = pack_fast(cpu, default_layout(device))
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
        w = pack_gptq_words(
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
        out = packed_to_gptq(self.weight_packed, self.group_size, self.sym, checkpoint_format)
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
