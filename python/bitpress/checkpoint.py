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
  is used). Layout in :mod:`bitpress.int4.format_gptq`. Every other tensor is a plain parameter or
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
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitpress._core.registry import checkpoint_formats
from bitpress.sparse24.format_bitmask import dense_24_layers, sparsify_dense_24

CONFIG_NAME = "config.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------------------------
# Quantization config
# --------------------------------------------------------------------------------------------


def parse_quantization_config(qc: dict[str, Any], source: str = "quantization_config") -> dict:
    """Validate a quantization config and return it normalised by its format, with
    ``quant_method`` (GPTQ: ``{bits, group_size, desc_act, sym, checkpoint_format}``); ValueError
    names the field. A config without ``quant_method`` is read as GPTQ (AutoGPTQ's
    quantize_config.json has none)."""
    if not isinstance(qc, dict):
        raise ValueError(f"{source} must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method", "gptq")
    fmt = checkpoint_formats().get(method.lower()) if isinstance(method, str) else None
    if fmt is None:
        known = " or ".join(repr(m) for m in checkpoint_formats())
        raise ValueError(
            f"{source}.quant_method must be {known}, got {method!r}"
            + (" (AWQ checkpoints: see bitpress.int4.format_awq)" if method == "awq" else "")
        )
    return {**fmt.parse(qc, source), "quant_method": fmt.name}


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got a {type(data).__name__}")
    return data


def _has_quantization_config(path: Path) -> bool:
    cfg = path / CONFIG_NAME
    has = cfg.exists() and _read_json(cfg).get("quantization_config") is not None
    return has or (path / QUANTIZE_CONFIG_NAME).exists()


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


def _checkpoint_files(path: Path) -> tuple[list[str], dict | None, Path]:
    """(the safetensors files of the checkpoint, the index's weight_map or None, the index
    path), every shard name confined to the directory."""
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: 'weight_map' must be a non-empty object")
        for k, f in weight_map.items():
            if not isinstance(f, str):
                raise ValueError(
                    f"{index}: weight_map[{k!r}] must be a file name (a string), got {f!r}"
                )
            # A shard is a file of this directory: "../x" or "/abs/x" would read files the
            # checkpoint does not own.
            target = (path / f).resolve()
            if Path(f).is_absolute() or target.parent != path.resolve():
                raise ValueError(
                    f"{index}: shard {f!r} (holding {k!r}) is not a file of the checkpoint "
                    f"directory {path}"
                )
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise FileNotFoundError(
                    f"{index}: shard {f!r} (holding e.g. "
                    f"{next(k for k, v in weight_map.items() if v == f)!r}) does not exist"
                )
        return files, weight_map, index
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt")
        )
        raise FileNotFoundError(
            f"{path}: no *.safetensors file"
            + (f" ({', '.join(others)} found: only safetensors is supported)" if others else "")
        )
    return files, None, index


