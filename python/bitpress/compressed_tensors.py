"""compressed-tensors checkpoints (``quant_method: "compressed-tensors"``, what llm-compressor
writes): one checkpoint format of :mod:`bitpress.checkpoint` whose layers each name their own
per-layer format, read and written by the schemes registered with
:func:`bitpress._core.registry.register_compressed_tensors_scheme` ("float-quantized":
:mod:`bitpress.fp8.format_compressed_tensors`; "pack-quantized":
:mod:`bitpress.int4.format_pack_quantized`; 2:4 formats in :mod:`bitpress.sparse24`).

The quantization_config (config.json), as compressed-tensors' ``ModelCompressor.update_config``
writes it::

    {"quant_method": "compressed-tensors", "format": "float-quantized" | ... | "mixed-precision",
     "config_groups": {"group_0": {"targets": ["Linear"], "format": "float-quantized",
                                   "weights": {QuantizationArgs}, "input_activations": {...},
                                   "output_activations": null}, ...},
     "ignore": ["lm_head"], "sparsity_config": {} | {"format": "sparse-24-bitmask",
     "targets": [...], "ignore": [...], "sparsity_structure": "2:4", ...},
     "quantization_status": "compressed", "kv_cache_scheme": null, "transform_config": {},
     "version": "0.12.2", "global_compression_ratio": null}

QuantizationArgs: ``{num_bits, type: "int" | "float", symmetric, strategy: "tensor" | "channel" |
"group" | "block" | "token" | ..., group_size, block_structure: [rows, cols], dynamic, actorder,
observer, observer_kwargs}``; a missing strategy is inferred as compressed-tensors infers it
(group_size None: "tensor", > 0: "group", -1: "channel").

Which layer is what (compressed-tensors' ``match_named_modules``): a target or ignore entry is a
module name (exact), a ``re:<regex>`` matched from the start of the name (``re.match``), or a
class name matched against the module's classes ("Linear"). A Linear is quantized by the first
config group that targets it unless ``ignore`` matches it; it is sparse-compressed when the
``sparsity_config`` (format other than "dense") targets it and its ``ignore`` does not match it.
The layer's format is the sparsity format for a sparse-compressed layer (sparsity compression
is applied last, so it is the outer one; the scheme reads the layer's quantization args too),
else the group's ``format``, else the config's global ``format``. Every layer so chosen must
have its tensors (``<name>.<suffix>``); a tensor of a scheme's suffixes in any other module is
reported as unexpected by the loader.

``save_pretrained(model, path, quant_method="compressed-tensors")`` writes every Fp8Linear /
Int4Linear / ... layer with the first scheme that can write it; layers with equal quantization
args share a config group, whose targets are the layers' names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bitpress._core.registry import (
    COMPRESSED_TENSORS,
    CheckpointFormat,
    CheckpointHostile,
    compressed_tensors_module_types,
    compressed_tensors_scheme,
    compressed_tensors_schemes,
    compressed_tensors_suffixes,
    register_checkpoint_format,
)

_STRATEGIES = ("tensor", "channel", "group", "block", "token", "tensor_group", "attn_head")
_TYPES = ("int", "float")


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _targets(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(
            f"{where} must be a list of module names, 're:' patterns or class names, got {value!r}"
        )
    for t in value:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise ValueError(
                    f"{where}: {t!r} is not a valid regular expression ({e})"
                ) from None
    return list(value)


def parse_quantization_args(args: Any, where: str) -> dict | None:
    """One QuantizationArgs dict (or None), normalised: ``{num_bits, type, symmetric, strategy,
    group_size, block_structure, dynamic, actorder}``; ValueError names the field."""
    if args is None:
        return None
    if not isinstance(args, dict):
        raise ValueError(f"{where} must be an object (QuantizationArgs) or null, got {args!r}")
    num_bits = args.get("num_bits", 8)
    if not _is_int(num_bits) or not 1 <= num_bits <= 32:
        raise ValueError(f"{where}.num_bits must be an integer in [1, 32], got {num_bits!r}")
    typ = args.get("type", "int")
    if not isinstance(typ, str) or typ.lower() not in _TYPES:
        raise ValueError(f"{where}.type must be 'int' or 'float', got {typ!r}")
    symmetric = args.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise ValueError(f"{where}.symmetric must be true or false, got {symmetric!r}")
    group_size = args.get("group_size")
    if group_size is not None and (not _is_int(group_size) or group_size < -1 or group_size == 0):
        raise ValueError(f"{where}.group_size must be null, -1 or positive, got {group_size!r}")
    strategy = args.get("strategy")
    if strategy is None:
        strategy = "tensor" if group_size is None else "group" if group_size > 0 else "channel"
    if not isinstance(strategy, str) or strategy.lower() not in _STRATEGIES:
        raise ValueError(f"{where}.strategy must be one of {list(_STRATEGIES)}, got {strategy!r}")
    strategy = strategy.lower()
    if strategy in ("group", "tensor_group") and (group_size is None or group_size <= 0):
        raise ValueError(
            f"{where}.group_size must be positive for strategy {strategy!r}, got {group_size!r}"
        )
    block = args.get("block_structure")
    if isinstance(block, str):  # compressed-tensors' older "128x128" spelling
        try:
            block = [int(x) for x in block.split("x")]
        except ValueError:
            raise ValueError(
                f"{where}.block_structure must be [rows, cols], got {block!r}"
            ) from None
    if block is not None and (
        not isinstance(block, list)
        or len(block) != 2
        or not all(_is_int(b) and b > 0 for b in block)
    ):
        raise ValueError(f"{where}.block_structure must be [rows, cols], got {block!r}")
    if (strategy == "block") != (block is not None):
        raise ValueError(
            f"{where}.block_structure must be given exactly with strategy 'block' (strategy "
            f"{strategy!r}, block_structure {block!r})"
        )
    dynamic = args.get("dynamic", False)
    if isinstance(dynamic, str):
        dynamic = dynamic.lower()
    if dynamic not in (True, False, "local"):
        raise ValueError(f"{where}.dynamic must be true, false or 'local', got {dynamic!r}")
    actorder = args.get("actorder")
    if isinstance(actorder, bool):
        actorder = "group" if actorder else None
    aliases = {"dynamic": "group", "static": "weight"}
    if isinstance(actorder, str):
        actorder = aliases.get(actorder.lower(), actorder.lower())
    if actorder not in (None, "group", "weight"):
        raise ValueError(f"{where}.actorder must be null, 'group' or 'weight', got {actorder!r}")
    return dict(
        num_bits=num_bits,
        type=typ.lower(),
        symmetric=symmetric,
        strategy=strategy,
        group_size=group_size,
        block_structure=block,
        dynamic=dynamic,
        actorder=actorder,
    )


def _parse_sparsity(sc: Any, where: str) -> dict | None:
    if sc is None or sc == {}:
        return None
    if not isinstance(sc, dict):
        raise ValueError(f"{where} must be an object or null, got {sc!r}")
    fmt = sc.get("format")
    if not isinstance(fmt, str):
        raise ValueError(f"{where}.format must be a string, got {fmt!r}")
    out = dict(sc)
    out["targets"] = _targets(sc.get("targets", []), f"{where}.targets")
    ignore = sc.get("ignore")
    out["ignore"] = [] if ignore is None else _targets(ignore, f"{where}.ignore")
    structure = sc.get("sparsity_structure")
    if structure is not None and not isinstance(structure, str):
        raise ValueError(f"{where}.sparsity_structure must be a string, got {structure!r}")
    return out


def parse_compressed_tensors_config(qc: dict, source: str = "quantization_config") -> dict:
    """Validate a compressed-tensors quantization_config; return ``{format, config_groups
    {name: {targets, format, weights, input_activations, output_activations}}, ignore,
    sparsity_config}`` (plus the fields bitpress does not read, kept as they are). ValueError
    names the field."""
    fmt = qc.get("format")
    if "format" in qc and not isinstance(fmt, str):
        raise ValueError(f"{source}.format must be a string, got {fmt!r}")
    groups = qc.get("config_groups", {})
    if groups is None:
        groups = {}
    if not isinstance(groups, dict):
        raise ValueError(f"{source}.config_groups must be an object of groups, got {groups!r}")
    out_groups = {}
    for gname, g in groups.items():
        where = f"{source}.config_groups.{gname}"
        if not isinstance(g, dict):
            raise ValueError(
                f"{where} must be an object (a scheme with targets), got {g!r} (preset scheme "
                "names are not read)"
            )
        unknown = sorted(
            set(g) - {"targets", "weights", "input_activations", "output_activations", "format"}
        )
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        gfmt = g.get("format")
        if gfmt is not None and not isinstance(gfmt, str):
            raise ValueError(f"{where}.format must be a string or null, got {gfmt!r}")
        out_groups[gname] = dict(
            targets=_targets(g.get("targets"), f"{where}.targets"),
            format=gfmt,
            weights=parse_quantization_args(g.get("weights"), f"{where}.weights"),
            input_activations=parse_quantization_args(
                g.get("input_activations"), f"{where}.input_activations"
            ),
            output_activations=parse_quantization_args(
                g.get("output_activations"), f"{where}.output_activations"
            ),
        )
    ignore = qc.get("ignore", [])
    ignore = [] if ignore is None else _targets(ignore, f"{source}.ignore")
    sparsity = _parse_sparsity(qc.get("sparsity_config"), f"{source}.sparsity_config")
    if not out_groups and sparsity is None:
        raise ValueError(f"{source}.config_groups: no quantization group and no sparsity_config")
    status = qc.get("quantization_status", "compressed")
    if status is not None and status != "compressed":
        raise ValueError(
            f"{source}.quantization_status must be 'compressed' (weights stored compressed), got "
            f"{status!r}"
        )
    kv = qc.get("kv_cache_scheme")
    if kv is not None:
        raise ValueError(
            f"{source}.kv_cache_scheme: KV-cache quantization is unsupported, got {kv!r}"
        )
    transform = qc.get("transform_config")
    if transform not in (None, {}):
        raise ValueError(
            f"{source}.transform_config: transformed (rotated) weights are unsupported, got "
            f"{transform!r}"
        )
    out = {k: v for k, v in qc.items() if k not in ("quant_method",)}
    out.update(format=fmt, config_groups=out_groups, ignore=ignore, sparsity_config=sparsity)
    return out


# --------------------------------------------------------------------------------------------
# Matching layers
# --------------------------------------------------------------------------------------------


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == name:
        return True
    return any(cls.__name__ == target for cls in type(module).__mro__)


def _any_match(name: str, module: nn.Module, targets: list[str]) -> bool:
    return any(_matches(name, module, t) for t in targets)


def layer_config(name: str, module: nn.Module, qc: dict) -> dict | None:
    """The scheme_cfg of layer ``name`` (see ``CompressedTensorsScheme``), or None for a layer
    the checkpoint stores as it is."""
    group = gcfg = None
    if not _any_match(name, module, qc["ignore"]):
        for gname, g in qc["config_groups"].items():
            if _any_match(name, module, g["targets"]):
                group, gcfg = gname, g
                break
    sparsity = qc["sparsity_config"]
    sparse = (
        sparsity is not None
        and _any_match(name, module, sparsity["targets"])
        and not _any_match(name, module, sparsity["ignore"])
    )
    if sparse and sparsity["format"] != "dense":
        fmt, where = sparsity["format"], "quantization_config.sparsity_config.format"
    elif gcfg is not None:
        if gcfg["format"] is not None:
            fmt, where = gcfg["format"], f"quantization_config.config_groups.{group}.format"
        else:
            fmt, where = qc["format"], "quantization_config.format"
            if fmt is None or fmt == "mixed-precision":
                raise ValueError(
                    f"quantization_config.config_groups.{group}.format: layer {name!r} needs a "
                    f"format (the global format is {fmt!r})"
                )
    else:
        return None
    return dict(
        format=fmt,
        where=where,
        group=group,
        targets=None if gcfg is None else gcfg["targets"],
        weights=None if gcfg is None else gcfg["weights"],
        input_activations=None if gcfg is None else gcfg["input_activations"],
        output_activations=None if gcfg is None else gcfg["output_activations"],
        sparsity_config=sparsity if sparse else None,
        quantization_config=qc,
    )


def select_compressed_tensors(model: nn.Module, tensors: Mapping, qc: dict) -> list[str]:
    """The Linear layers of ``model`` the config quantizes or sparse-compresses."""
    names = []
    own = set(compressed_tensors_suffixes()) - {"weight", "bias"}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if layer_config(name, module, qc) is not None:
            names.append(name)
            continue
        # A layer stored compressed that the config does not select would be left with random
        # weights (what transformers does with sparse-24-bitmask): name the config instead.
        stray = [f"{name}.{s}" for s in sorted(own) if f"{name}.{s}" in tensors]
        if stray:
            raise ValueError(
                f"quantization_config: layer {name!r} holds compressed tensors {stray} but no "
                "config_groups entry nor the sparsity_config targets it (or ignore excludes it)"
            )
    return names


def load_compressed_tensors_module(
    name: str, linear: nn.Linear, tensors: Mapping, qc: dict, dtype, device=None
) -> nn.Module:
    cfg = layer_config(name, linear, qc)
    if cfg is None:
        raise ValueError(f"checkpoint: layer {name!r} is not quantized by quantization_config")
    scheme = compressed_tensors_scheme(cfg["format"], cfg["where"])
    own = set(scheme.suffixes)
    for suffix in compressed_tensors_suffixes():
        key = f"{name}.{suffix}"
        if suffix not in own and key in tensors:
            raise ValueError(
                f"checkpoint: tensor {key!r} is not a tensor of format {cfg['format']!r} "
                f"(layer {name!r}, {cfg['where']}): wrong config or another packing"
            )
    return scheme.load(name, linear, tensors, cfg, dtype, device or torch.device("cpu"))


def _module_names(tensors: Mapping) -> list[str]:
    suffixes = compressed_tensors_suffixes()
    return sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in suffixes})


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _scheme_for(module: nn.Module):
    for scheme in compressed_tensors_schemes().values():
        if isinstance(module, scheme.module_types) and scheme.can_save(module):
            return scheme
    return None


def accepts_compressed_tensors(module: nn.Module) -> bool:
    return _scheme_for(module) is not None


def save_compressed_tensors(modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, quantization_config) of ``modules`` (the quantized layers of a model)."""
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict] = {}  # json of the group -> group
    sparsity: dict | None = None
    sparse_targets: list[str] = []
    for name, module in modules.items():
        scheme = _scheme_for(module)
        if scheme is None:
            raise ValueError(f"compressed-tensors: no scheme writes layer {name!r} ({module!r})")
        ts, cfg = scheme.save(name, module)
        for suffix, t in ts.items():
            tensors[f"{name}.{suffix}"] = t
        sc = cfg.get("sparsity_config")
        if sc is not None:
            sc = {k: v for k, v in sc.items() if k not in ("targets", "ignore")}
            if sparsity is not None and sparsity != sc:
                raise ValueError(
                    f"compressed-tensors: layer {name!r} needs sparsity_config {sc}, another "
                    f"layer {sparsity} (a checkpoint has one)"
                )
            sparsity = sc
            sparse_targets.append(name)
        if cfg.get("weights") is None:
            continue
        group = {
            "format": cfg.get("format", scheme.format),
            "weights": cfg["weights"],
            "input_activations": cfg.get("input_activations"),
            "output_activations": cfg.get("output_activations"),
        }
        key = json.dumps(group, sort_keys=True)
        groups.setdefault(key, {**group, "targets": []})["targets"].append(name)
    config_groups = {f"group_{i}": g for i, g in enumerate(groups.values())}
    formats = sorted({g["format"] for g in config_groups.values()})
    qc = {
        "quant_method": COMPRESSED_TENSORS,
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "sparsity_config": {}
        if sparsity is None
        else {**sparsity, "targets": sparse_targets, "ignore": []},
        "transform_config": {},
        "global_compression_ratio": None,
    }
    if not config_groups:
        del qc["format"]
    return tensors, qc


