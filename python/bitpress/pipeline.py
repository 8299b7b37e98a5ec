"""Distill, prune, recover, quantize: the compression pipeline as one call on a user's model.

:func:`compress` runs any subset of four stages, in this order, on a transformers causal LM:

1. **distill** (:class:`DistillConfig`): a smaller student, by default the teacher with every other
   decoder layer (initialised from those layers, as DistilBERT does), trained on the teacher's soft
   targets with the knowledge-distillation loss (Hinton et al. 2015;
   :func:`bitpress.speculative.distill.distill_loss`);
2. **prune** (:class:`bitpress.Sparse24Config`): 2:4 pruning (magnitude, Wanda or SparseGPT);
3. **recover** (:class:`RecoverConfig`): a short fine-tune of the pruned model with its 2:4 masks
   held fixed, on the original (dense) model's soft targets;
4. **quantize** (:class:`bitpress.Int4Config` or :class:`bitpress.Fp8Config`): GPTQ or RTN INT4
   (2:4 layers become ``Sparse24Int4Linear``), or FP8.

The input model is never modified: the stages work on a student or on a copy.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bitpress.calibration import find_layers, replace_module
from bitpress.quantize import quantize_, sparsify_
from bitpress.sparse24 import Sparse24Config, Sparse24Linear
from bitpress.speculative.distill import distill_draft


@dataclasses.dataclass
class DistillConfig:
    """Knowledge distillation into a smaller student.

    student : the student (a causal LM with the teacher's vocabulary), trained in place; default
        (None): the teacher's architecture with the decoder layers ``keep_layers`` only,
        initialised from them (:func:`layer_subset_student`).
    keep_layers : the teacher's decoder layers the default student keeps (default: every other
        one, 0, 2, 4, ...: half the depth).
    steps, lr : AdamW steps over the batches (cycled) and the peak learning rate (cosine decay).
    temperature, alpha : the soft targets' temperature and the soft term's weight; ``1 - alpha``
        weights the cross-entropy on the data's next token.
    """

    student: nn.Module | None = None
    keep_layers: Sequence[int] | None = None
    steps: int = 300
    lr: float = 1e-3
    temperature: float = 2.0
    alpha: float = 0.9


@dataclasses.dataclass
class RecoverConfig:
    """The fine-tune after 2:4 pruning: the pruned weights stay exactly zero (their gradients are
    masked and AdamW runs without weight decay, so their moments stay zero), the kept ones learn
    from the dense model's soft targets (``alpha``) and the data (``1 - alpha``)."""

    steps: int = 100
    lr: float = 2e-4
    temperature: float = 2.0
    alpha: float = 0.9


@dataclasses.dataclass
class CompressResult:
    """What :func:`compress` returns: the compressed model, the seconds per stage and the
    training losses per stage (distill, recover)."""

    model: nn.Module
    seconds: dict[str, float]
    losses: dict[str, list[float]]


def layer_subset_student(teacher: nn.Module, keep_layers: Sequence[int] | None = None) -> nn.Module:
    """A transformers causal LM with ``teacher``'s architecture and only the decoder layers
    ``keep_layers`` (default: every other one), each initialised from that teacher layer; the
    embeddings, final norm and output head are copied too."""
    found = find_layers(teacher)
    config = getattr(teacher, "config", None)
    if found is None or config is None or not hasattr(config, "num_hidden_layers"):
        raise TypeError(
            "layer_subset_student: teacher must be a transformers causal LM (a config with "
            "num_hidden_layers and a ModuleList of decoder layers); pass DistillConfig(student=...)"
        )
    prefix, layers = found
    n = len(layers)
    keep = list(range(0, n, 2)) if keep_layers is None else list(keep_layers)
    if not keep or any(not 0 <= k < n for k in keep) or len(set(keep)) != len(keep):
        raise ValueError(
            f"layer_subset_student: keep_layers must be distinct layer indices in [0, {n}), got "
            f"{keep}"
        )
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[k] for k in keep]
    student = type(teacher)(cfg)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(index) in keep:
                state[f"{prefix}.{keep.index(int(index))}.{rest}"] = value
        else:
            state[key] = value
    student.load_state_dict(state)
    return student.to(next(teacher.parameters()).dtype)


