"""Calibration for the data-driven compressors (GPTQ in :mod:`bitpress.int4.gptq`, Wanda and
SparseGPT in :mod:`bitpress.sparse24.prune`): the inputs each Linear layer sees, summarised as
the Hessian of the layer-wise loss, collected layer by layer over a transformers model or in one
pass over any other module.

Only torch (and the core's progress bar: one bar over the decoder layers per call, labelled by
the caller): the compressor is passed in as a callback ``compress(root, linears, hessians)`` that
replaces the Linear layers ``linears`` (name relative to ``root`` -> module) given their
:class:`HessianAccumulator` s.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bitpress._core.progress import progress

Compress = Callable[[nn.Module, dict[str, nn.Linear], dict[str, "HessianAccumulator"]], None]


class HessianAccumulator:
    """Running ``H = 2/n · Σ x xᵀ`` over every row ``x`` [K] passed to :meth:`add`, float32.

    ``n`` counts rows (tokens). The reference implementation counts sequences instead; GPTQ and
    SparseGPT are invariant to a positive scaling of H (dampening is relative to
    ``mean(diag H)``), and Wanda's per-row ranking is too, so the result does not depend on that
    choice. ``diag(H) = 2/n · ‖x_k‖²``: the column norms Wanda needs.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have last dimension in_features={self.in_features}, got {list(x.shape)}"
            )
        x = x.detach().reshape(-1, self.in_features).float().cpu()
        n = x.shape[0]
        if n == 0:
            return self.H
        # Running mean: rescale the old sum so that H stays 2/n · Σ x xᵀ without overflowing.
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = math.sqrt(2.0 / self.nsamples) * x
        self.H += x.t() @ x
        return self.H


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder-layer list of a transformers causal LM (``model.model.layers`` for Llama /
    Qwen / Mistral, ``transformer.h`` for GPT-2-like models, ...): the ModuleList with the most
    parameters that is the ``layers``/``h``/``blocks`` child of some module."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            size = sum(p.numel() for p in mod.parameters())
            if len(mod) and (best is None or size > best[2]):
                best = (name, mod, size)
    return None if best is None else (best[0], best[1])


def _takes_input_ids(model: nn.Module) -> bool:
    try:
        return "input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def run_calibration(model: nn.Module, batch, **transformers_kwargs):
    """One forward pass on a calibration batch: token ids [B, T] for a transformers model
    (``model(input_ids=batch, **transformers_kwargs)``), a dict of keyword arguments, a tuple of
    positional arguments, or an input tensor for any other module (``model(batch)``)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            "calibration batches must be tensors (token ids [B, T] for a transformers model, "
            f"inputs for any other module), tuples or dicts, got {type(batch).__name__}"
        )
    if _takes_input_ids(model):
        return model(input_ids=batch, **transformers_kwargs)
    return model(batch)


def find_linears(
    module: nn.Module, prefix: str, filter_fn, module_types: tuple[type, ...] = (nn.Linear,)
) -> dict[str, nn.Module]:
    """The submodules of ``module`` of ``module_types`` (Linear layers, or modules with
    ``in_features`` that replace them) that ``filter_fn(full_name, m)`` accepts, by name relative
    to ``module`` (``full_name`` is prefixed by ``prefix``)."""
    out = {}
    for name, m in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if isinstance(m, module_types) and filter_fn(full, m):
            out[name] = m
    return out


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """``root.<name> = new`` for a dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def hook_hessians(linears: dict[str, nn.Linear]) -> tuple[dict, list]:
    """A :class:`HessianAccumulator` per Linear, fed by a forward hook; returns them and the
    hook handles (remove them when done)."""
    hessians = {n: HessianAccumulator(m.in_features) for n, m in linears.items()}

    def hook(acc):
        def record(module, args, output):
            acc.add(args[0])  # returns None: a forward hook's return value replaces the output

        return record

    handles = [m.register_forward_hook(hook(hessians[n])) for n, m in linears.items()]
    return hessians, handles


class _Catch(Exception):
    pass


@torch.no_grad()
def calibrate_layerwise(
    model: nn.Module,
    calibration: Sequence,
    filter_fn: Callable[[str, nn.Module], bool],
    compress: Compress,
    module_types: tuple[type, ...] = (nn.Linear,),
    desc: str = "calibrate",
) -> nn.Module:
    """Collect the Hessians of the Linear layers of ``model`` that ``filter_fn`` accepts and let
    ``compress`` replace them, in place.

    For a model with a decoder-layer list (``model.model.layers`` ...), the layers are
    compressed one at a time, sequentially: the inputs of the first layer (hidden states and
    every keyword argument: attention mask, position embeddings, ...) are captured by stopping
    the forward there; then for each layer its Linear inputs are recorded, its Linear layers are
    compressed and replaced, and the layer is run again, now compressed, to produce the next
    layer's inputs, so every layer compensates the error of the layers before it. Without such a
    list, every Linear is hooked, one calibration pass records all Hessians at once, and all are
    compressed. ``module_types``: the classes collected (default ``nn.Linear``). ``desc``: the
    label of the progress bar over the decoder layers (:mod:`bitpress._core.progress`).
    """
    if not calibration:
        raise ValueError(
            "calibration must hold at least one batch (token ids for a transformers model, "
            "input tensors for any other module)"
        )
    was_training = model.training
    model.eval()
    try:
        found = find_layers(model)
        if found is None:
            linears = find_linears(model, "", filter_fn, module_types)
            hessians, handles = hook_hessians(linears)
            try:
                for batch in calibration:
                    run_calibration(model, batch)
            finally:
                for h in handles:
                    h.remove()
            compress(model, linears, hessians)
            return model

        layers_name, layers = found
        inputs: list[tuple[tuple, dict]] = []

        def catch(module, args, kwargs):
            inputs.append((args, kwargs))
            raise _Catch

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for batch in calibration:
                try:
                    run_calibration(model, batch, use_cache=False)
                except _Catch:
                    pass
        finally:
            handle.remove()

        for li, layer in enumerate(progress(layers, desc=desc, unit="layer")):
            prefix = f"{layers_name}.{li}"
            # Named from the layer list, so that a layer that is itself a Linear ("" inside the
            # layer) is replaced in the list, not attached to itself.
            linears = {
                f"{li}.{n}" if n else str(li): m
                for n, m in find_linears(layer, prefix, filter_fn, module_types).items()
            }
            hessians, handles = hook_hessians(linears)
            try:
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            compress(layers, linears, hessians)
            layer = layers[li]
            for j, (args, kwargs) in enumerate(inputs):
                out = layer(*args, **kwargs)
                hidden = out[0] if isinstance(out, tuple | list) else out
                if args:
                    inputs[j] = ((hidden, *args[1:]), kwargs)
                else:
                    inputs[j] = (args, {**kwargs, "hidden_states": hidden})

        # Linear layers outside the decoder list (lm_head if the filter accepts it, ...) see
        # the inputs of the full compressed model.
        rest = {
            n: m
            for n, m in find_linears(model, "", filter_fn, module_types).items()
            if not n.startswith(layers_name + ".")
        }
        if rest:
            hessians, handles = hook_hessians(rest)
            try:
                for batch in calibration:
                    run_calibration(model, batch, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            compress(model, rest, hessians)
        return model
    finally:
        model.train(was_training)
