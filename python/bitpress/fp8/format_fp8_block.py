"""Block-scaled FP8 checkpoints (``quant_method: "fp8"``: DeepSeek-V3, Qwen3-FP8, transformers'
FineGrainedFP8Config) <-> :class:`~bitpress.fp8.modules.Fp8Linear` with granularity "block" and
dynamic activations, registered with :mod:`bitpress.checkpoint`.

The quantization_config: ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
"dynamic", "weight_block_size": [128, 128]}``, optionally ``modules_to_not_convert`` (names
left dense). Only E4M3, dynamic activations and 128 x 128 blocks are read.

Tensors of a quantized Linear with in_features K, out_features N: ``weight`` float8_e4m3fn
``[N, K]``, ``weight_scale_inv`` float32 ``[ceil(N/128), ceil(K/128)]`` (despite its name the
factor that multiplies: ``W[n, k] = weight[n, k] * weight_scale_inv[n // 128, k // 128]``),
optional ``bias`` ``[N]``. A Linear is quantized when the checkpoint has its
``weight_scale_inv`` or stores its ``weight`` in float8 (which then needs the scale: an error
names it). Activations are quantized per token and 128 columns ([1, 128] blocks) at run time.

``save_pretrained(model, path, quant_method="fp8")`` writes models whose quantized layers are
all block-granular, dynamic Fp8Linear (the default writer of Fp8Linear is compressed-tensors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bitpress._core.registry import (
    CheckpointFormat,
    CheckpointHostile,
    register_checkpoint_format,
)
from bitpress.fp8.modules import BLOCK, E4M3, Fp8Linear

SUFFIXES = ("weight_scale_inv", "weight", "bias")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def parse_fp8_config(qc: dict[str, Any], source: str = "quantization_config") -> dict:
    """Validate a ``quant_method: "fp8"`` config; ValueError names the field."""
    block = qc.get("weight_block_size")
    if block != [BLOCK, BLOCK]:
        raise ValueError(
            f"{source}.weight_block_size must be [128, 128] (per-tensor FP8 checkpoints: use "
            f"compressed-tensors), got {block!r}"
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"{source}.fmt must be 'e4m3', got {fmt!r}")
    act = qc.get("activation_scheme", "dynamic")
    if act != "dynamic":
        raise ValueError(f"{source}.activation_scheme must be 'dynamic', got {act!r}")
    skip = qc.get("modules_to_not_convert")
    if skip is not None and (
        not isinstance(skip, list) or not all(isinstance(s, str) for s in skip)
    ):
        raise ValueError(f"{source}.modules_to_not_convert must be a list of names, got {skip!r}")
    return dict(
        fmt="e4m3",
        activation_scheme="dynamic",
        weight_block_size=[BLOCK, BLOCK],
        modules_to_not_convert=skip,
    )


def _is_fp8(tensors: Mapping, key: str) -> bool:
    return key in tensors and tensors[key].dtype == E4M3


def select_fp8(model: nn.Module, tensors: Mapping, qc: dict) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and (f"{name}.weight_scale_inv" in tensors or _is_fp8(tensors, f"{name}.weight"))
    ]


def fp8_module_names(tensors: Mapping) -> list[str]:
    return sorted(
        k[: -len(".weight_scale_inv")] for k in tensors if k.endswith(".weight_scale_inv")
    )


def _tensor(tensors: Mapping, key: str, shape: list[int], dtypes, what: str) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise ValueError(f"checkpoint: missing tensor {key!r} (expected {what} {shape})")
    if t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        got = str(t.dtype).removeprefix("torch.")
        raise ValueError(f"checkpoint: tensor {key!r} has dtype {got}, expected {want}")
    if list(t.shape) != shape:
        raise ValueError(
            f"checkpoint: tensor {key!r} has shape {list(t.shape)}, expected {shape} ({what})"
        )
    return t


def load_fp8_module(
    name: str, linear: nn.Linear, tensors: Mapping, qc: dict, dtype, device=None
) -> Fp8Linear:
    N, K = linear.out_features, linear.in_features
    skip = qc.get("modules_to_not_convert") or []
    if any(name == s or name.startswith(f"{s}.") for s in skip):
        raise ValueError(
            f"checkpoint: tensor '{name}.weight_scale_inv' belongs to a layer listed in "
            "quantization_config.modules_to_not_convert"
        )
    what = f"K={K}, N={N}"
    weight = _tensor(tensors, f"{name}.weight", [N, K], (E4M3,), f"float8_e4m3fn, {what}")
    scale = _tensor(
        tensors,
        f"{name}.weight_scale_inv",
        [-(-N // BLOCK), -(-K // BLOCK)],
        _FLOATS,
        f"[ceil(N/128), ceil(K/128)], {what}",
    )
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError(
            f"checkpoint: tensor '{name}.weight_scale_inv' holds a scale that is not positive "
            "finite"
        )
    bias = None
    if linear.bias is not None or f"{name}.bias" in tensors:
        bias = _tensor(tensors, f"{name}.bias", [N], _FLOATS, "[N]")
    try:
        return Fp8Linear.from_tensors(
            weight,
            scale,
            None,
            bias,
            granularity="block",
            activations="dynamic",
            dtype=dtype,
            device=device,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: {name} (fp8): {e}") from e


def _accepts(m: nn.Module) -> bool:
    return isinstance(m, Fp8Linear) and m.granularity == "block" and m.activations == "dynamic"


def save_fp8(modules: dict[str, Fp8Linear]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        if not _accepts(m):
            raise ValueError(
                f"quant_method 'fp8' writes block-granular Fp8Linear with dynamic activations; "
                f"{name!r} is {m.extra_repr()}"
            )
        tensors[f"{name}.weight"] = m.weight.detach().cpu()
        tensors[f"{name}.weight_scale_inv"] = m.weight_scale.detach().cpu()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().cpu()
    qc = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    }
    return tensors, qc


def _hostile() -> CheckpointHostile:
    def quantize(model):
        for name, m in list(model.named_modules()):
            if type(m) is nn.Linear and not name.endswith("lm_head"):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, Fp8Linear.from_linear(m, "block"))
        return model

    return CheckpointHostile(
        quantize=quantize,
        tensors={"weight": ((E4M3,), 2), "weight_scale_inv": (_FLOATS, 2)},
        required=("weight", "weight_scale_inv"),
        save_options=({"quant_method": "fp8"},),
    )


FP8 = register_checkpoint_format(
    CheckpointFormat(
        name="fp8",
        module_type=Fp8Linear,
        suffixes=SUFFIXES,
        parse=parse_fp8_config,
        module_names=fp8_module_names,
        load=load_fp8_module,
        save=save_fp8,
        hostile=_hostile,
        select=select_fp8,
        accepts=_accepts,
        save_priority=None,
    )
)
