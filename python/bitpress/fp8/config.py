"""``Fp8Config``: FP8 E4M3 quantization of a model's Linear layers, and its ``quantize_``
handler (registered by config type)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bitpress._core.registry import register_quantize_handler
from bitpress.fp8.modules import ACTIVATIONS, GRANULARITIES, Fp8Linear


def skip_lm_head(name: str, module: nn.Module) -> bool:
    """The default filter: every Linear except the output projection ``lm_head``."""
    return name.split(".")[-1] != "lm_head"


@dataclasses.dataclass
class Fp8Config:
    """FP8 E4M3 quantization (:class:`bitpress.Fp8Linear`).

    granularity : weight scales: "channel" (one per output row, default), "tensor", or "block"
        (128 x 128, DeepSeek-V3).
    activations : "dynamic" (default: x quantized per token, per [1, 128] block with block
        weights, then the FP8 GEMM), "static" (a calibrated per-tensor input scale: needs
        ``calibration``) or None (weight-only: x multiplied as given).
    calibration : for "static": batches the model is run on to record each layer's input amax
        (token ids [B, T] for a transformers model, input tensors for any other module).
    filter_fn : (name, module) -> bool, which Linear layers to quantize (default: all but
        lm_head).
    ignore : layers to leave as they are, compressed-tensors style: module names, or
        ``"re:<regex>"`` matched from the start of the name (applied with ``filter_fn``).
    dtype : dtype of the bias (default: the layer's weight dtype).
    """

    granularity: str = "channel"
    activations: str | None = "dynamic"
    calibration: Sequence[torch.Tensor] | None = None
    filter_fn: Callable[[str, nn.Module], bool] | None = None
    ignore: Sequence[str] = ()
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"Fp8Config.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.activations not in ACTIVATIONS:
            raise ValueError(
                f"Fp8Config.activations must be None, 'dynamic' or 'static', got "
                f"{self.activations!r}"
            )
        if self.activations == "static" and not self.calibration:
            raise ValueError(
                "Fp8Config(activations='static') needs calibration: a list of token-id batches "
                "[B, T] (transformers models) or of input tensors (any other module)"
            )
        if self.activations != "static" and self.calibration:
            raise ValueError("Fp8Config.calibration is for activations='static'")
        if isinstance(self.ignore, str) or not all(isinstance(i, str) for i in self.ignore):
            raise ValueError(f"Fp8Config.ignore must be a list of names, got {self.ignore!r}")
        for i in self.ignore:
            if i.startswith("re:"):
                try:
                    re.compile(i[3:])
                except re.error as e:
                    raise ValueError(f"Fp8Config.ignore: {i!r} is not a regex ({e})") from None

    def ignored(self, name: str) -> bool:
        return any(
            (re.match(i[3:], name) is not None) if i.startswith("re:") else i == name
            for i in self.ignore
        )


def _calibrate(model: nn.Module, chosen: dict[str, nn.Linear], batches) -> dict[str, torch.Tensor]:
    """The input amax of every chosen layer over the calibration batches."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            a = args[0].detach().abs().amax().float().cpu()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in chosen.items()]
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return amax


@register_quantize_handler(Fp8Config)
@torch.no_grad()
def quantize_fp8(model: nn.Module, config: Fp8Config) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by ``Fp8Linear``, in place; returns it.

    Layers rejected by ``config.filter_fn`` or matched by ``config.ignore`` stay as they are.
    With static activations the model is first run on ``config.calibration`` (unquantized) and
    each layer's input scale is its input amax / 448; a chosen layer the calibration never
    reached is an error (ValueError naming it).
    """
    keep = config.filter_fn or skip_lm_head
    chosen = {
        name: mod
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and keep(name, mod) and not config.ignored(name)
    }
    amax = {}
    if config.activations == "static":
        amax = _calibrate(model, chosen, config.calibration)
        missed = sorted(set(chosen) - set(amax))
        if missed:
            raise ValueError(
                f"Fp8Config: the calibration batches never reached {missed[:5]}: no input scale "
                "for them (exclude them with ignore / filter_fn)"
            )
    for name, lin in chosen.items():
        new = Fp8Linear.from_linear(
            lin,
            config.granularity,
            config.activations,
            calibration=[amax[name]] if name in amax else None,
            dtype=config.dtype,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model
