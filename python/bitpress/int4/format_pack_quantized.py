"""compressed-tensors "pack-quantized" INT4 layers (llm-compressor's W4A16 / W4A16_ASYM) <->
:class:`~bitpress.int4.modules.Int4Linear`, registered as a compressed-tensors scheme
(:mod:`bitpress.compressed_tensors` reads the config and dispatches the layer here).

Tensors of one Linear with in_features K, out_features N, G = ceil(K / group_size) groups
(compressed-tensors' ``PackedQuantizationCompressor``, 4 bits):

* ``weight_packed`` int32 ``[N, ceil(K/8)]``, packed along K: column ``k = 8c + i`` of row ``n``
  is bits ``4i..4i+3`` of ``weight_packed[n, c]``, holding ``q + 8`` for the signed code
  ``q`` in ``[-8, 7]`` (the "offset of 8").
* ``weight_scale`` ``[N, G]`` (float16 / bfloat16 / float32); strategy "channel": ``[N, 1]``.
* ``weight_zero_point`` int32 ``[ceil(N/8), G]``, asymmetric only, packed along **N** (dim 0)
  with the same offset: row ``n = 8r + i`` is nibble ``i`` of ``weight_zero_point[r, g]``,
  holding ``z + 8`` for the signed zero point ``z``.
* ``weight_g_idx`` int32 ``[K]``, optional (activation ordering): the group of each column; a
  tensor holding -1 means column order (compressed-tensors' "not initialised").
* ``weight_shape`` ``[2]`` = ``[N, K]`` (int64 as compressed-tensors writes it; int32 read too).
* ``bias`` ``[N]``, optional.

``W[n, k] = (q[n, k] - z[n, g(k)]) * weight_scale[n, g(k)]`` with ``z = 0`` when symmetric, which
in unsigned codes ``u = q + 8`` is GPTQ's ``(u - zu) * s`` with ``zu = z + 8`` (8 when
symmetric). So ``weight_packed`` is the transpose of GPTQ's ``qweight`` word for word, and
``weight_zero_point`` the transpose of a GPTQ v2 ``qzeros``: the layer is read through
:meth:`Int4Linear.from_gptq` without unpacking a nibble.
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
from bitpress.int4.format_gptq import default_g_idx
from bitpress.int4.modules import Int4Linear

FORMAT = "pack-quantized"
SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_g_idx",
    "weight_shape",
    "bias",
)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INTS = (torch.int32, torch.int64)
_INT8_TOKEN = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor(tensors: Mapping, key: str, shape: list[int], dtypes, what: str) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise ValueError(f"checkpoint: missing tensor {key!r} (expected {what} {shape})")
    if t.dtype not in dtypes:
        want = " or ".join(_name(d) for d in dtypes)
        raise ValueError(f"checkpoint: tensor {key!r} has dtype {_name(t.dtype)}, expected {want}")
    if list(t.shape) != shape:
        raise ValueError(
            f"checkpoint: tensor {key!r} has shape {list(t.shape)}, expected {shape} ({what})"
        )
    return t


def _check_args(name: str, cfg: dict) -> tuple[int, bool, torch.dtype | None]:
    """(group_size for Int4Linear, symmetric, act_dtype) of the layer's quantization args."""
    w, where = cfg["weights"], f"quantization_config.config_groups.{cfg['group']}"
    if w is None:
        raise ValueError(f"{where}.weights: layer {name!r} is pack-quantized without weight args")
    if w["num_bits"] != 4 or w["type"] != "int":
        raise ValueError(
            f"{where}.weights: pack-quantized layers are read as INT4 (num_bits 4, type 'int'), "
            f"got num_bits {w['num_bits']}, type {w['type']!r}"
        )
    if w["strategy"] not in ("group", "channel"):
        raise ValueError(
            f"{where}.weights.strategy must be 'group' or 'channel' for INT4, got {w['strategy']!r}"
        )
    if w["dynamic"] is not False:
        raise ValueError(f"{where}.weights.dynamic must be false, got {w['dynamic']!r}")
    act = cfg["input_activations"]
    act_dtype = None
    if act is not None:
        if any(act[k] != v for k, v in _INT8_TOKEN.items()):
            raise ValueError(
                f"{where}.input_activations: INT4 layers read none or int8 per-token dynamic "
                f"activations (W4A8), got {act}"
            )
        act_dtype = torch.int8
    if cfg["output_activations"] is not None:
        raise ValueError(f"{where}.output_activations: output quantization is unsupported")
    if cfg["sparsity_config"] is not None:
        raise ValueError("quantization_config.sparsity_config: not read with pack-quantized layers")
    gs = w["group_size"] if w["strategy"] == "group" else -1
    return gs, w["symmetric"], act_dtype