# --------------------------------------------------------------------------------------------
# Registration and the hostile-checkpoint suite
# --------------------------------------------------------------------------------------------


def _hostile_quantize(model: nn.Module) -> nn.Module:
    """The Linear layers of a tiny Llama (not lm_head) given to the schemes in turn."""
    parts = [s.hostile() for s in compressed_tensors_schemes().values() if s.hostile is not None]
    linears = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is nn.Linear and not n.endswith("lm_head")
    ]
    for i, (name, linear) in enumerate(linears):
        for j in range(len(parts)):
            new = parts[(i + j) % len(parts)].quantize(name, linear)
            if new is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
                break
    return model


def compressed_tensors_hostile() -> CheckpointHostile:
    parts = [s.hostile() for s in compressed_tensors_schemes().values() if s.hostile is not None]
    tensors: dict = {}
    for p in parts:
        for suffix, spec in p.tensors.items():
            if suffix in tensors and tensors[suffix] != spec:
                raise RuntimeError(
                    f"compressed-tensors schemes disagree on tensor {suffix!r}: {tensors[suffix]} "
                    f"vs {spec}"
                )
            tensors[suffix] = spec
    required = tuple(s for s in tensors if all(s in p.required for p in parts if s in p.tensors))
    return CheckpointHostile(quantize=_hostile_quantize, tensors=tensors, required=required)


COMPRESSED_TENSORS_FORMAT = register_checkpoint_format(
    CheckpointFormat(
        name=COMPRESSED_TENSORS,
        module_type=compressed_tensors_module_types(),
        suffixes=compressed_tensors_suffixes(),
        parse=parse_compressed_tensors_config,
        module_names=_module_names,
        load=load_compressed_tensors_module,
        save=save_compressed_tensors,
        select=select_compressed_tensors,
        accepts=accepts_compressed_tensors,
        save_priority=1,  # after GPTQ: Int4Linear models are written as GPTQ unless asked
    )
)
COMPRESSED_TENSORS_FORMAT.hostile = compressed_tensors_hostile
