"""GPTQ-quantized transformers checkpoints (the AutoGPTQ / GPTQModel / optimum directory layout):
:func:`from_pretrained` loads one into a transformers model whose quantized Linear layers are
:class:`bitpress.nn.Int4Linear`; :func:`save_pretrained` writes the same layout back.

A checkpoint directory holds:

* ``config.json``: the transformers config, with ``quantization_config`` = ``{"quant_method":
  "gptq", "bits": 4, "group_size": ..., "desc_act": ..., "sym": ..., "checkpoint_format":
  "gptq" | "gptq_v2"}``; AutoGPTQ's separate ``quantize_config.json`` (same fields, where
  ``quant_method`` may be absent) is read when config.json has none. Missing ``sym`` means True,
  missing ``checkpoint_format`` means "gptq" (v1 zeros, stored minus one), missing ``desc_act``
  means False. GPTQModel's ``format`` key is read as ``checkpoint_format``.
* ``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (``weight_map``),
  or, without an index, every ``*.safetensors`` file of the directory. Safetensors only.
* For a quantized Linear ``<name>``: ``<name>.qweight`` int32 [K/8, N], ``<name>.qzeros`` int32
  [G, N/8], ``<name>.scales`` [G, N], ``<name>.g_idx`` int32 [K] (required with desc_act),
  optional ``<name>.bias`` [N] (older AutoGPTQ versions write one even for bias-free layers; it
  is used). Layout in :mod:`bitpress.formats.gptq`. Every other tensor is a plain parameter or
  persistent buffer of the model (embeddings, norms, lm_head).

Strictness: a missing tensor, a tensor of the wrong shape or dtype, and a tensor the model has
no place for are all errors naming the tensor (an unexpected tensor almost always means a wrong
config or an unsupported packing, e.g. Marlin / ExLlama repacked weights, and ignoring it would
give a model that runs and computes garbage). The one exception is ``*.rotary_emb.inv_freq``,
which old checkpoints saved and transformers recomputes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitpress.formats.gptq import CHECKPOINT_FORMATS, gptq_to_quantized

CONFIG_NAME = "config.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
_IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------------------------
# Quantization config
# --------------------------------------------------------------------------------------------


def parse_quantization_config(qc: dict[str, Any], source: str = "quantization_config") -> dict:
    """Validate a GPTQ quantization config and return it normalised to
    ``{bits, group_size, desc_act, sym, checkpoint_format}``; ValueError names the field."""
    if not isinstance(qc, dict):
        raise ValueError(f"{source} must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method", "gptq")
    if not isinstance(method, str) or method.lower() != "gptq":
        raise ValueError(
            f"{source}.quant_method must be 'gptq', got {method!r}"
            + (" (AWQ checkpoints: see bitpress.formats.awq)" if method == "awq" else "")
        )
    bits = qc.get("bits")
    if bits != 4:
        raise ValueError(f"{source}.bits must be 4 (only INT4 GPTQ is supported), got {bits!r}")
    gs = qc.get("group_size", 128)
    if (
        not isinstance(gs, int)
        or isinstance(gs, bool)
        or not (gs == -1 or (gs > 0 and gs % 8 == 0))
    ):
        raise ValueError(f"{source}.group_size must be -1 or a positive multiple of 8, got {gs!r}")
    sym = qc.get("sym", True)
    desc_act = qc.get("desc_act", False)
    for field, value in (("sym", sym), ("desc_act", desc_act)):
        if not isinstance(value, bool):
            raise ValueError(f"{source}.{field} must be true or false, got {value!r}")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"{source}.checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {fmt!r}"
        )
    if qc.get("is_marlin_format"):
        raise ValueError(f"{source}.is_marlin_format: Marlin-repacked checkpoints are unsupported")
    if qc.get("dynamic"):
        raise ValueError(
            f"{source}.dynamic: per-module quantization overrides are unsupported, got "
            f"{qc['dynamic']!r}"
        )
    return dict(bits=4, group_size=gs, desc_act=desc_act, sym=sym, checkpoint_format=fmt)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_quantization_config(path: str | os.PathLike) -> dict:
    """The normalised quantization config of a checkpoint directory (config.json's
    ``quantization_config``, else quantize_config.json)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if cfg_file.exists():
        qc = _read_json(cfg_file).get("quantization_config")
        if qc is not None:
            return parse_quantization_config(qc, f"{CONFIG_NAME}: quantization_config")
    qfile = path / QUANTIZE_CONFIG_NAME
    if qfile.exists():
        return parse_quantization_config(_read_json(qfile), QUANTIZE_CONFIG_NAME)
    raise ValueError(
        f"{path}: no quantization config (neither {CONFIG_NAME} with 'quantization_config' nor "
        f"{QUANTIZE_CONFIG_NAME}); not a GPTQ checkpoint"
    )


