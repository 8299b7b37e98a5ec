"""compressed-tensors "float-quantized" FP8 layers (llm-compressor's FP8, FP8_DYNAMIC,
FP8_BLOCK) <-> :class:`~bitpress.fp8.modules.Fp8Linear`, registered as a compressed-tensors
scheme (:mod:`bitpress.compressed_tensors` reads the config and dispatches the layer here).
"naive-quantized", what llm-compressor names an FP8 weight-only layer, is read the same way.

Tensors of one Linear with in_features K, out_features N (compressed-tensors'
``FloatQuantizationCompressor`` stores the quantized weight under the weight's own name):

* ``weight`` float8_e4m3fn ``[N, K]``;
* ``weight_scale`` (float32, or bfloat16 / float16 as some writers store it; read as float32)
  ``[1]`` (strategy "tensor"; a 0-D scalar is read too), ``[N, 1]`` ("channel") or
  ``[ceil(N/128), ceil(K/128)]`` ("block", block_structure [128, 128]);
* ``input_scale`` ``[1]``: static activations only (input_activations strategy "tensor",
  dynamic false);
* ``bias`` ``[N]``, optional.

``W[n, k] = weight[n, k] * weight_scale[...]`` (compressed-tensors' ``dequantize``: the code
times the scale of its tensor / row / block). Activations (input_activations): null (weight
only), {type float, 8 bits, strategy "token", dynamic true} (FP8_DYNAMIC), {strategy "group",
group_size 128, dynamic true} with block weights (FP8_BLOCK: [1, 128] activation blocks), or
{strategy "tensor", dynamic false} with ``input_scale`` (static FP8).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bitpress._core.registry import (
    CompressedTensorsHostile,
    CompressedTensorsScheme,
    register_compressed_tensors_scheme,
)
from bitpress.fp8.modules import BLOCK, E4M3, Fp8Linear, scale_shape

FORMAT = "float-quantized"
SUFFIXES = ("weight", "weight_scale", "input_scale", "bias")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor(tensors: Mapping, key: str, shapes, dtypes, what: str) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise ValueError(f"checkpoint: missing tensor {key!r} (expected {what})")
    if t.dtype not in dtypes:
        want = " or ".join(_name(d) for d in dtypes)
        raise ValueError(f"checkpoint: tensor {key!r} has dtype {_name(t.dtype)}, expected {want}")
    if list(t.shape) not in shapes:
        raise ValueError(
            f"checkpoint: tensor {key!r} has shape {list(t.shape)}, expected "
            f"{' or '.join(str(s) for s in shapes)} ({what})"
        )
    return t


def _float8(args: dict | None) -> bool:
    return args is not None and args["type"] == "float" and args["num_bits"] == 8


def layer_settings(name: str, cfg: dict) -> tuple[str, str | None]:
    """(granularity, activations) of an Fp8Linear for the layer's quantization args; ValueError
    names the config field."""
    where = f"quantization_config.config_groups.{cfg['group']}"
    w, a = cfg["weights"], cfg["input_activations"]
    if not _float8(w):
        raise ValueError(
            f"{where}.weights: {cfg['format']} layers are read as FP8 E4M3 (type 'float', "
            f"num_bits 8), got {w and {k: w[k] for k in ('type', 'num_bits')}} (layer {name!r})"
        )
    if not w["symmetric"] or w["dynamic"] is not False:
        raise ValueError(f"{where}.weights: FP8 weights must be symmetric and static, got {w}")
    granularity = w["strategy"]
    if granularity not in ("tensor", "channel", "block"):
        raise ValueError(
            f"{where}.weights.strategy must be 'tensor', 'channel' or 'block' for FP8, got "
            f"{granularity!r}"
        )
    if granularity == "block" and w["block_structure"] != [BLOCK, BLOCK]:
        raise ValueError(
            f"{where}.weights.block_structure must be [128, 128], got {w['block_structure']!r}"
        )
    if cfg["output_activations"] is not None:
        raise ValueError(f"{where}.output_activations: output quantization is unsupported")
    if cfg["sparsity_config"] is not None:
        raise ValueError(
            f"quantization_config.sparsity_config: {cfg['sparsity_config'].get('format')!r} "
            f"sparse layers are not read by the {cfg['format']} scheme"
        )
    if a is None:
        return granularity, None
    if not _float8(a) or not a["symmetric"]:
        raise ValueError(
            f"{where}.input_activations: FP8 layers read symmetric float 8-bit activations, got {a}"
        )
    if a["dynamic"] is True and a["strategy"] == "token" and granularity != "block":
        return granularity, "dynamic"
    if (
        a["dynamic"] is True
        and a["strategy"] == "group"
        and a["group_size"] == BLOCK
        and granularity == "block"
    ):
        return granularity, "dynamic"
    if a["dynamic"] is False and a["strategy"] == "tensor":
        return granularity, "static"
    raise ValueError(
        f"{where}.input_activations: bitpress reads dynamic per-token (tensor / channel "
        "weights), dynamic group 128 (block weights) or static per-tensor FP8 activations, got "
        f"strategy {a['strategy']!r}, dynamic {a['dynamic']!r}, group_size {a['group_size']!r} "
        f"with weight strategy {granularity!r}"
    )


def load_float_quantized(
    name: str, linear: nn.Linear, tensors: Mapping, cfg: dict, dtype, device
) -> Fp8Linear:
    """The Fp8Linear of layer ``name`` (see the module docstring)."""
    granularity, activations = layer_settings(name, cfg)
    N, K = linear.out_features, linear.in_features
    what = f"K={K}, N={N}"
    weight = _tensor(tensors, f"{name}.weight", [[N, K]], (E4M3,), f"float8_e4m3fn [N, K], {what}")
    shapes = [scale_shape(granularity, N, K)] + ([[]] if granularity == "tensor" else [])
    scale = _tensor(
        tensors, f"{name}.weight_scale", shapes, _FLOATS, f"{granularity} scale, {what}"
    )
    input_scale = None
    if activations == "static":
        input_scale = _tensor(tensors, f"{name}.input_scale", [[1], []], _FLOATS, "[1]")
    elif f"{name}.input_scale" in tensors:
        raise ValueError(
            f"checkpoint: tensor '{name}.input_scale' in a layer without static activations "
            f"({cfg['group']}: input_activations {cfg['input_activations']})"
        )
    for key, t in ((f"{name}.weight_scale", scale), (f"{name}.input_scale", input_scale)):
        if t is not None and not bool((torch.isfinite(t) & (t > 0)).all()):
            raise ValueError(
                f"checkpoint: tensor {key!r} holds a scale that is not positive finite"
            )
    bias = None
    if linear.bias is not None or f"{name}.bias" in tensors:
        bias = _tensor(tensors, f"{name}.bias", [[N]], _FLOATS, "[N]")
    try:
        return Fp8Linear.from_tensors(
            weight,
            scale,
            input_scale,
            bias,
            granularity=granularity,
            activations=activations,
            dtype=dtype,
            device=device,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: {name} ({cfg['format']}): {e}") from e


def quantization_args(m: Fp8Linear) -> tuple[dict, dict | None]:
    """The compressed-tensors (weights, input_activations) args of ``m`` (as llm-compressor's
    FP8 / FP8_DYNAMIC / FP8_BLOCK presets write them)."""
    base = dict(
        num_bits=8,
        type="float",
        symmetric=True,
        group_size=None,
        block_structure=None,
        dynamic=False,
        actorder=None,
        observer="minmax",
        observer_kwargs={},
    )
    weights = {**base, "strategy": m.granularity}
    if m.granularity == "block":
        weights["block_structure"] = [BLOCK, BLOCK]
    if m.activations is None:
        return weights, None
    if m.activations == "static":
        return weights, {**base, "strategy": "tensor"}
    act = {**base, "dynamic": True, "observer": None}
    if m.granularity == "block":
        return weights, {**act, "strategy": "group", "group_size": BLOCK}
    return weights, {**act, "strategy": "token"}


def save_float_quantized(name: str, m: Fp8Linear) -> tuple[dict[str, torch.Tensor], dict]:
    out = {"weight": m.weight.detach().cpu(), "weight_scale": m.weight_scale.detach().cpu()}
    if m.activations == "static":
        if m.input_scale is None:
            raise ValueError(f"{name}: Fp8Linear with static activations has no input_scale yet")
        out["input_scale"] = m.input_scale.detach().cpu()
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    weights, act = quantization_args(m)
    return out, {
        "format": FORMAT,
        "weights": weights,
        "input_activations": act,
        "output_activations": None,
    }


def _hostile() -> CompressedTensorsHostile:
    kinds = {
        "q_proj": ("channel", "dynamic"),
        "o_proj": ("tensor", "static"),
        "down_proj": ("block", "dynamic"),
        "v_proj": ("channel", None),
    }

    def quantize(name: str, linear: nn.Linear):
        g, a = next((v for k, v in kinds.items() if name.endswith(k)), ("channel", "dynamic"))
        scale = 0.05 if a == "static" else None
        return Fp8Linear.from_linear(linear, g, a, input_scale=scale)

    return CompressedTensorsHostile(
        quantize=quantize,
        tensors={
            "weight": ((E4M3,), 2),
            "weight_scale": (_FLOATS, 2),
            "input_scale": (_FLOATS, 1),
        },
        required=("weight", "weight_scale"),
    )


FLOAT_QUANTIZED = register_compressed_tensors_scheme(
    CompressedTensorsScheme(
        format=FORMAT,
        module_types=(Fp8Linear,),
        load=load_float_quantized,
        save=save_float_quantized,
        suffixes=SUFFIXES,
        hostile=_hostile,
    )
)
NAIVE_QUANTIZED = register_compressed_tensors_scheme(
    CompressedTensorsScheme(
        format="naive-quantized",
        module_types=(Fp8Linear,),
        load=load_float_quantized,
        save=save_float_quantized,
        suffixes=SUFFIXES,
        can_save=lambda m: False,  # written as float-quantized
    )
)
