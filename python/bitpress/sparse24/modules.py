"""``Sparse24Linear`` and ``Sparse24Int4Linear``: drop-in ``nn.Linear`` replacements with 2:4
sparse weights (and INT4 kept values).

Each module holds **one** copy of its weight, in the kernel layout of its device
(:class:`~bitpress.sparse24.layout.Sparse24Layout`), as non-persistent buffers ``packed_*``:

* ``Sparse24Linear``: ``packed_values`` [N, K/2] (the module's dtype) and ``packed_meta``; the
  layout is ``ROW`` (the interchange tensors as they are, what the CPU kernel reads) on the CPU,
  and ``MMA`` (the mma.sp ordered metadata of :mod:`bitpress.sparse24.layout_mma`) on CUDA for
  weights of whole 16 x 32 tiles (N % 16 == 0, K % 32 == 0), ``ROW`` otherwise.
* ``Sparse24Int4Linear``: ``packed_qvalues`` int32 [N, K/16], ``packed_meta`` uint8 [N, K/8],
  ``packed_scales`` [G, N] and, asymmetric, ``packed_zeros`` [G, N], in the ``ROW`` layout on
  every device (the only layout ``sparse24_int4_gemm`` reads).

The state_dict is the interchange format (:mod:`bitpress.sparse24.layout`), converted on save
and on load, so a state_dict is a checkpoint:

* ``Sparse24Linear``: ``values`` [N, K/2] in the module's dtype, ``meta`` uint8 [N, K/8],
  optional ``bias`` [N];
* ``Sparse24Int4Linear``: ``qvalues`` int32 [N, K/16], ``meta`` uint8 [N, K/8], ``scales``
  [G, N] in the module's dtype, ``zeros`` [G, N] (asymmetric only), optional ``bias`` [N];
  ``w = (q − 8)·s`` (symmetric) or ``(q − z)·s`` over groups of ``group_size`` DENSE K positions.

``.to(device)`` converts the weight to the layout of the new device; ``.half()`` / ``.to(dtype)``
cast the values (an elementwise cast keeps the zeros, so the pattern survives) and the scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bitpress.calibration import HessianAccumulator
from bitpress.int4.quantized import QuantizedWeight, check_group_size
from bitpress.int4.rtn import rtn_quantize
from bitpress.sparse24 import layout as _layout
from bitpress.sparse24 import ops
from bitpress.sparse24.layout import Sparse24Layout
from bitpress.sparse24.prune import METHODS, prune_weight, sparsegpt_int4

try:  # the mma.sp layout ships with the CUDA kernel; without it CUDA weights stay ROW
    import bitpress.sparse24.layout_mma as _layout_mma
except ModuleNotFoundError as e:  # pragma: no cover - depends on the build
    if e.name != "bitpress.sparse24.layout_mma":
        raise
    _layout_mma = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def default_layout(device: torch.device | str, N: int, K: int) -> Sparse24Layout:
    """The layout the ``sparse24_gemm`` kernels of ``device`` read for an [N, K] weight: ``MMA``
    on CUDA for whole 16 x 32 tiles (``layout_mma.supports``), ``ROW`` otherwise."""
    if (
        torch.device(device).type == "cuda"
        and _layout_mma is not None
        and _layout_mma.supports(N, K)
    ):
        return Sparse24Layout.MMA
    return Sparse24Layout.ROW


def to_layout(values: torch.Tensor, meta: torch.Tensor, layout: Sparse24Layout):
    """Interchange (values, meta) -> the kernel layout ``layout``, exactly."""
    if layout == Sparse24Layout.ROW:
        return values, meta
    return _layout_mma.to_mma(values, meta)


def from_layout(values: torch.Tensor, meta: torch.Tensor, layout: Sparse24Layout):
    """A weight in kernel layout ``layout`` -> interchange (values, meta), exactly."""
    if layout == Sparse24Layout.ROW:
        return values, meta
    return _layout_mma.from_mma(values, meta)


def _check_dims(cls: str, in_features, out_features) -> None:
    if not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"{cls}: out_features must be a positive int, got {out_features}")
    if not isinstance(in_features, int) or in_features < 8 or in_features % 8:
        raise ValueError(
            f"{cls}: in_features must be a positive multiple of 8 (one 2:4 metadata byte covers "
            f"8 weights along K), got {in_features}"
        )


def _check_dtype(cls: str, dtype) -> None:
    if dtype not in _DTYPES:
        raise TypeError(f"{cls}: dtype must be float16, bfloat16 or float32, got {dtype}")


def check_interchange(
    values: torch.Tensor,
    meta: torch.Tensor,
    N: int | None = None,
    K: int | None = None,
    *,
    values_name: str = "values",
    meta_name: str = "meta",
) -> tuple[int, int]:
    """Check an interchange pair; ValueError/TypeError naming the tensor. Returns (N, K)."""
    if values.dim() != 2:
        raise ValueError(f"{values_name}: expected [N, K/2], got shape {list(values.shape)}")
    if values.dtype not in _DTYPES:
        raise TypeError(
            f"{values_name}: dtype must be float16, bfloat16 or float32, got {values.dtype}"
        )
    n, k = values.shape[0], values.shape[1] * 2
    if (N is not None and n != N) or (K is not None and k != K):
        raise ValueError(
            f"{values_name}: expected shape [{N}, {K // 2 if K is not None else 'K/2'}], got "
            f"{list(values.shape)}"
        )
    if meta.dtype != torch.uint8:
        raise TypeError(f"{meta_name}: dtype must be uint8, got {meta.dtype}")
    if k % 8 or list(meta.shape) != [n, k // 8]:
        raise ValueError(
            f"{meta_name}: expected shape [N, K/8] = [{n}, {k / 8:g}] for {values_name} "
            f"{list(values.shape)} (K a multiple of 8), got {list(meta.shape)}"
        )
    bad = _layout.invalid_nibble(meta)
    if bad is not None:
        r, g, nib = bad
        raise ValueError(
            f"{meta_name}: invalid 2:4 metadata nibble 0x{nib:X} at row {r}, group {g} (valid: "
            "idx0 | idx1 << 2 with idx0 < idx1)"
        )
    return n, k


def dense_24(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Interchange (values, meta) of a dense 2:4 ``weight`` [N, K]; ValueError naming ``name`` and
    the first row and group of 4 that break the pattern."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, K] weight, got shape {list(weight.shape)}")
    if weight.shape[1] % 8:
        raise ValueError(
            f"{name}: in_features K must be a multiple of 8 for 2:4, got {weight.shape[1]}"
        )
    bad = _layout.pattern_violation(weight)
    if bad is not None:
        # the shared message names the tensor "w": name the checkpoint / module tensor instead
        raise ValueError(f"{name}: {_layout.pattern_message(*bad).removeprefix('w ')}")
    # The compiled op (bit for bit the reference's result, tests/sparse24): the reference's
    # sort-and-gather costs seconds per Llama-sized layer.
    return ops.sparse24_compress(weight.detach().contiguous())


def _hessian(linear_in: int, inputs) -> torch.Tensor:
    acc = HessianAccumulator(linear_in)
    for x in [inputs] if isinstance(inputs, torch.Tensor) else inputs:
        acc.add(x)
    if acc.nsamples == 0:
        raise ValueError("inputs: no calibration rows")
    return acc.H


class _Sparse24Base(nn.Module):
    """The packed-buffer bookkeeping shared by both modules."""

    _PACKED: tuple[str, ...] = ()
    _STATE: tuple[str, ...] = ()

    def _set_packed(self, **tensors) -> None:
        for name, t in tensors.items():
            self.register_buffer(f"packed_{name}", t, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.packed_meta.device

    @property
    def nbytes(self) -> int:
        """Bytes of the module's tensors (packed weight and bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def _set_bias(self, bias: torch.Tensor | None, device, dtype) -> None:
        if bias is not None:
            if list(bias.shape) != [self.out_features]:
                raise ValueError(
                    f"bias: expected shape [{self.out_features}], got {list(bias.shape)}"
                )
            # A copy: ``bias`` may be a view of a memory-mapped checkpoint file.
            self.register_buffer("bias", bias.detach().to(device=device, dtype=dtype, copy=True))
        else:
            self.bias = None

    def _pop_state(self, state_dict, prefix, missing_keys, unexpected_keys, optional=()):
        keys = {n: prefix + n for n in self._STATE}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in keys.values()]
        need = [n for n in self._STATE if n not in optional]
        absent = [keys[n] for n in need if keys[n] not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return None
        return {n: state_dict[k] for n, k in keys.items() if k in state_dict}

    def _bias_for(self, x: torch.Tensor):
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return bias

    def _check_x(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: x.shape[-1] must be in_features = {self.in_features}, "
                f"got shape {list(x.shape)}"
            )


class Sparse24Linear(_Sparse24Base):
    """y = x · Wᵀ + b with a 2:4 sparse W (module docstring).

    Build one with :meth:`from_linear` (prune a Linear: magnitude, Wanda or SparseGPT),
    :meth:`from_dense` (an already 2:4 weight) or :meth:`from_interchange` (values and meta);
    ``bitpress.sparsify_`` swaps the Linear layers of a model. ``Sparse24Linear(K, N)`` itself
    holds a zero weight.
    """

    _PACKED = ("values", "meta")
    _STATE = ("values", "meta")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_dims("Sparse24Linear", in_features, out_features)
        _check_dtype("Sparse24Linear", dtype)
        self.in_features, self.out_features = in_features, out_features
        values, meta = _layout.compress(torch.zeros(out_features, in_features, dtype=dtype))
        self._set_interchange(values, meta, torch.device(device or "cpu"))
        self._set_bias(torch.zeros(out_features) if bias else None, self.device, dtype)

    def _set_interchange(self, values, meta, device: torch.device) -> None:
        self.layout = default_layout(device, values.shape[0], values.shape[1] * 2)
        v, m = to_layout(values.to(device), meta.to(device), self.layout)
        self._set_packed(values=v, meta=m)

    @property
    def dtype(self) -> torch.dtype:
        return self.packed_values.dtype

    def interchange(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [N, K/2], meta uint8 [N, K/8]) on the module's device (the buffers themselves
        in the ROW layout, a converted copy otherwise)."""
        return from_layout(self.packed_values, self.packed_meta, self.layout)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [N, K] (nn.Linear orientation), on the module's device."""
        values, meta = self.interchange()
        return _layout.decompress(values, meta, dtype)

    def _apply(self, fn, recurse=True):
        # The packed tensors are not ordinary buffers: a device change may need another layout,
        # and a dtype change must cast the values only (never the metadata).
        packed = {n: self._buffers.pop(f"packed_{n}") for n in self._PACKED}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update({f"packed_{n}": t for n, t in packed.items()})
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        values, meta = self.interchange()
        if probe.is_floating_point() and probe.dtype != self.dtype:
            _check_dtype("Sparse24Linear", probe.dtype)
            values = values.to(probe.dtype)
        if probe.device != self.device or values.dtype != self.dtype:
            self._set_interchange(values, meta, probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        values, meta = self.interchange()
        destination[prefix + "values"] = values
        destination[prefix + "meta"] = meta
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        got = self._pop_state(state_dict, prefix, missing_keys, unexpected_keys)
        if got is None:
            return
        try:
            check_interchange(
                got["values"],
                got["meta"],
                self.out_features,
                self.in_features,
                values_name=prefix + "values",
                meta_name=prefix + "meta",
            )
        except (TypeError, ValueError) as e:
            errors.append(f"While loading {prefix or 'Sparse24Linear'}: {e}")
            return
        self._set_interchange(
            got["values"].detach().clone(), got["meta"].detach().clone(), self.device
        )

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_interchange(
        cls,
        values: torch.Tensor,
        meta: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Sparse24Linear:
        """From interchange tensors (checked; copied to ``device``, default ``values``'s)."""
        N, K = check_interchange(values, meta)
        dtype = dtype or values.dtype
        _check_dtype("Sparse24Linear", dtype)
        device = torch.device(device) if device is not None else values.device
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = K, N
        m._set_interchange(values.detach().to(dtype, copy=True), meta.detach().clone(), device)
        m._set_bias(bias, device, dtype)
        return m

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str = "weight",
    ) -> Sparse24Linear:
        """From a dense weight [N, K] that already has the 2:4 pattern (checked: ValueError
        naming ``name`` and the first row and group of 4 that break it)."""
        dtype = dtype or weight.dtype
        _check_dtype("Sparse24Linear", dtype)
        values, meta = dense_24(weight.detach().to(dtype), name)
        return cls.from_interchange(values, meta, bias, dtype=dtype, device=device or weight.device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str = "magnitude",
        inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        H: torch.Tensor | None = None,
        damp: float = 0.01,
        block_size: int = 128,
        dtype: torch.dtype | None = None,
    ) -> Sparse24Linear:
        """Prune ``linear`` to 2:4 (:mod:`bitpress.sparse24.prune`).

        ``method``: "magnitude", "wanda" or "sparsegpt"; the last two need the layer's
        calibration ``inputs`` ([..., K] tensors) or their Hessian ``H`` [K, K].
        """
        if method not in METHODS:
            raise ValueError(
                f"Sparse24Linear.from_linear: method must be one of {METHODS}, got {method!r}"
            )
        if H is None and inputs is not None:
            H = _hessian(linear.in_features, inputs)
        pruned = prune_weight(linear.weight, method, H, damp=damp, block_size=block_size)
        return cls.from_dense(pruned, linear.bias, dtype=dtype)

    # ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        return ops.sparse24_gemm(
            x, self.packed_values, self.packed_meta, self._bias_for(x), layout=self.layout
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.dtype}, layout={self.layout.name}"
        )


