"""``Int4Config``: INT4 weight-only quantization of a model's Linear layers, and its
``quantize_`` handler (registered by config type)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bitpress._core.registry import register_quantize_handler
from bitpress.int4.gptq import gptq_quantize_model
from bitpress.int4.modules import Int4Linear
from bitpress.int4.quantized import check_group_size

log = logging.getLogger("bitpress")


def skip_lm_head(name: str, module: nn.Module) -> bool:
    """The default filter: every Linear except the output projection ``lm_head``."""
    return name.split(".")[-1] != "lm_head"


@dataclasses.dataclass
class Int4Config:
    """INT4 weight-only quantization.

    group_size : rows of K per scale/zero group: 32, 64, 128 (default) or -1 (one group).
    sym : symmetric groups (zero point 8) or asymmetric (min/max).
    method : "rtn" (round to nearest, no data) or "gptq" (needs ``calibration``).
    act_order, damp, static_groups, block_size, act_group_aware : GPTQ options
        (bitpress.int4.gptq).
    calibration : batches for GPTQ: token ids [B, T] for a transformers model, input tensors for
        any other module.
    filter_fn : (name, module) -> bool, which Linear layers to quantize (default: all but lm_head).
    dtype : dtype of scales and bias (default: the layer's weight dtype, float16 for float32).
    activations : "exact" (default: x multiplied as given, bf16/fp16/fp32) or "int8" (W4A8:
        each Int4Linear quantizes x per token to int8 on the fly, ``act_dtype=torch.int8``;
        faster on CPUs with AMX-INT8 / VNNI, less accurate: bench/NOTES.md, W4A8). CPU only.
    """

    group_size: int = 128
    sym: bool = True
    method: str = "rtn"
    act_order: bool = False
    damp: float = 0.01
    static_groups: bool = False
    block_size: int = 128
    act_group_aware: bool = False
    calibration: Sequence[torch.Tensor] | None = None
    filter_fn: Callable[[str, nn.Module], bool] | None = None
    dtype: torch.dtype | None = None
    activations: str = "exact"

    def __post_init__(self) -> None:
        if self.activations not in ("exact", "int8"):
            raise ValueError(
                f"Int4Config.activations must be 'exact' or 'int8', got {self.activations!r}"
            )
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"Int4Config.method must be 'rtn' or 'gptq', got {self.method!r}")
        try:
            check_group_size(8, self.group_size)
        except ValueError as e:
            raise ValueError(f"Int4Config.{e}") from None
        if self.method == "gptq" and not self.calibration:
            raise ValueError(
                "Int4Config(method='gptq') needs calibration: a list of token-id batches [B, T] "
                "(transformers models) or of input tensors (any other module)"
            )


def _compatible(linear: nn.Linear, group_size: int) -> str | None:
    K = linear.in_features
    if K % 8:
        return f"in_features {K} is not a multiple of 8"
    if group_size != -1 and K % group_size:
        return f"in_features {K} is not a multiple of group_size {group_size}"
    return None


@register_quantize_handler(Int4Config)
@torch.no_grad()
def quantize_int4(model: nn.Module, config: Int4Config) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by ``Int4Linear``, in place.

    Layers rejected by ``config.filter_fn`` stay as they are; layers whose shape the format
    cannot hold (in_features not a multiple of 8 or of the group size) are skipped with a warning.
    Returns the model.
    """
    keep = config.filter_fn or skip_lm_head
    chosen, skipped = {}, []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or not keep(name, mod):
            continue
        why = _compatible(mod, config.group_size)
        if why:
            skipped.append(f"{name} ({why})")
        else:
            chosen[name] = mod
    if skipped:
        log.warning(
            "quantize_: left %d Linear layers unquantized: %s", len(skipped), ", ".join(skipped)
        )

    act_dtype = torch.int8 if config.activations == "int8" else None
    if config.method == "gptq":
        gptq_quantize_model(
            model,
            config.calibration,
            group_size=config.group_size,
            sym=config.sym,
            act_order=config.act_order,
            damp=config.damp,
            static_groups=config.static_groups,
            block_size=config.block_size,
            act_group_aware=config.act_group_aware,
            filter_fn=lambda n, m: n in chosen,
        )
        for name in chosen:
            mod = model.get_submodule(name)
            if isinstance(mod, Int4Linear):
                mod.act_dtype = act_dtype
        return model
    for name, lin in chosen.items():
        new = Int4Linear.from_linear(
            lin, group_size=config.group_size, sym=config.sym, dtype=config.dtype
        )
        new.act_dtype = act_dtype
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model
