"""``Sparse24Config``: 2:4 pruning of a model's Linear layers, and its ``sparsify_`` handler
(registered by config type); and INT4 on a sparsified model: ``quantize_(model, Int4Config(...))``
turns every ``Sparse24Linear`` into a ``Sparse24Int4Linear`` (the handler of ``Int4Config`` is
extended here, so that the int4 feature does not depend on this one)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bitpress._core.registry import register_quantize_handler
from bitpress.calibration import calibrate_layerwise, replace_module
from bitpress.int4.config import Int4Config, quantize_int4, skip_lm_head
from bitpress.int4.quantized import check_group_size
from bitpress.sparse24.modules import Sparse24Int4Linear, Sparse24Linear
from bitpress.sparse24.prune import METHODS, prune_model

log = logging.getLogger("bitpress")


@dataclasses.dataclass
class Sparse24Config:
    """2:4 semi-structured pruning (:mod:`bitpress.sparse24.prune`).

    method : "magnitude" (no data), "wanda" or "sparsegpt" (both need ``calibration``).
    calibration : batches: token ids [B, T] for a transformers model, input tensors for any other
        module. Layers are pruned one decoder layer at a time, each seeing the outputs of the
        already pruned layers before it.
    filter_fn : (name, module) -> bool, which Linear layers to prune (default: all but lm_head).
    damp, block_size : SparseGPT's relative dampening and lazy-batch width (a multiple of 4).
    dtype : the dtype of the Sparse24Linear values and bias (default: the layer's weight dtype).
    """

    method: str = "magnitude"
    calibration: Sequence | None = None
    filter_fn: Callable[[str, nn.Module], bool] | None = None
    damp: float = 0.01
    block_size: int = 128
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Sparse24Config.method must be one of {METHODS}, got {self.method!r}")
        if self.method != "magnitude" and not self.calibration:
            raise ValueError(
                f"Sparse24Config(method={self.method!r}) needs calibration: a list of token-id "
                "batches [B, T] (transformers models) or of input tensors (any other module)"
            )
        if self.block_size <= 0 or self.block_size % 4:
            raise ValueError(
                f"Sparse24Config.block_size must be a positive multiple of 4, got {self.block_size}"
            )
        if self.dtype not in (None, torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(
                f"Sparse24Config.dtype must be None, float16, bfloat16 or float32, got {self.dtype}"
            )


def _chosen(model: nn.Module, keep, module_type, why) -> dict[str, nn.Module]:
    chosen, skipped = {}, []
    for name, mod in model.named_modules():
        if type(mod) is not module_type or not keep(name, mod):
            continue
        reason = why(mod)
        if reason:
            skipped.append(f"{name} ({reason})")
        else:
            chosen[name] = mod
    if skipped:
        log.warning("left %d layers unchanged: %s", len(skipped), ", ".join(skipped))
    return chosen


@register_quantize_handler(Sparse24Config)
@torch.no_grad()
def sparsify_24(model: nn.Module, config: Sparse24Config) -> nn.Module:
    """Prune the ``nn.Linear`` layers of ``model`` to 2:4 and replace them by ``Sparse24Linear``,
    in place. Layers rejected by ``config.filter_fn`` stay; layers whose in_features is not a
    multiple of 8 (the metadata packs two groups of 4 per byte) are skipped with a warning.
    Returns the model."""
    keep = config.filter_fn or skip_lm_head
    chosen = _chosen(
        model,
        keep,
        nn.Linear,
        lambda m: None if m.in_features % 8 == 0 else f"in_features {m.in_features} % 8 != 0",
    )

    def wrap(linear: nn.Linear, pruned: torch.Tensor) -> nn.Module:
        return Sparse24Linear.from_dense(pruned, linear.bias, dtype=config.dtype)

    return prune_model(
        model,
        config.method,
        config.calibration,
        filter_fn=lambda n, m: n in chosen,
        damp=config.damp,
        block_size=config.block_size,
        wrap=wrap,
    )


@register_quantize_handler(Int4Config)
@torch.no_grad()
def quantize_int4_sparse24(model: nn.Module, config: Int4Config) -> nn.Module:
    """``quantize_(model, Int4Config(...))``: every ``Sparse24Linear`` the filter accepts becomes
    a ``Sparse24Int4Linear`` holding the same 2:4 mask (``method="rtn"``: round to nearest;
    ``"gptq"``: GPTQ with the 2:4 mask, layer by layer over the calibration batches), then the
    plain Linear layers are quantized as the int4 handler does (``Int4Linear``).

    Not supported on 2:4 layers (ValueError): act-order (the kernel's groups are ``k //
    group_size``) and ``activations="int8"``.
    """
    keep = config.filter_fn or skip_lm_head
    chosen = _chosen(
        model,
        keep,
        Sparse24Linear,
        lambda m: _int4_incompatible(m.in_features, config.group_size),
    )
    if chosen:
        if config.act_order:
            raise ValueError("Int4Config.act_order: not supported on 2:4 layers (Sparse24Linear)")
        if config.activations != "exact":
            raise ValueError(
                "Int4Config.activations: only 'exact' is supported on 2:4 layers (Sparse24Linear)"
            )
        _quantize_sparse24(model, chosen, config)
    return quantize_int4(model, config)


def _int4_incompatible(K: int, group_size: int) -> str | None:
    if K % 16:
        return f"in_features {K} is not a multiple of 16 (8 INT4 kept values per int32)"
    try:
        check_group_size(K, group_size)
    except ValueError as e:
        return str(e)
    if group_size != -1 and K % group_size:
        return f"in_features {K} is not a multiple of group_size {group_size}"
    return None


def _quantize_sparse24(model: nn.Module, chosen: dict, config: Int4Config) -> None:
    kw = dict(group_size=config.group_size, sym=config.sym, dtype=config.dtype)
    if config.method == "rtn":
        for name, mod in chosen.items():
            replace_module(model, name, Sparse24Int4Linear.from_sparse24(mod, **kw))
        return

    def compress(root, modules, hessians):
        for name, mod in modules.items():
            acc = hessians[name]
            if acc.nsamples == 0:
                raise RuntimeError(f"{name}: no calibration input reached this layer")
            new = Sparse24Int4Linear.from_sparse24(
                mod, H=acc.H, damp=config.damp, block_size=config.block_size, **kw
            )
            replace_module(root, name, new)
            del acc.H

    ids = {id(m) for m in chosen.values()}
    calibrate_layerwise(
        model,
        config.calibration,
        lambda n, m: id(m) in ids,
        compress,
        module_types=(Sparse24Linear,),
        desc="GPTQ 2:4",
    )
