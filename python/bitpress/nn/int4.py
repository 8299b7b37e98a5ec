"""``Int4Linear``: a drop-in ``nn.Linear`` with INT4 weights (GPTQ-style groups).

State (persistent buffers, the GPTQ checkpoint layout, so a state_dict is a checkpoint):

* ``qweight`` int32 [K/8, N] packed along K,
* ``qzeros`` int32 [G, ceil(N/8)] packed along N holding the **real** zero points
  (GPTQ "v2"; ``from_gptq`` converts v1 checkpoints, ``to_gptq`` writes either),
* ``scales`` [G, N] (float16 / bfloat16 / float32), ``g_idx`` int32 [K], optional ``bias`` [N].

The kernel layout (``bitpress.formats.int4_layout``) is derived from these once, on first use on
a device (and again after ``load_state_dict``); it is not saved. CPU tensors get the CPU tile
layout, CUDA tensors the GPU mma layout (read by the CUDA and Triton kernels).
"""

from __future__ import annotations

import torch
from torch import nn

from bitpress import ops
from bitpress.formats import int4_layout
from bitpress.formats.packing import unpack_int4_along_k, unpack_int4_along_n
from bitpress.quantize.common import QuantizedWeight


class Int4Linear(nn.Module):
    """y = x · Wᵀ + b with W stored as INT4 (see the module docstring for the buffers).

    Build one with :meth:`from_linear` (round-to-nearest), :meth:`from_gptq` (checkpoint
    tensors) or :meth:`from_quantized` (any bitpress quantizer); ``bitpress.quantize_`` swaps every
    Linear of a model.
    """

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
    ) -> None:
        super().__init__()
        if in_features % 8:
            raise ValueError(f"Int4Linear: in_features must be a multiple of 8, got {in_features}")
        gs = in_features if group_size == -1 else group_size
        if gs <= 0:
            raise ValueError(f"Int4Linear: group_size must be positive or -1, got {group_size}")
        G = -(-in_features // gs)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.sym = group_size, sym
        self.register_buffer(
            "qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros",
            torch.full(
                (G, -(-out_features // 8)), 0x88888888 - 2**32, dtype=torch.int32, device=device
            ),
        )
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=dtype, device=device))
        self.register_buffer(
            "g_idx", (torch.arange(in_features, device=device) // gs).to(torch.int32)
        )
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._packed: dict[torch.device, int4_layout.Int4PackedWeight] = {}
        self.register_load_state_dict_post_hook(lambda module, _: module._packed.clear())

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> Int4Linear:
        """From any bitpress quantizer's result (``qw.q`` is [K, N])."""
        K, N = qw.q.shape
        dtype = dtype or qw.scales.dtype
        m = cls(
            K,
            N,
            bias is not None,
            group_size=qw.group_size,
            sym=qw.sym,
            dtype=dtype,
            device=qw.q.device,
        )
        gptq = qw.to_gptq()
        m.qweight.copy_(gptq["qweight"])
        if m.qzeros.shape != gptq["qzeros"].shape or m.scales.shape != gptq["scales"].shape:
            # act-order checkpoints may carry a number of groups other than ceil(K / group_size)
            m.qzeros = gptq["qzeros"].clone()
            m.scales = gptq["scales"].to(dtype).clone()
        else:
            m.qzeros.copy_(gptq["qzeros"])
            m.scales.copy_(gptq["scales"].to(dtype))
        m.g_idx.copy_(gptq["g_idx"])
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype))
        return m

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        sym: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Int4Linear:
        """Round-to-nearest quantization of ``linear.weight`` (``bitpress.quantize.rtn``)."""
        from bitpress.quantize.rtn import rtn_quantize

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
    ) -> Int4Linear:
        """From the tensors of a GPTQ checkpoint (``checkpoint_format`` "gptq" = v1 zeros stored
        minus one, "gptq_v2" = real zeros); see ``bitpress.formats.gptq``."""
        from bitpress.formats.gptq import gptq_to_quantized

        qw = gptq_to_quantized(
            qweight,
            qzeros,
            scales,
            g_idx,
            group_size=group_size,
            sym=sym,
            checkpoint_format=checkpoint_format,
        )
        return cls.from_quantized(qw, bias)

    # ----------------------------------------------------------------------------------------
    # Views
    # ----------------------------------------------------------------------------------------

    def quantized(self) -> QuantizedWeight:
        """The weight as a QuantizedWeight (q [K, N], real zero points)."""
        return QuantizedWeight(
            q=unpack_int4_along_k(self.qweight),
            scales=self.scales,
            zeros=unpack_int4_along_n(self.qzeros, self.out_features),
            g_idx=self.g_idx,
            group_size=self.group_size,
            sym=self.sym,
        )

    def to_gptq(self, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
        """GPTQ checkpoint tensors (qweight, qzeros, scales, g_idx[, bias])."""
        from bitpress.formats.gptq import quantized_to_gptq

        out = quantized_to_gptq(self.quantized(), checkpoint_format)
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [N, K] (nn.Linear orientation)."""
        return self.quantized().dequantize(dtype or self.scales.dtype)

    def packed(self, device: torch.device | None = None) -> int4_layout.Int4PackedWeight:
        """The kernel layout for ``device`` (built once and cached): "cpu" tiles on the CPU, the
        "mma" layout on CUDA (``int4_layout.default_layout``)."""
        device = torch.device(device or self.qweight.device)
        p = self._packed.get(device)
        if p is None:
            qw = self.quantized()
            qw = QuantizedWeight(
                qw.q.cpu(), qw.scales.cpu(), qw.zeros.cpu(), qw.g_idx.cpu(), qw.group_size, qw.sym
            )
            p = int4_layout.pack(qw, layout=int4_layout.default_layout(device)).to(device)
            self._packed[device] = p
        return p

    def _apply(self, fn, recurse=True):
        self._packed.clear()  # .to(device) / .half(): rebuild the kernel layout on next use
        return super()._apply(fn, recurse)

    # ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Int4Linear: x.shape[-1] must be in_features = {self.in_features}, "
                f"got shape {list(x.shape)}"
            )
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return ops.int4_gemm(x, self.packed(x.device), bias)

    def extra_repr(self) -> str:
        act_order = bool((self.g_idx.diff() < 0).any()) if self.g_idx.numel() > 1 else False
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, sym={self.sym}, "
            f"act_order={act_order}, dtype={self.scales.dtype}"
        )