# --------------------------------------------------------------------------------------------
# Safetensors files
# --------------------------------------------------------------------------------------------


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: 'weight_map' must be a non-empty object")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise FileNotFoundError(
                    f"{index}: shard {f!r} (holding e.g. "
                    f"{next(k for k, v in weight_map.items() if v == f)!r}) does not exist"
                )
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in path.glob("*.bin")) + sorted(
                p.name for p in path.glob("*.pt")
            )
            raise FileNotFoundError(
                f"{path}: no *.safetensors file"
                + (f" ({', '.join(others)} found: only safetensors is supported)" if others else "")
            )
        weight_map = None
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(path / f).items():
            if k in tensors:
                raise ValueError(f"{path}: tensor {k!r} appears in more than one shard ({f})")
            if weight_map is not None and weight_map.get(k) != f:
                raise ValueError(
                    f"{index}: tensor {k!r} found in {f!r} but the weight_map says "
                    f"{weight_map.get(k)!r}"
                )
            tensors[k] = v
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(
                f"{index}: tensors listed in weight_map are missing from their shards: "
                f"{missing[:5]}"
            )
    return tensors


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size must be bytes or like '5GB' / '500MiB', got {size!r}")
        unit = (m.group(2) or "B").upper()
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}.get(unit) or {
            "KIB": 2**10,
            "MIB": 2**20,
            "GIB": 2**30,
        }[unit]
        n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device (buffers stay real: RoPE tables and other
    non-persistent buffers are computed at construction and are not in checkpoints)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(
                p.to("meta"), **{**p.__dict__, "requires_grad": p.requires_grad}
            )

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _expect(tensors: dict, name: str, shape: list[int], what: str) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise ValueError(f"checkpoint: missing tensor {name!r} (expected shape {shape}, {what})")
    if list(t.shape) != shape:
        raise ValueError(
            f"checkpoint: tensor {name!r} has shape {list(t.shape)}, expected {shape} ({what})"
        )
    return t