def densify_24(model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn every Sparse24Linear of ``model`` into an nn.Linear holding its dense 2:4 weight, in
    place; returns the masks (True: kept) by layer name."""
    masks = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Sparse24Linear):
            weight = mod.dense_weight()
            linear = nn.Linear(
                mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=weight.dtype
            )
            with torch.no_grad():
                linear.weight.copy_(weight)
                if mod.bias is not None:
                    linear.bias.copy_(mod.bias)
            replace_module(model, name, linear)
            masks[name] = weight != 0
    return masks


def recover_(
    model: nn.Module,
    teacher: nn.Module,
    batches: Sequence[torch.Tensor],
    config: RecoverConfig,
) -> list[float]:
    """Fine-tune a model whose Linear layers are ``Sparse24Linear`` with the 2:4 masks held fixed,
    in place (the layers become dense for the fine-tune and ``Sparse24Linear`` again after it,
    with the same masks; checked). Returns the loss per step."""
    dtypes = {n: m.dtype for n, m in model.named_modules() if isinstance(m, Sparse24Linear)}
    if not dtypes:
        raise ValueError("recover_: the model has no Sparse24Linear layer to fine-tune")
    masks = densify_24(model)
    hooks = [
        model.get_submodule(name).weight.register_hook(lambda g, m=mask: g * m)
        for name, mask in masks.items()
    ]
    try:
        losses = distill_draft(
            model,
            teacher,
            batches,
            config.steps,
            temperature=config.temperature,
            alpha=config.alpha,
            lr=config.lr,
            weight_decay=0.0,
            desc="recover",
        )
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for name, mask in masks.items():
            linear = model.get_submodule(name)
            if bool((linear.weight[~mask] != 0).any()):
                raise RuntimeError(f"recover_: {name}: a pruned weight moved during the fine-tune")
            # A kept weight that trained to exactly zero stays a kept position: from_dense would
            # still find a 2:4 pattern (at most 2 nonzeros per group), so the check above suffices.
            sparse = Sparse24Linear.from_dense(
                linear.weight * mask, linear.bias, dtype=dtypes[name], name=f"{name}.weight"
            )
            replace_module(model, name, sparse)
    return losses


def compress(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    distill: DistillConfig | None = None,
    prune: Sparse24Config | None = None,
    recover: RecoverConfig | None = None,
    quantize=None,
    log: Callable[[str], None] | None = None,
) -> CompressResult:
    """Distill, prune, recover, quantize: run the stages that are given, in that order.

    Parameters
    ----------
    model : a transformers causal LM (the teacher of distill and recover); not modified.
    batches : token ids [B, T] for the training stages (distill, recover), cycled.
    distill : :class:`DistillConfig`; the later stages then work on the student.
    prune : :class:`bitpress.Sparse24Config` (its calibration batches for Wanda / SparseGPT).
    recover : :class:`RecoverConfig`; needs ``prune``. The teacher is the original ``model``.
    quantize : a config for :func:`bitpress.quantize_` (``Int4Config``: 2:4 layers become
        ``Sparse24Int4Linear``; ``Fp8Config``).

    Returns
    -------
    :class:`CompressResult` (the model in eval mode, seconds and losses per stage).
    """
    if recover is not None and prune is None:
        raise ValueError("compress: recover needs prune (it fine-tunes a 2:4-pruned model)")
    if not any((distill, prune, quantize)):
        raise ValueError("compress: give at least one of distill, prune, quantize")
    batches = list(batches)
    if (distill or recover) and not batches:
        raise ValueError("compress: batches is empty (distill and recover train on them)")
    say = log or (lambda s: None)
    seconds, losses = {}, {}
    model.eval()
    work = None
    if distill is not None:
        t0 = time.perf_counter()
        work = distill.student or layer_subset_student(model, distill.keep_layers)
        say(f"distill: {_params(work) / 1e6:.2f} M parameters from {_params(model) / 1e6:.2f} M")
        losses["distill"] = distill_draft(
            work,
            model,
            batches,
            distill.steps,
            temperature=distill.temperature,
            alpha=distill.alpha,
            lr=distill.lr,
            desc="distill",
        )
        seconds["distill"] = time.perf_counter() - t0
    if work is None:
        work = copy.deepcopy(model)
    if prune is not None:
        t0 = time.perf_counter()
        sparsify_(work, prune)
        seconds["prune"] = time.perf_counter() - t0
        say(f"prune: 2:4 {prune.method} in {seconds['prune']:.1f} s")
    if recover is not None:
        t0 = time.perf_counter()
        losses["recover"] = recover_(work, model, batches, recover)
        seconds["recover"] = time.perf_counter() - t0
    if quantize is not None:
        t0 = time.perf_counter()
        quantize_(work, quantize)
        seconds["quantize"] = time.perf_counter() - t0
        say(f"quantize: {type(quantize).__name__} in {seconds['quantize']:.1f} s")
    return CompressResult(work.eval(), seconds, losses)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