class _SafetensorsFiles(Mapping):
    """The tensors of a checkpoint's safetensors files by name, read on access.

    Opening reads the headers only (every file is checked: a corrupt or truncated one is named
    here); a tensor is a view of the memory-mapped file (safetensors' ``safe_open``): file pages,
    which the kernel may drop, not anonymous memory. Whoever keeps a tensor past loading must
    copy it. Use as a context manager: the handles are closed at exit.
    """

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        files, weight_map, index = _checkpoint_files(path)
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        try:
            for f in files:
                try:
                    handle = safe_open(path / f, framework="pt")
                    keys = list(handle.keys())
                except Exception as e:  # safetensors raises its own error types
                    raise ValueError(f"{path / f}: not a readable safetensors file ({e})") from e
                self._handles[f] = handle
                for k in keys:
                    if k in self._file_of:
                        raise ValueError(
                            f"{path}: tensor {k!r} appears in more than one shard ({f})"
                        )
                    if weight_map is not None and weight_map.get(k) != f:
                        raise ValueError(
                            f"{index}: tensor {k!r} found in {f!r} but the weight_map says "
                            f"{weight_map.get(k)!r}"
                        )
                    self._file_of[k] = f
            if weight_map is not None:
                missing = sorted(set(weight_map) - set(self._file_of))
                if missing:
                    raise ValueError(
                        f"{index}: tensors listed in weight_map are missing from their shards: "
                        f"{missing[:5]}"
                    )
        except BaseException:
            self.close()
            raise

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self._file_of[key]
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:
            raise ValueError(
                f"{self.path / f}: not a readable safetensors file (tensor {key!r}: {e})"
            ) from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, key: object) -> bool:
        return key in self._file_of

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> _SafetensorsFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    progress: bool | None = None,
    sparse24: bool = False,
):
    """Load a quantized or sparse transformers checkpoint directory: GPTQ (v1 / v2),
    compressed-tensors (float-quantized FP8, pack-quantized INT4, sparse-24-bitmask, marlin-24),
    block FP8 (``quant_method: "fp8"``), or a dense checkpoint whose weights carry a 2:4 pattern
    (its ``sparsity_config``, or ``sparse24=True``).

    The model is built on the meta device and the safetensors files are memory-mapped: each
    quantized layer is read and packed into the kernel layout of ``device`` in turn, and the
    plain parameters are copied once, in ``dtype``, onto ``device``. Memory grows by about what
    the loaded model keeps (~1x the checkpoint on the CPU: the int4 words as stored, float32
    scales), never by a dense copy of the model; the first forward needs no repacking.

    Parameters
    ----------
    path : str or PathLike
        Directory with config.json (+ quantization_config or quantize_config.json) and safetensors
        weights; see the module docstring for the layout.
    dtype : torch.dtype
        dtype of the non-quantized parameters and of the Int4Linear scales / bias (float16 is
        what GPTQ checkpoints store: loading it keeps every tensor bit for bit).
    device : torch.device or str
        Where the model is placed (each tensor is loaded there directly).
    progress : bool, optional
        Show a progress bar (tqdm, on stderr) over the quantized layers. ``None`` (default): when
        stderr is a terminal and the checkpoint has at least 64 quantized layers.
    sparse24 : bool
        Turn dense Linear layers with the 2:4 pattern into ``Sparse24Linear`` (after checking the
        pattern: ValueError naming ``<name>.weight``): those the config's ``sparsity_config``
        (format "dense", structure "2:4") targets, else every Linear but lm_head; the checkpoint
        may then have no quantization config at all. A ``sparsity_config`` of that kind is
        applied without this flag too (:mod:`bitpress.sparse24.format_bitmask`).

    Returns
    -------
    A ``transformers`` model (``AutoModelForCausalLM.from_config``) in eval mode, each Linear
    that has ``<name>.qweight`` in the checkpoint replaced by :class:`bitpress.nn.Int4Linear`;
    ``model.config.quantization_config`` holds the normalised quantization config.

    Raises
    ------
    ValueError
        Unsupported quantization config (names the field), missing / mis-shaped / wrong-dtype /
        unexpected tensor (names the tensor and the expected shape), unreadable safetensors file
        (names the file).
    FileNotFoundError
        No config.json, no safetensors file, or a shard named by the index is missing.
    """
    import transformers

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (a transformers config is required)")
    qc = None if sparse24 and not _has_quantization_config(path) else read_quantization_config(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers / huggingface_hub raise their own validation errors
        raise ValueError(f"{path / CONFIG_NAME}: not a valid transformers config ({e})") from e
    if hasattr(config, "quantization_config"):
        # transformers would otherwise look for its own GPTQ backend (optimum) for this config.
        del config.quantization_config
    device = torch.device(device)
    with _SafetensorsFiles(path) as tensors:
        model = _load(model_config=config, tensors=tensors, qc=qc, dtype=dtype, device=device,
                      progress=progress)  # fmt: skip
    sparsify_dense_24(model, dense_24_layers(model, qc, sparse24))
    model.config.quantization_config = qc
    model.eval()
    return model.to(device)


def _load(model_config, tensors: Mapping, qc: dict, dtype, device, progress):
    import transformers

    try:
        with _parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    except Exception as e:  # a field with an impossible value (negative sizes, ...)
        raise ValueError(
            f"{CONFIG_NAME}: transformers cannot build a model from this config ({e}); check its "
            "fields (hidden_size, vocab_size, num_hidden_layers, ...)"
        ) from e

    fmt = checkpoint_formats()[qc["quant_method"]] if qc is not None else None
    modules = dict(model.named_modules())
    used: set[str] = set()
    if fmt is None:  # a dense checkpoint (from_pretrained(sparse24=True))
        names = []
    else:
        names = fmt.select(model, tensors, qc) if fmt.select else fmt.module_names(tensors)
    for name in _progress(names, progress):
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"checkpoint: tensor '{name}.{fmt.suffixes[0]}' has no nn.Linear {name!r} in "
                f"{type(model).__name__}"
                + ("" if linear is None else f" (it is a {type(linear).__name__})")
            )
        _set_module(model, name, fmt.load(name, linear, tensors, qc, dtype, device=device))
        used.update(f"{name}.{s}" for s in fmt.suffixes)

    # Everything else: plain parameters and persistent buffers, still on meta / default values.
    state = {}
    for k, ref in _plain_state(model).items():
        if k not in tensors:
            continue
        t = tensors[k]
        if list(t.shape) != list(ref.shape):
            raise ValueError(
                f"checkpoint: tensor {k!r} has shape {list(t.shape)}, expected {list(ref.shape)}"
            )
        if ref.dtype.is_floating_point != t.dtype.is_floating_point:
            raise ValueError(f"checkpoint: tensor {k!r} has dtype {t.dtype}, expected {ref.dtype}")
        # A copy even in the file's dtype: ``t`` is a view of the memory-mapped file.
        target = dtype if t.dtype.is_floating_point else ref.dtype
        state[k] = t.to(device=device, dtype=target, copy=True)
        used.add(k)
    unexpected = sorted(k for k in tensors if k not in used and not _IGNORED_TENSORS.search(k))
    if unexpected:
        raise ValueError(
            f"checkpoint: {len(unexpected)} tensor(s) the model has no place for: {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (wrong config.json, or a packing bitpress "
            f"does not read)"
        )
    model.load_state_dict(state, strict=False, assign=True)
    del state

    if _tie_word_embeddings(model):
        # transformers' own rule: tie a tensor the checkpoint lacks to its present partner;
        # when both are present and differ, keep both (and it warns).
        still_meta = {k for k, v in _plain_state(model).items() if v.device.type == "meta"}
        model.tie_weights(missing_keys=still_meta)
    for k, v in _plain_state(model).items():
        if v.device.type == "meta":
            raise ValueError(f"checkpoint: missing tensor {k!r} (expected shape {list(v.shape)})")
    return model