def load_pack_quantized(
    name: str, linear: nn.Linear, tensors: Mapping, cfg: dict, dtype, device
) -> Int4Linear:
    """The Int4Linear of layer ``name`` (see the module docstring)."""
    gs, sym, act_dtype = _check_args(name, cfg)
    N, K = linear.out_features, linear.in_features
    if K % 8:
        raise ValueError(
            f"{name}: in_features = {K} is not a multiple of 8; Int4Linear cannot hold it"
        )
    if gs != -1 and gs % 8:
        raise ValueError(
            f"quantization_config.config_groups.{cfg['group']}.weights.group_size must be a "
            f"multiple of 8 for Int4Linear, got {gs}"
        )
    G = 1 if gs == -1 else -(-K // gs)
    what = f"K={K}, N={N}, group_size={gs}"
    packed = _tensor(
        tensors, f"{name}.weight_packed", [N, K // 8], (torch.int32,), f"int32 [N, K/8], {what}"
    )
    scale = _tensor(tensors, f"{name}.weight_scale", [N, G], _FLOATS, f"[N, G], {what}")
    zp = None
    if not sym:
        zp = _tensor(
            tensors,
            f"{name}.weight_zero_point",
            [-(-N // 8), G],
            (torch.int32,),
            f"int32 [ceil(N/8), G], {what}",
        )
    elif f"{name}.weight_zero_point" in tensors:
        raise ValueError(
            f"checkpoint: tensor '{name}.weight_zero_point' in a symmetric layer "
            f"(config group {cfg['group']!r} says symmetric: true)"
        )
    g_idx = None
    if f"{name}.weight_g_idx" in tensors:
        g_idx = _tensor(tensors, f"{name}.weight_g_idx", [K], _INTS, "int32 [K]")
        if bool((g_idx == -1).any()):
            if not bool((g_idx == -1).all()):
                raise ValueError(
                    f"checkpoint: tensor '{name}.weight_g_idx' mixes -1 (column order) with groups"
                )
            g_idx = None
        else:
            g_idx = g_idx.to(torch.int32)
    if f"{name}.weight_shape" in tensors:
        shape = _tensor(tensors, f"{name}.weight_shape", [2], _INTS, "[N, K]")
        if shape.tolist() != [N, K]:
            raise ValueError(
                f"checkpoint: tensor '{name}.weight_shape' holds {shape.tolist()}, the layer is "
                f"[N, K] = [{N}, {K}]"
            )
    bias = None
    if linear.bias is not None or f"{name}.bias" in tensors:
        bias = _tensor(tensors, f"{name}.bias", [N], _FLOATS, "[N]")
    try:
        m = Int4Linear.from_gptq(
            packed.t().contiguous(),
            None if zp is None else zp.t().contiguous(),
            scale.t().contiguous(),
            g_idx,
            bias,
            group_size=gs,
            sym=sym,
            checkpoint_format="gptq_v2",
            dtype=dtype,
            device=device,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: {name} (pack-quantized): {e}") from e
    m.act_dtype = act_dtype
    return m


def weight_args(m: Int4Linear) -> dict:
    """The compressed-tensors QuantizationArgs of ``m``'s weight."""
    channel = m.group_size == -1
    return {
        "num_bits": 4,
        "type": "int",
        "symmetric": bool(m.sym),
        "strategy": "channel" if channel else "group",
        "group_size": None if channel else m.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def save_pack_quantized(name: str, m: Int4Linear) -> tuple[dict[str, torch.Tensor], dict]:
    """The pack-quantized tensors (by suffix) and scheme config of ``m``."""
    g = m.to_gptq("gptq_v2")
    K, N = m.in_features, m.out_features
    out = {
        "weight_packed": g["qweight"].t().contiguous(),
        "weight_scale": g["scales"].to(m.dtype).t().contiguous(),
        "weight_shape": torch.tensor([N, K], dtype=torch.int64),
    }
    if not m.sym:
        out["weight_zero_point"] = g["qzeros"].t().contiguous()
    args = weight_args(m)
    if not torch.equal(g["g_idx"], default_g_idx(K, m.group_size)):
        out["weight_g_idx"] = g["g_idx"].to(torch.int32)
        args["actorder"] = "group"
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    act = None
    if m.act_dtype == torch.int8:
        act = {
            **_INT8_TOKEN,
            "group_size": None,
            "block_structure": None,
            "actorder": None,
            "observer": None,
            "observer_kwargs": {},
        }
    cfg = {"format": FORMAT, "weights": args, "input_activations": act, "output_activations": None}
    return out, cfg


def _hostile() -> CompressedTensorsHostile:
    def quantize(name: str, linear: nn.Linear):
        if linear.in_features % 32:
            return None
        sym = "up_proj" in name or "k_proj" in name
        return Int4Linear.from_linear(linear, group_size=32 if not sym else -1, sym=sym)

    floats = _FLOATS
    return CompressedTensorsHostile(
        quantize=quantize,
        tensors={
            "weight_packed": ((torch.int32,), 2),
            "weight_scale": (floats, 2),
            "weight_zero_point": ((torch.int32,), 2),
            "weight_g_idx": (_INTS, 1),
            "weight_shape": (_INTS, 1),
        },
        required=("weight_packed", "weight_scale"),
    )


PACK_QUANTIZED = register_compressed_tensors_scheme(
    CompressedTensorsScheme(
        format=FORMAT,
        module_types=(Int4Linear,),
        load=load_pack_quantized,
        save=save_pack_quantized,
        suffixes=SUFFIXES,
        hostile=_hostile,
    )
)
