"""``Fp8Linear``: a drop-in ``nn.Linear`` with an FP8 E4M3 weight (``torch.float8_e4m3fn``) and
fp32 scales, in the tensor names of compressed-tensors checkpoints.

The module holds **one** copy of its weight, the checkpoint's own tensors, as persistent
buffers (the state_dict is a checkpoint layer as llm-compressor writes it):

* ``weight`` float8_e4m3fn ``[N, K]`` (a Linear's orientation, K-major: what both FP8 GEMMs read);
* ``weight_scale`` float32: ``[1]`` (granularity "tensor"), ``[N, 1]`` ("channel") or
  ``[ceil(N/128), ceil(K/128)]`` ("block", DeepSeek-V3's 128 x 128 blocks);
* ``input_scale`` float32 ``[1]``, only with ``activations="static"``;
* ``bias`` ``[N]`` in the module's ``dtype``, optional.

``W[n, k] = weight[n, k] * scale(n, k)``, the scale of the tensor, of row n, or of block
``(n // 128, k // 128)``.

Activations (``activations``):

* ``None``: weight-only (W8A16): ``bitpress.ops.fp8_weight_gemm(x, weight, weight_scale)``, x
  multiplied as given (bf16 / fp16 / fp32): the path for GPUs without FP8 tensor cores and the
  CPU.
* ``"dynamic"``: x quantized on the fly by ``bitpress.ops.fp8_quantize``, one scale per row
  ("token") with tensor / channel weights, one per row and 128 columns ([1, 128] blocks) with
  block weights, then ``bitpress.ops.fp8_gemm`` (W8A8).
* ``"static"``: x quantized with the calibrated per-tensor ``input_scale`` (saturating at
  +-448), then ``fp8_gemm``. The scale comes from :meth:`Fp8Linear.calibrate` (amax of sample
  inputs / 448), from ``from_linear(..., input_scale=)``, or from a checkpoint; a static module
  without one refuses to run.

``fp8_gemm`` pairs a per-tensor scale with a per-tensor or per-row one, and blockwise scales
only with blockwise ones: a static input scale meeting block weights is broadcast to [M,
ceil(K/128)] (the same numbers).

``.to(device)`` moves the tensors; ``.half()`` / ``.to(dtype)`` change the dtype of the bias (and
of the module's ``dtype``) only: the E4M3 weight and the fp32 scales keep theirs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bitpress.fp8 import ops

GRANULARITIES = ("tensor", "channel", "block")
ACTIVATIONS = (None, "dynamic", "static")
BLOCK = 128
E4M3 = torch.float8_e4m3fn
_FIXED = ("weight", "weight_scale", "input_scale")  # buffers whose dtype never changes
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check(granularity, activations) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"Fp8Linear: granularity must be one of {GRANULARITIES}, got {granularity!r}"
        )
    if activations not in ACTIVATIONS:
        raise ValueError(
            f"Fp8Linear: activations must be None, 'dynamic' or 'static', got {activations!r}"
        )


def scale_shape(granularity: str, N: int, K: int) -> list[int]:
    """The shape of ``weight_scale`` for a weight [N, K]."""
    if granularity == "tensor":
        return [1]
    if granularity == "channel":
        return [N, 1]
    return [-(-N // BLOCK), -(-K // BLOCK)]


class Fp8Linear(nn.Module):
    """y = x · Wᵀ + b with W stored in FP8 E4M3 (see the module docstring).

    Build one with :meth:`from_linear` (quantizes a Linear's weight) or :meth:`from_tensors`
    (checkpoint tensors); ``bitpress.quantize_(model, bitpress.Fp8Config(...))`` swaps every
    Linear of a model. ``Fp8Linear(K, N)`` itself holds a zero weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        granularity: str = "channel",
        activations: str | None = "dynamic",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check(granularity, activations)
        for what, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Fp8Linear: {what} must be a positive int, got {v!r}")
        if dtype not in _FLOATS:
            raise TypeError(f"Fp8Linear: dtype must be float16, bfloat16 or float32, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.granularity, self.activations, self.dtype = granularity, activations, dtype
        N, K = out_features, in_features
        self.register_buffer("weight", torch.zeros(N, K, dtype=E4M3, device=device))
        shape = scale_shape(granularity, N, K)
        self.register_buffer("weight_scale", torch.ones(shape, dtype=torch.float32, device=device))
        # A static module's placeholder scale (its weight is a placeholder too): load_state_dict
        # fills both.
        ones = torch.ones(1, dtype=torch.float32, device=device)
        self.register_buffer("input_scale", ones if activations == "static" else None)
        if bias:
            self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device))
        else:
            self.bias = None

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_tensors(
        cls,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        granularity: str,
        activations: str | None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Fp8Linear:
        """From checkpoint tensors: ``weight`` E4M3 [N, K], ``weight_scale`` (any float dtype,
        converted to float32; the shape of ``granularity``; a per-tensor scale may be 0-D),
        ``input_scale`` (numel 1, required exactly with ``activations="static"``), ``bias``
        [N]. Copies them (they may be views of memory-mapped files) onto ``device`` (default:
        that of ``weight``). ``dtype``: of the bias and the module (default: bias's, else
        bfloat16). Errors name the argument."""
        _check(granularity, activations)
        if not isinstance(weight, torch.Tensor) or weight.dtype != E4M3 or weight.dim() != 2:
            raise TypeError(
                f"Fp8Linear: weight must be a float8_e4m3fn [N, K] tensor, got {_desc(weight)}"
            )
        N, K = weight.shape
        if N < 1 or K < 1:
            raise ValueError(
                f"Fp8Linear: weight must be non-empty [N, K], got {list(weight.shape)}"
            )
        want = scale_shape(granularity, N, K)
        if not isinstance(weight_scale, torch.Tensor) or weight_scale.dtype not in _FLOATS:
            raise TypeError(
                f"Fp8Linear: weight_scale must be a float16/bfloat16/float32 tensor, got "
                f"{_desc(weight_scale)}"
            )
        if granularity == "tensor" and weight_scale.dim() == 0:
            weight_scale = weight_scale.reshape(1)
        if list(weight_scale.shape) != want:
            raise ValueError(
                f"Fp8Linear: weight_scale must have shape {want} for granularity {granularity!r} "
                f"(N={N}, K={K}), got {list(weight_scale.shape)}"
            )
        if (activations == "static") != (input_scale is not None):
            raise ValueError(
                "Fp8Linear: input_scale must be given exactly with activations='static', got "
                f"{_desc(input_scale)} with activations={activations!r}"
            )
        if input_scale is not None:
            if not isinstance(input_scale, torch.Tensor) or input_scale.dtype not in _FLOATS:
                raise TypeError(
                    f"Fp8Linear: input_scale must be a float tensor, got {_desc(input_scale)}"
                )
            if list(input_scale.shape) not in ([], [1]):
                raise ValueError(
                    f"Fp8Linear: input_scale must have shape [1], got {list(input_scale.shape)}"
                )
        if bias is not None and (
            not isinstance(bias, torch.Tensor)
            or not bias.dtype.is_floating_point
            or list(bias.shape) != [N]
        ):
            raise ValueError(
                f"Fp8Linear: bias must be a float tensor [N] = [{N}], got {_desc(bias)}"
            )
        dtype = dtype or (
            bias.dtype if bias is not None and bias.dtype in _FLOATS else torch.bfloat16
        )
        if dtype not in _FLOATS:
            raise TypeError(f"Fp8Linear: dtype must be float16, bfloat16 or float32, got {dtype}")
        device = torch.device(device) if device is not None else weight.device
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = K, N
        m.granularity, m.activations, m.dtype = granularity, activations, dtype
        m.register_buffer("weight", weight.detach().to(device=device, copy=True))
        ws = weight_scale.detach().to(device=device, dtype=torch.float32, copy=True)
        m.register_buffer("weight_scale", ws)
        if input_scale is not None:
            s = input_scale.detach().to(device=device, dtype=torch.float32, copy=True).reshape(1)
            m.register_buffer("input_scale", s)
        else:
            m.register_buffer("input_scale", None)
        if bias is not None:
            m.register_buffer("bias", bias.detach().to(device=device, dtype=dtype, copy=True))
        else:
            m.bias = None
        return m

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        granularity: str = "channel",
        activations: str | None = "dynamic",
        *,
        input_scale: float | torch.Tensor | None = None,
        calibration: Iterable[torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Fp8Linear:
        """Quantize ``linear.weight`` to E4M3 with ``bitpress.ops.fp8_quantize`` (scale = amax /
        448 per tensor, row or 128 x 128 block; round to nearest even, saturating).

        ``activations="static"`` needs its input scale: ``input_scale`` (a number or a
        one-element tensor), or ``calibration`` (inputs of this layer, [..., K]: the scale is
        their amax / 448), or a later :meth:`calibrate`. ``dtype``: of the bias and the module
        (default: the weight's; float16 for a float32 weight is *not* applied: float32 stays).
        """
        _check(granularity, activations)
        if activations != "static" and (input_scale is not None or calibration is not None):
            raise ValueError("Fp8Linear: input_scale / calibration are for activations='static'")
        w = linear.weight.detach()
        if granularity == "block":
            q, s = ops.fp8_quantize(w, granularity="block", block_size=[BLOCK, BLOCK])
        else:
            q, s = ops.fp8_quantize(w, granularity=granularity)
        dtype = dtype or (w.dtype if w.dtype in _FLOATS else torch.bfloat16)
        m = cls.from_tensors(
            q, s, None, linear.bias, granularity=granularity, activations=None, dtype=dtype
        )
        m.activations = activations
        if input_scale is not None:
            m.set_input_scale(input_scale)
        elif calibration is not None:
            m.calibrate(calibration)
        return m

    # ----------------------------------------------------------------------------------------
    # Static activations
    # ----------------------------------------------------------------------------------------

    def set_input_scale(self, scale: float | torch.Tensor) -> None:
        """Set the static per-tensor input scale (positive, finite)."""
        s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1)
        if s.numel() != 1 or not bool(torch.isfinite(s).all()) or float(s) <= 0:
            raise ValueError(
                f"Fp8Linear: input_scale must be one positive finite number, got {scale!r}"
            )
        self.register_buffer("input_scale", s.to(self.weight.device).clone())

    @torch.no_grad()
    def calibrate(self, inputs: Iterable[torch.Tensor]) -> torch.Tensor:
        """Set ``input_scale`` from sample inputs [..., K] of this layer (the scale
        ``fp8_quantize`` computes for their joint amax, i.e. amax / 448); returns it."""
        amax = torch.zeros((), dtype=torch.float32)
        n = 0
        for x in inputs:
            amax = torch.maximum(amax, x.detach().abs().amax().float().cpu())
            n += 1
        if n == 0:
            raise ValueError("Fp8Linear.calibrate: no inputs")
        _, s = ops.fp8_quantize(amax.reshape(1, 1), granularity="tensor")
        self.set_input_scale(s)
        return self.input_scale

    # ----------------------------------------------------------------------------------------
    # dtype / device
    # ----------------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        fixed = {n: self._buffers.pop(n) for n in _FIXED if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(fixed)
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.weight.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        for n, t in fixed.items():
            if t is not None and t.device != probe.device:
                self._buffers[n] = t.to(probe.device)
        return self

    @property
    def device(self) -> torch.device:
        return self.weight.device

    # ----------------------------------------------------------------------------------------
    # Views
    # ----------------------------------------------------------------------------------------

    def expanded_scale(self) -> torch.Tensor:
        """The float32 scale of every weight element, [N, K]."""
        N, K = self.out_features, self.in_features
        s = self.weight_scale
        if self.granularity == "block":
            s = s.repeat_interleave(BLOCK, 0)[:N].repeat_interleave(BLOCK, 1)[:, :K]
        return s.expand(N, K)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [N, K] in ``dtype`` (default: the module's): each E4M3 code times its
        float32 scale, computed in float32 (float64 for ``dtype=torch.float64``, where it is
        exact)."""
        dtype = dtype or self.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.weight.to(work) * self.expanded_scale().to(work)).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    # ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        if x.dim() < 1 or x.shape[-1] != K:
            raise ValueError(
                f"Fp8Linear: x.shape[-1] must be in_features = {K}, got shape {list(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.activations is None:
            y = ops.fp8_weight_gemm(x2, self.weight, self.weight_scale, bias)
            return y.reshape(*lead, N)
        ws = self.weight_scale
        M = x2.shape[0]
        if self.activations == "dynamic":
            if self.granularity == "block":
                q, xs = ops.fp8_quantize(x2, granularity="block", block_size=[1, BLOCK])
            else:
                q, xs = ops.fp8_quantize(x2, granularity="token")
        else:
            if self.input_scale is None:
                raise RuntimeError(
                    "Fp8Linear: activations='static' needs input_scale: call calibrate(inputs) "
                    "or set_input_scale(), or load it from a checkpoint"
                )
            q, xs = ops.fp8_quantize(x2, granularity="tensor", scale=self.input_scale)
            if self.granularity == "block":  # blockwise scales pair only with blockwise ones
                xs = xs.reshape(1, 1).expand(M, ws.shape[1]).contiguous()
        y = ops.fp8_gemm(q, self.weight, xs, ws, bias, out_dtype=x.dtype)
        return y.reshape(*lead, N)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, granularity={self.granularity}, "
            f"activations={self.activations}, dtype={self.dtype}"
        )


def _desc(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
    return type(t).__name__