def _int4_from_checkpoint(name: str, linear: nn.Linear, tensors: dict, qc: dict, dtype):
    from bitpress.nn.int4 import Int4Linear

    K, N = linear.in_features, linear.out_features
    gs = qc["group_size"]
    if K % 8:
        raise ValueError(f"{name}: in_features = {K} is not a multiple of 8; cannot be GPTQ-packed")
    G = 1 if gs == -1 else -(-K // gs)
    what = f"in_features K={K}, out_features N={N}, group_size={gs}"
    qweight = _expect(tensors, f"{name}.qweight", [K // 8, N], f"int32 [K/8, N], {what}")
    qzeros = _expect(tensors, f"{name}.qzeros", [G, -(-N // 8)], f"int32 [G, N/8], {what}")
    scales = _expect(tensors, f"{name}.scales", [G, N], f"float16 [G, N], {what}")
    g_idx = None
    if f"{name}.g_idx" in tensors or qc["desc_act"]:
        g_idx = _expect(tensors, f"{name}.g_idx", [K], f"int32 [K], {what}")
    bias = None
    if linear.bias is not None or f"{name}.bias" in tensors:
        bias = _expect(tensors, f"{name}.bias", [N], "[N]")
        if not bias.dtype.is_floating_point:
            raise ValueError(f"checkpoint: tensor {name!r}.bias must be floating, got {bias.dtype}")
    for t, suffix, ok in (
        (qweight, "qweight", (torch.int32,)),
        (qzeros, "qzeros", (torch.int32,)),
        (scales, "scales", (torch.float16, torch.bfloat16, torch.float32)),
        (g_idx, "g_idx", (torch.int32,)),
    ):
        if t is not None and t.dtype not in ok:
            got = str(t.dtype).removeprefix("torch.")
            want = " or ".join(str(d).removeprefix("torch.") for d in ok)
            raise ValueError(
                f"checkpoint: tensor '{name}.{suffix}' has dtype {got}, expected {want}"
            )
    try:
        qw = gptq_to_quantized(
            qweight,
            qzeros,
            scales,
            g_idx,
            group_size=gs,
            sym=qc["sym"],
            checkpoint_format=qc["checkpoint_format"],
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: {name}: {e}") from e
    return Int4Linear.from_quantized(qw, bias=bias, dtype=dtype)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _tie_word_embeddings(model) -> bool:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False))


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
):
    """Load a GPTQ-quantized transformers checkpoint directory.

    Parameters
    ----------
    path : str or PathLike
        Directory with config.json (+ quantization_config or quantize_config.json) and safetensors
        weights; see the module docstring for the layout.
    dtype : torch.dtype
        dtype of the non-quantized parameters and of the Int4Linear scales / bias (float16 is
        what GPTQ checkpoints store: loading it keeps every tensor bit for bit).
    device : torch.device or str
        Where the model is placed.

    Returns
    -------
    A ``transformers`` model (``AutoModelForCausalLM.from_config``) in eval mode, each Linear
    that has ``<name>.qweight`` in the checkpoint replaced by :class:`bitpress.nn.Int4Linear`;
    ``model.config.quantization_config`` holds the normalised quantization config.

    Raises
    ------
    ValueError
        Unsupported quantization config (names the field), missing / mis-shaped / wrong-dtype /
        unexpected tensor (names the tensor and the expected shape).
    FileNotFoundError
        No config.json, no safetensors file, or a shard named by the index is missing.
    """
    import transformers

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (a transformers config is required)")
    qc = read_quantization_config(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        # transformers would otherwise look for its own GPTQ backend (optimum) for this config.
        del config.quantization_config
    tensors = _load_tensors(path)

    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)

    quantized = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    modules = dict(model.named_modules())
    used: set[str] = set()
    for name in quantized:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"checkpoint: tensor '{name}.qweight' has no nn.Linear {name!r} in "
                f"{type(model).__name__}"
                + ("" if linear is None else f" (it is a {type(linear).__name__})")
            )
        _set_module(model, name, _int4_from_checkpoint(name, linear, tensors, qc, dtype))
        used.update(f"{name}.{s}" for s in _QUANT_SUFFIXES)

    # Everything else: plain parameters and persistent buffers, still on meta / default values.
    expected = {
        k: v for k, v in model.state_dict(keep_vars=True).items() if not _is_int4_buffer(model, k)
    }
    state = {}
    for k, ref in expected.items():
        t = tensors.get(k)
        if t is None:
            continue
        if list(t.shape) != list(ref.shape):
            raise ValueError(
                f"checkpoint: tensor {k!r} has shape {list(t.shape)}, expected {list(ref.shape)}"
            )
        if ref.dtype.is_floating_point != t.dtype.is_floating_point:
            raise ValueError(f"checkpoint: tensor {k!r} has dtype {t.dtype}, expected {ref.dtype}")
        state[k] = t.to(dtype if t.dtype.is_floating_point else ref.dtype)
        used.add(k)
    unexpected = sorted(k for k in tensors if k not in used and not _IGNORED_TENSORS.search(k))
    if unexpected:
        raise ValueError(
            f"checkpoint: {len(unexpected)} tensor(s) the model has no place for: {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (wrong config.json, or a packing bitpress "
            f"does not read)"
        )
    model.load_state_dict(state, strict=False, assign=True)

    if _tie_word_embeddings(model):
        # transformers' own rule: tie a tensor the checkpoint lacks to its present partner;
        # when both are present and differ, keep both (and it warns).
        still_meta = {
            k for k, v in model.state_dict(keep_vars=True).items() if v.device.type == "meta"
        }
        model.tie_weights(missing_keys=still_meta)
    for k, v in model.state_dict(keep_vars=True).items():
        if v.device.type == "meta":
            raise ValueError(f"checkpoint: missing tensor {k!r} (expected shape {list(v.shape)})")
    model.config.quantization_config = {"quant_method": "gptq", **qc}
    model.eval()
    return model.to(device)


def _is_int4_buffer(model: nn.Module, key: str) -> bool:
    from bitpress.nn.int4 import Int4Linear

    parent, _, _ = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(parent), Int4Linear)
    except AttributeError:
        return False


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    checkpoint_format: str = "gptq",
    max_shard_size: int | str | None = None,
) -> None:
    """Write ``model`` (a transformers model with Int4Linear layers) as a GPTQ checkpoint.

    Writes config.json (with ``quantization_config``), quantize_config.json and
    model.safetensors, or, when the tensors exceed ``max_shard_size`` (bytes, or '5GB',
    '500MiB', ...), shards ``model-0000i-of-0000n.safetensors`` with
    model.safetensors.index.json. Stale files of that naming in ``path`` are removed first.
    Int4Linear scales are written as float16 (what GPTQ readers expect) when that conversion is
    exact, which it is for bitpress quantizers' scales (rounded to float16 at quantization);
    otherwise in their own dtype, which bitpress reads back but other readers may not. Other
    tensors keep their dtype. Tied weights are written once (re-tied at load).

    ``checkpoint_format``: "gptq" (v1, zeros stored minus one: what AutoGPTQ and most loaders
    read) or "gptq_v2".
    """
    from safetensors.torch import save_file

    from bitpress.nn.int4 import Int4Linear

    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}"
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("model must be a transformers model (it has no .config to save)")

    tensors: dict[str, torch.Tensor] = {}
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    if not int4:
        raise ValueError("model has no Int4Linear layer: nothing quantized to save")
    settings = {(m.group_size, m.sym) for m in int4.values()}
    if len(settings) > 1:
        raise ValueError(
            f"all Int4Linear layers must share group_size and sym (one quantization_config), got "
            f"(group_size, sym) = {sorted(settings)}"
        )
    (group_size, sym), desc_act = settings.pop(), False
    for name, m in int4.items():
        for k, v in m.to_gptq(checkpoint_format).items():
            if k == "scales" and v.dtype != torch.float16:
                # Readers expect float16 scales; write them so whenever that is exact.
                half = v.to(torch.float16)
                v = half if torch.equal(half.to(v.dtype), v) else v
            tensors[f"{name}.{k}"] = v
        g = m.g_idx
        desc_act |= bool((g[1:] < g[:-1]).any()) if g.numel() > 1 else False

    seen: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        if _is_int4_buffer(model, k):
            continue
        # Tied parameters share storage: write the first name only (safetensors refuses shared
        # tensors), e.g. embed_tokens.weight for a tied lm_head.weight.
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
        if v.numel() and key in seen:
            continue
        seen[key] = k
        tensors[k] = v
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    qc = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": checkpoint_format,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [
        path / SAFE_WEIGHTS_NAME,
        path / SAFE_WEIGHTS_INDEX_NAME,
        *path.glob("model-*-of-*.safetensors"),
    ]:
        if stale.exists():
            stale.unlink()

    cfg = config.to_dict()
    cfg["quantization_config"] = qc
    with open(path / CONFIG_NAME, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, default=str)
    with open(path / QUANTIZE_CONFIG_NAME, "w") as f:
        json.dump(qc, f, indent=2)

    meta = {"format": "pt"}
    limit = None if max_shard_size is None else _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / SAFE_WEIGHTS_NAME, metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    with open(path / SAFE_WEIGHTS_INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