class Sparse24Int4Linear(_Sparse24Base):
    """y = x · Wᵀ + b with a 2:4 sparse W whose kept values are INT4 with groups (module
    docstring).

    Build one with :meth:`from_linear` (prune, then quantize), :meth:`from_sparse24` (quantize the
    kept values of a ``Sparse24Linear``: round to nearest, or GPTQ with the 2:4 mask given
    calibration inputs), :meth:`from_quantized` or :meth:`from_interchange`;
    ``bitpress.quantize_(model, Int4Config(...))`` on a sparsified model swaps every
    ``Sparse24Linear``.
    """

    _PACKED = ("qvalues", "meta", "scales", "zeros")
    _STATE = ("qvalues", "meta", "scales", "zeros")
    layout = Sparse24Layout.ROW

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
        _check_dims("Sparse24Int4Linear", in_features, out_features)
        _check_dtype("Sparse24Int4Linear", dtype)
        try:
            gs = check_group_size(in_features, group_size)
        except ValueError as e:
            raise ValueError(f"Sparse24Int4Linear: {e}") from None
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.sym = group_size, sym
        G = -(-in_features // gs)
        device = torch.device(device or "cpu")
        _, meta = _layout.compress(torch.zeros(out_features, in_features))
        self._set_packed(
            qvalues=_layout.pack_qvalues(torch.full((out_features, in_features // 2), 8)).to(
                device
            ),
            meta=meta.to(device),
            scales=torch.zeros(G, out_features, dtype=dtype, device=device),
            zeros=None if sym else torch.full((G, out_features), 8.0, dtype=dtype, device=device),
        )
        self._set_bias(torch.zeros(out_features) if bias else None, device, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.packed_scales.dtype

    def _check_state(self, t: dict[str, torch.Tensor], prefix: str = "") -> None:
        """ValueError/TypeError naming the tensor that does not fit this module."""
        N, K = self.out_features, self.in_features
        G = -(-K // check_group_size(K, self.group_size))
        q, meta = t["qvalues"], t["meta"]
        if q.dtype != torch.int32:
            raise TypeError(f"{prefix}qvalues: dtype must be int32, got {q.dtype}")
        if list(q.shape) != [N, K // 16] or K % 16:
            raise ValueError(
                f"{prefix}qvalues: expected shape [N, K/16] = [{N}, {K / 16:g}], "
                f"got {list(q.shape)}"
            )
        check_interchange(
            torch.empty(N, K // 2),
            meta,
            N,
            K,
            values_name=f"{prefix}qvalues",
            meta_name=f"{prefix}meta",
        )
        for name in ("scales", "zeros"):
            s = t.get(name)
            if s is None:
                continue
            if s.dtype not in _DTYPES:
                raise TypeError(
                    f"{prefix}{name}: dtype must be float16, bfloat16 or float32, got {s.dtype}"
                )
            if list(s.shape) != [G, N]:
                raise ValueError(
                    f"{prefix}{name}: expected shape [G, N] = [{G}, {N}] "
                    f"(group_size {self.group_size}), got {list(s.shape)}"
                )
        if not self.sym and t.get("zeros") is None:
            raise ValueError(f"{prefix}zeros: missing (asymmetric groups need zero points)")
        if self.sym and t.get("zeros") is not None:
            raise ValueError(f"{prefix}zeros: unexpected for symmetric groups (w = (q - 8) * s)")

    def _apply(self, fn, recurse=True):
        # Only the scales, zeros (and bias) follow a dtype change; codes and metadata never do.
        packed = {n: self._buffers.pop(f"packed_{n}") for n in self._PACKED}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update({f"packed_{n}": t for n, t in packed.items()})
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        dtype = self.dtype
        if probe.is_floating_point():
            _check_dtype("Sparse24Int4Linear", probe.dtype)
            dtype = probe.dtype
        for n, t in packed.items():
            if t is None:
                continue
            t = t.to(probe.device)
            if n in ("scales", "zeros"):
                t = t.to(dtype)
            self._buffers[f"packed_{n}"] = t
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for n in self._STATE:
            t = self._buffers[f"packed_{n}"]
            if t is not None:
                destination[prefix + n] = t
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        got = self._pop_state(
            state_dict, prefix, missing_keys, unexpected_keys, optional=("zeros",)
        )
        if got is None:
            return
        try:
            self._check_state(got, prefix)
        except (TypeError, ValueError) as e:
            errors.append(f"While loading {prefix or 'Sparse24Int4Linear'}: {e}")
            return
        dev = self.device
        self._set_packed(
            qvalues=got["qvalues"].detach().to(dev, copy=True),
            meta=got["meta"].detach().to(dev, copy=True),
            scales=got["scales"].detach().to(dev, copy=True),
            zeros=None if self.sym else got["zeros"].detach().to(dev, self.dtype, copy=True),
        )

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_interchange(
        cls,
        qvalues: torch.Tensor,
        meta: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        group_size: int = 128,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Sparse24Int4Linear:
        """From interchange tensors (checked, copied): qvalues int32 [N, K/16], meta uint8
        [N, K/8], scales [G, N], zeros [G, N] or None (symmetric)."""
        if qvalues.dim() != 2:
            raise ValueError(f"qvalues: expected [N, K/16], got shape {list(qvalues.shape)}")
        N, K = qvalues.shape[0], qvalues.shape[1] * 16
        dtype = dtype or scales.dtype
        _check_dtype("Sparse24Int4Linear", dtype)
        device = torch.device(device) if device is not None else qvalues.device
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = K, N
        m.group_size, m.sym = group_size, zeros is None
        try:
            check_group_size(K, group_size)
        except ValueError as e:
            raise ValueError(f"Sparse24Int4Linear: {e}") from None
        m._check_state({"qvalues": qvalues, "meta": meta, "scales": scales, "zeros": zeros})
        m._set_packed(
            qvalues=qvalues.detach().to(device, copy=True),
            meta=meta.detach().to(device, copy=True),
            scales=scales.detach().to(device, dtype, copy=True),
            zeros=None if zeros is None else zeros.detach().to(device, dtype, copy=True),
        )
        m._set_bias(bias, device, dtype)
        return m

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Sparse24Int4Linear:
        """From an INT4 quantizer's result whose dequantized weight is 2:4 (``qw.g_idx`` must be
        ``k // group_size``: no act-order). ``mask`` bool [N, K] (at most 2 True per group of 4,
        every nonzero weight inside it): the kept positions; default: those of the dequantized
        weight's nonzeros (completed as the interchange format does)."""
        K, N = qw.q.shape
        gs = check_group_size(K, qw.group_size)
        if not torch.equal(qw.g_idx.cpu().long(), torch.arange(K) // gs):
            raise ValueError(
                "g_idx: Sparse24Int4Linear needs groups g_idx[k] = k // group_size (no act-order)"
            )
        deq = qw.dequantize()
        if mask is None:
            mask = deq != 0
        mask = mask.cpu().bool()
        if (deq != 0).logical_and(~mask).any():
            raise ValueError("mask: a nonzero weight lies outside the mask")
        _, meta = dense_24(mask.float(), "mask")
        cols = _layout.dense_columns(meta)  # [N, K/2]
        codes = torch.gather(qw.q.t().cpu().long(), 1, cols)
        dtype = dtype or qw.scales.dtype
        zeros = None if qw.sym else qw.zeros.to(dtype)
        return cls.from_interchange(
            _layout.pack_qvalues(codes),
            meta,
            qw.scales.to(dtype),
            zeros,
            bias,
            group_size=qw.group_size,
            dtype=dtype,
            device=device or qw.q.device,
        )

    @classmethod
    def from_sparse24(
        cls,
        module: Sparse24Linear,
        *,
        group_size: int = 128,
        sym: bool = True,
        inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        H: torch.Tensor | None = None,
        damp: float = 0.01,
        block_size: int = 128,
        dtype: torch.dtype | None = None,
    ) -> Sparse24Int4Linear:
        """Quantize the kept values of a ``Sparse24Linear``, keeping its mask.

        Without calibration: round to nearest per group of DENSE K positions (the pruned zeros
        do not move a group's range, which always contains 0, so this is RTN of the kept values).
        With ``inputs`` or ``H``: GPTQ with the 2:4 mask (:func:`bitpress.sparse24.prune.
        sparsegpt_int4`): every kept value's rounding error is compensated by the kept values
        after it."""
        dtype = dtype or (module.dtype if module.dtype != torch.float32 else torch.float16)
        values, meta = module.interchange()
        values, meta = values.cpu(), meta.cpu()
        dense = _layout.decompress(values, meta, torch.float32)
        cols = _layout.dense_columns(meta)
        mask = torch.zeros(dense.shape, dtype=torch.bool).scatter_(1, cols, True)
        if H is None and inputs is not None:
            H = _hessian(module.in_features, inputs)
        if H is None:
            qw = rtn_quantize(dense, group_size=group_size, sym=sym, scale_dtype=dtype)
        else:
            qw, mask = sparsegpt_int4(
                dense,
                H,
                group_size=group_size,
                sym=sym,
                mask=mask,
                damp=damp,
                block_size=block_size,
                scale_dtype=dtype,
            )
        return cls.from_quantized(qw, mask, module.bias, dtype=dtype, device=module.device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str = "magnitude",
        inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        group_size: int = 128,
        sym: bool = True,
        H: torch.Tensor | None = None,
        damp: float = 0.01,
        block_size: int = 128,
        dtype: torch.dtype | None = None,
    ) -> Sparse24Int4Linear:
        """Prune ``linear`` to 2:4 and quantize the kept values. ``method="sparsegpt"`` with
        calibration (``inputs`` or ``H``) chooses the mask and the codes in one error-compensated
        sweep (:func:`~bitpress.sparse24.prune.sparsegpt_int4`); the other methods prune first,
        then GPTQ-with-mask (given calibration) or round to nearest."""
        if method not in METHODS:
            raise ValueError(
                f"Sparse24Int4Linear.from_linear: method must be one of {METHODS}, got {method!r}"
            )
        dtype = dtype or (
            linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.float16
        )
        if H is None and inputs is not None:
            H = _hessian(linear.in_features, inputs)
        if method == "sparsegpt" and H is not None:
            qw, mask = sparsegpt_int4(
                linear.weight,
                H,
                group_size=group_size,
                sym=sym,
                damp=damp,
                block_size=block_size,
                scale_dtype=dtype,
            )
            return cls.from_quantized(
                qw, mask, linear.bias, dtype=dtype, device=linear.weight.device
            )
        sparse = Sparse24Linear.from_linear(
            linear, method, H=H, damp=damp, block_size=block_size, dtype=torch.float32
        )
        return cls.from_sparse24(
            sparse,
            group_size=group_size,
            sym=sym,
            H=H,
            damp=damp,
            block_size=block_size,
            dtype=dtype,
        )

    # ----------------------------------------------------------------------------------------
    # Views
    # ----------------------------------------------------------------------------------------

    def interchange(self) -> dict[str, torch.Tensor | None]:
        """{qvalues, meta, scales, zeros} (the module's buffers themselves)."""
        return {n: self._buffers[f"packed_{n}"] for n in self._PACKED}

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized dense weight [N, K], on the module's device."""
        t = self.interchange()
        w = _layout_int4_dense(t, self.group_size)
        return w.to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        scales, zeros = self.packed_scales, self.packed_zeros
        if scales.dtype != x.dtype:
            scales = scales.float()
            zeros = None if zeros is None else zeros.float()
        return ops.sparse24_int4_gemm(
            x,
            self.packed_qvalues,
            self.packed_meta,
            scales,
            zeros,
            group_size=self.group_size,
            bias=self._bias_for(x),
            layout=self.layout,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, sym={self.sym}, "
            f"dtype={self.dtype}, layout={self.layout.name}"
        )


def _layout_int4_dense(t: dict, group_size: int) -> torch.Tensor:
    """The dense float32 weight of 2:4 + INT4 interchange tensors (formula of the layout)."""
    q = _layout.unpack_qvalues(t["qvalues"]).float()  # [N, K/2]
    cols = _layout.dense_columns(t["meta"])
    N, K = q.shape[0], q.shape[1] * 2
    gs = K if group_size == -1 else group_size
    g = cols // gs
    n = torch.arange(N, device=q.device).unsqueeze(1)
    s = t["scales"].float()[g, n]
    z = t["zeros"].float()[g, n] if t["zeros"] is not None else 8.0
    return torch.zeros(N, K, device=q.device).scatter_(1, cols, (q - z) * s)
