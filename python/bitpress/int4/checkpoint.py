"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel / optimum) of INT4 layers, registered for
``quant_method = "gptq"`` with :mod:`bitpress.checkpoint`, which reads and writes the files.

For a quantized Linear ``<name>``: ``<name>.qweight`` int32 [K/8, N], ``<name>.qzeros`` int32
[G, N/8], ``<name>.scales`` [G, N], ``<name>.g_idx`` int32 [K] (required with desc_act),
optional ``<name>.bias`` [N] (older AutoGPTQ versions write one even for bias-free layers; it is
used). Layout in :mod:`bitpress.int4.format_gptq`. The quantization config: ``{"quant_method":
"gptq", "bits": 4, "group_size": ..., "desc_act": ..., "sym": ..., "checkpoint_format": "gptq" |
"gptq_v2"}``; missing ``sym`` means True, missing ``checkpoint_format`` means "gptq" (v1 zeros,
stored minus one), missing ``desc_act`` means False. GPTQModel's ``format`` key is read as
``checkpoint_format``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bitpress._core.registry import CheckpointFormat, register_checkpoint_format
from bitpress.int4.format_gptq import CHECKPOINT_FORMATS
from bitpress.int4.modules import Int4Linear
from bitpress.int4.quantized import check_group_size

TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


def parse_gptq_config(qc: dict[str, Any], source: str = "quantization_config") -> dict:
    """Validate a GPTQ quantization config (a dict) and return it normalised to
    ``{bits, group_size, desc_act, sym, checkpoint_format}``; ValueError names the field."""
    bits = qc.get("bits")
    if bits != 4:
        raise ValueError(f"{source}.bits must be 4 (only INT4 GPTQ is supported), got {bits!r}")
    gs = qc.get("group_size", 128)
    if not isinstance(gs, int) or isinstance(gs, bool):
        raise ValueError(f"{source}.group_size must be -1 or a positive multiple of 8, got {gs!r}")
    try:
        check_group_size(8, gs)
    except ValueError as e:
        raise ValueError(f"{source}.{e}") from None
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
    pack = qc.get("pack_dtype", "int32")
    if pack not in ("int32", "torch.int32"):
        # GPTQModel can pack into int8 / int16 / int64 words: other tensor shapes and dtypes.
        raise ValueError(f"{source}.pack_dtype must be 'int32', got {pack!r}")
    if qc.get("is_marlin_format"):
        raise ValueError(f"{source}.is_marlin_format: Marlin-repacked checkpoints are unsupported")
    if qc.get("dynamic"):
        raise ValueError(
            f"{source}.dynamic: per-module quantization overrides are unsupported, got "
            f"{qc['dynamic']!r}"
        )
    return dict(bits=4, group_size=gs, desc_act=desc_act, sym=sym, checkpoint_format=fmt)


def _expect(tensors: Mapping, name: str, shape: list[int], what: str) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise ValueError(f"checkpoint: missing tensor {name!r} (expected shape {shape}, {what})")
    if list(t.shape) != shape:
        raise ValueError(
            f"checkpoint: tensor {name!r} has shape {list(t.shape)}, expected {shape} ({what})"
        )
    return t


def load_gptq_module(
    name: str, linear: nn.Linear, tensors: Mapping, qc: dict, dtype, device=None
) -> Int4Linear:
    """The Int4Linear that replaces ``linear``, from the checkpoint tensors ``<name>.*``, packed
    into the kernel layout of ``device`` (default: the CPU). ``tensors`` may be views of
    memory-mapped files: the module keeps none of them."""
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
        return Int4Linear.from_gptq(
            qweight,
            qzeros,
            scales,
            g_idx,
            bias,
            group_size=gs,
            sym=qc["sym"],
            checkpoint_format=qc["checkpoint_format"],
            dtype=dtype,
            device=device or "cpu",
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: {name}: {e}") from e


def gptq_module_names(tensors: Mapping) -> list[str]:
    """The quantized modules of a checkpoint: those with a ``<name>.qweight``."""
    return sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))


def _producer() -> str:
    try:
        return f"bitpress:{importlib.metadata.version('bitpress')}"
    except importlib.metadata.PackageNotFoundError:
        return "bitpress:0"


def save_gptq(
    modules: dict[str, Int4Linear], checkpoint_format: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, quantization_config) of ``modules`` in the GPTQ format.

    ``checkpoint_format``: "gptq" (v1, zeros stored minus one) or "gptq_v2" (real zeros). The
    default is "gptq" for symmetric models (every GPTQ reader takes them) and "gptq_v2" for
    asymmetric ones: GPTQModel (and transformers, which loads GPTQ through it) refuses an
    asymmetric v1 checkpoint unless its ``meta.quantizer`` names GPTQModel >= 0.9.0 as the
    producer, because older producers wrote asymmetric v1 zeros that cannot be trusted; a v2
    checkpoint says what its zeros are. ``meta.quantizer`` names bitpress (GPTQModel's
    ``"name:version"`` form) and never claims another producer, so an explicitly requested
    asymmetric v1 checkpoint loads in bitpress and AutoGPTQ-style readers, not in GPTQModel.
    """
    if checkpoint_format is None:
        checkpoint_format = "gptq" if all(m.sym for m in modules.values()) else "gptq_v2"
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}"
        )
    settings = {(m.group_size, m.sym) for m in modules.values()}
    if len(settings) > 1:
        raise ValueError(
            f"all Int4Linear layers must share group_size and sym (one quantization_config), got "
            f"(group_size, sym) = {sorted(settings)}"
        )
    (group_size, sym), desc_act = settings.pop(), False
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        gptq = m.to_gptq(checkpoint_format)
        for k, v in gptq.items():
            if k == "scales" and v.dtype != torch.float16:
                # Readers expect float16 scales; write them so whenever that is exact.
                half = v.to(torch.float16)
                v = half if torch.equal(half.to(v.dtype), v) else v
            tensors[f"{name}.{k}"] = v
        g = gptq["g_idx"]
        desc_act |= bool((g[1:] < g[:-1]).any()) if g.numel() > 1 else False
    qc = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "static_groups": False,
        "true_sequential": False,  # one pass per decoder layer (bitpress.int4.gptq)
        "damp_percent": 0.01,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [_producer()]},
    }
    return tensors, qc


GPTQ = register_checkpoint_format(
    CheckpointFormat(
        name="gptq",
        module_type=Int4Linear,
        suffixes=TENSOR_SUFFIXES,
        parse=parse_gptq_config,
        module_names=gptq_module_names,
        load=load_gptq_module,
        save=save_gptq,
    )
)