# Quantized layers from which a progress bar is shown by default (on a terminal): ~9 decoder
# layers of a Llama, i.e. any model whose load takes more than a moment.
_PROGRESS_MIN_LAYERS = 64


def _progress(names: list[str], progress: bool | None):
    if progress is None:
        progress = len(names) >= _PROGRESS_MIN_LAYERS and sys.stderr.isatty()
    if not progress:
        return names
    from tqdm.auto import tqdm

    return tqdm(names, desc="bitpress: loading", unit="layer", dynamic_ncols=True)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)`` without the modules of a checkpoint format (which
    read and write their tensors themselves; their state_dict converts the packed weight back to
    the checkpoint layout, which loading must not pay for)."""
    quantized = tuple(f.module_type for f in checkpoint_formats().values())
    out: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, quantized):
            return
        module._save_to_state_dict(out, prefix, keep_vars=True)
        for name, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(model, "")
    return out


def _in_quantized_module(model: nn.Module, key: str) -> bool:
    """Whether state_dict entry ``key`` belongs to a module of a checkpoint format (which
    writes and reads it itself)."""
    parent, _, _ = key.rpartition(".")
    try:
        module = model.get_submodule(parent)
    except AttributeError:
        return False
    return any(isinstance(module, f.module_type) for f in checkpoint_formats().values())


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _type_names(t) -> list[str]:
    return [x.__name__ for x in (t if isinstance(t, tuple) else (t,))]


def _save_quantized(model: nn.Module, quant_method: str | None, options: dict):
    """(tensors, quantization_config) of the quantized layers of ``model``: in the format
    ``quant_method``, or in the first format (registration order) that accepts every layer and
    whose writer takes them (GPTQ refuses layers of different group sizes, which
    compressed-tensors writes as separate config groups)."""
    first_error = None
    for fmt in _save_formats(model, quant_method):
        quantized = {n: m for n, m in model.named_modules() if isinstance(m, fmt.module_type)}
        try:
            return fmt.save(quantized, **options)
        except (TypeError, ValueError) as e:
            if quant_method is not None:
                raise
            first_error = first_error or e
    raise first_error


def _save_formats(model: nn.Module, quant_method: str | None) -> list:
    """The checkpoint formats that may write ``model``, in order (see _save_quantized)."""
    formats = checkpoint_formats()
    every = tuple(f.module_type for f in formats.values())
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, every)}
    if not quantized:
        kinds = ", ".join(dict.fromkeys(n for t in every for n in _type_names(t)))
        raise ValueError(f"model has no quantized layer ({kinds}): nothing quantized to save")

    def refused(f) -> list[str]:
        return [
            n
            for n, m in quantized.items()
            if not isinstance(m, f.module_type) or (f.accepts is not None and not f.accepts(m))
        ]

    if quant_method is not None:
        fmt = formats.get(quant_method)
        if fmt is None:
            raise ValueError(f"quant_method must be one of {sorted(formats)}, got {quant_method!r}")
        bad = refused(fmt)
        if bad:
            m = quantized[bad[0]]
            raise ValueError(
                f"quant_method {quant_method!r} cannot write layer {bad[0]!r} "
                f"({type(m).__name__}: {m.extra_repr()})"
                + (f" nor {len(bad) - 1} other(s)" if len(bad) > 1 else "")
            )
        return [fmt]
    candidates = [f for f in formats.values() if f.save_priority is not None and not refused(f)]
    candidates.sort(key=lambda f: f.save_priority)  # stable: registration order breaks ties
    if candidates:
        return candidates
    kinds = sorted({type(m).__name__ for m in quantized.values()})
    raise ValueError(
        f"no checkpoint format writes every quantized layer of this model ({', '.join(kinds)}); "
        "pass quant_method= to choose one"
    )


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    quant_method: str | None = None,
    **options,
) -> None:
    """Write ``model`` (a transformers model with bitpress's quantized or sparse layers) as a
    checkpoint of one registered format (GPTQ by default for INT4 models, see ``quant_method``).

    Writes config.json (with ``quantization_config``), quantize_config.json and
    model.safetensors, or, when the tensors exceed ``max_shard_size`` (bytes, or '5GB',
    '500MiB', ...), shards ``model-0000i-of-0000n.safetensors`` with
    model.safetensors.index.json. Stale files of that naming in ``path`` are removed first.
    Int4Linear scales are written as float16 (what GPTQ readers expect) when that conversion is
    exact, which it is for bitpress quantizers' scales (rounded to float16 at quantization);
    otherwise in their own dtype, which bitpress reads back but other readers may not. Other
    tensors keep their dtype. Tied weights are written once (re-tied at load).

    ``quant_method`` chooses the format ("gptq", "compressed-tensors", "fp8"); by default the first
    registered format that can write every quantized layer: "gptq" for Int4Linear models that
    share one group size and symmetry, "compressed-tensors" for Fp8Linear models and for models
    mixing layer kinds or settings.

    ``options`` go to the format's writer; GPTQ (Int4Linear layers): ``checkpoint_format`` "gptq"
    (v1, zeros stored minus one: what AutoGPTQ and most loaders read) or "gptq_v2"; by default
    "gptq" for symmetric models and "gptq_v2" for asymmetric ones (see
    :func:`bitpress.int4.checkpoint.save_gptq`).
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("model must be a transformers model (it has no .config to save)")
    tensors, qc = _save_quantized(model, quant_method, options)

    seen: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        if _in_quantized_module(model, k):
            continue
        # Tied parameters share storage: write the first name only (safetensors refuses shared
        # tensors), e.g. embed_tokens.weight for a tied lm_head.weight.
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
        if v.numel() and key in seen:
            continue
        seen[key] = k
        tensors[k] = v
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

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
