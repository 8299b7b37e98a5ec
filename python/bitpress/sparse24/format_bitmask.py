"""compressed-tensors "sparse-24-bitmask" checkpoints and dense checkpoints with a 2:4 pattern,
read into and written from :class:`~bitpress.sparse24.modules.Sparse24Linear`.

"sparse-24-bitmask" (compressed-tensors ``Sparse24BitMaskCompressor``): for a Linear
``<name>`` with weight W [N, K],

* ``<name>.compressed`` [N, K/2]: the two kept weights of each group of 4 along K, in K order, in
  the weight's dtype, or float8_e4m3fn when the layer is FP8-quantized (then
  ``<name>.weight_scale`` float [N, 1] (channel) or [1] / [] (tensor) holds the scales:
  ``W = compressed · scale``);
* ``<name>.bitmask`` uint8 [N, ceil(K/8)]: the kept positions, one bit per weight, packed
  little-endian along K (``numpy.packbits(mask, axis=-1, bitorder="little")``: weight ``k`` is bit
  ``k % 8`` of byte ``k // 8``), exactly two bits set in every group of 4;
* ``<name>.shape`` int64 [2, 1], ``[[N], [K]]`` (int32 is read too);
* ``sparsity_config`` in config.json's ``quantization_config``: ``{"format": "sparse-24-bitmask",
  "sparsity_structure": "2:4", "targets": [...], "ignore": [...]}``.

The kept positions are exactly the set bits: compressed-tensors' writer picks the two largest
magnitudes of each group (``topk``), so a group with fewer than 2 nonzeros may keep zeros at any
positions. bitpress checks the bitmask (a group with another count of bits is an error naming
the tensor, row and group) and converts the pair to the interchange format of
:mod:`bitpress.sparse24.layout` (whose canonical positions may differ for zero values, never in
the weight). The reader of transformers + compressed-tensors ignores these tensors and leaves
random weights; bitpress loads them or fails.

Dense 2:4 checkpoints: llm-compressor also writes 2:4 models densely (``sparsity_config.format``
"dense" with ``sparsity_structure`` "2:4"): the targeted Linear layers are checked for the
pattern and become Sparse24Linear (:func:`sparsify_dense_24`); ``from_pretrained(path,
sparse24=True)`` does the same for every Linear but lm_head of any checkpoint.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from bitpress._core.registry import (
    CompressedTensorsHostile,
    CompressedTensorsScheme,
    register_compressed_tensors_scheme,
)
from bitpress.calibration import replace_module
from bitpress.sparse24 import layout as _layout
from bitpress.sparse24.modules import Sparse24Linear

FORMAT = "sparse-24-bitmask"
_FP8 = torch.float8_e4m3fn
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, _FP8)

log = logging.getLogger("bitpress")


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> uint8 [N, ceil(K/8)], little-endian along K."""
    N, K = mask.shape
    pad = (-K) % 8
    m = torch.nn.functional.pad(mask.to(torch.int64), (0, pad)).view(N, -1, 8)
    return (m << torch.arange(8)).sum(-1).to(torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] -> bool [N, K]."""
    bits = (bitmask.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :K].bool()


def to_bitmask(values: torch.Tensor, meta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Interchange (values [N, K/2], meta uint8 [N, K/8]) -> ``{"compressed", "bitmask",
    "shape"}`` (module docstring). The interchange kept positions are ordered, so the values are
    already in K order."""
    N, K = values.shape[0], values.shape[1] * 2
    mask = torch.zeros(N, K, dtype=torch.bool)
    mask.scatter_(1, _layout.dense_columns(meta.cpu()), True)
    return {
        "compressed": values.detach().cpu().contiguous(),
        "bitmask": pack_bitmask(mask),
        "shape": torch.tensor([[N], [K]], dtype=torch.int64),
    }


def from_bitmask(
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    shape: torch.Tensor | None,
    *,
    name: str = "",
    expect: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compressed`` [N, K/2], ``bitmask`` uint8 [N, ceil(K/8)], ``shape`` (int [2, 1] =
    ``[[N], [K]]``, or None: from ``expect``) -> interchange (values [N, K/2] in
    ``compressed.dtype``, meta uint8 [N, K/8]), exactly. ValueError naming the tensor
    (``<name>.compressed`` ...) on any inconsistency."""
    p = f"{name}." if name else ""
    if shape is not None:
        if shape.dtype not in (torch.int64, torch.int32) or list(shape.shape) != [2, 1]:
            raise ValueError(
                f"{p}shape: expected int64 [2, 1] ([[N], [K]], as compressed-tensors writes it), "
                f"got {shape.dtype} {list(shape.shape)}"
            )
        N, K = (int(v) for v in shape.reshape(-1).tolist())
    elif expect is not None:
        N, K = expect
    else:
        raise ValueError(f"{p}shape: missing")
    if expect is not None and (N, K) != tuple(expect):
        raise ValueError(
            f"{p}shape: holds [{N}, {K}], the model's layer is [{expect[0]}, {expect[1]}]"
        )
    if N <= 0 or K <= 0 or K % 8:
        raise ValueError(f"{p}shape: [{N}, {K}]: 2:4 needs K a positive multiple of 8")
    if compressed.dtype not in _VALUE_DTYPES:
        raise ValueError(
            f"{p}compressed: dtype must be float16, bfloat16, float32 or float8_e4m3fn, "
            f"got {compressed.dtype}"
        )
    if list(compressed.shape) != [N, K // 2]:
        raise ValueError(
            f"{p}compressed: expected shape [N, K/2] = [{N}, {K // 2}], "
            f"got {list(compressed.shape)}"
        )
    if bitmask.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"{p}bitmask: dtype must be uint8, got {bitmask.dtype}")
    if list(bitmask.shape) != [N, K // 8]:
        raise ValueError(
            f"{p}bitmask: expected shape [N, K/8] = [{N}, {K // 8}], got {list(bitmask.shape)}"
        )
    mask = unpack_bitmask(bitmask.cpu().view(torch.uint8), K)  # [N, K]
    counts = mask.view(N, K // 4, 4).sum(-1)
    bad = (counts != 2).reshape(-1).nonzero()
    if len(bad):
        i = int(bad[0])
        r, g = i // (K // 4), i % (K // 4)
        raise ValueError(
            f"{p}bitmask: row {r}, group {g} (columns {4 * g}..{4 * g + 3}) has "
            f"{int(counts.reshape(-1)[i])} bits set, sparse-24-bitmask sets exactly 2 per group "
            "of 4"
        )
    pos = mask.view(N, K // 4, 4).nonzero()[:, 2].view(N, K // 4, 2)  # ascending per group
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)
    meta = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return compressed, meta.contiguous()


def _fp8_scale(scale: torch.Tensor, N: int, name: str) -> torch.Tensor:
    if not scale.dtype.is_floating_point or scale.dtype == _FP8:
        raise ValueError(f"{name}.weight_scale: dtype must be float32/16, got {scale.dtype}")
    if scale.numel() == 1:
        return scale.reshape(1, 1).float()
    if list(scale.shape) not in ([N, 1], [N]):
        raise ValueError(
            f"{name}.weight_scale: expected shape [N, 1] = [{N}, 1] (channel) or [1] (tensor), "
            f"got {list(scale.shape)}"
        )
    return scale.reshape(N, 1).float()


def load_bitmask_linear(
    name: str,
    linear: nn.Linear,
    tensors,
    weights: dict | None,
    dtype: torch.dtype,
    device,
) -> Sparse24Linear:
    """The Sparse24Linear of layer ``name`` of a sparse-24-bitmask checkpoint. ``weights``: the
    layer's weight quantization args (None: unquantized; FP8 ``{"type": "float", "num_bits": 8,
    "strategy": "channel" | "tensor"}``: the values are dequantized, ``compressed · scale``
    rounded once to ``dtype``)."""
    N, K = linear.out_features, linear.in_features

    def get(suffix: str, required: bool = True):
        key = f"{name}.{suffix}"
        if key in tensors:
            return tensors[key]
        if required:
            raise ValueError(f"checkpoint: missing tensor '{key}' (sparse-24-bitmask layer)")
        return None

    compressed, bitmask = get("compressed"), get("bitmask")
    values, meta = from_bitmask(compressed, bitmask, get("shape", False), name=name, expect=(N, K))
    if weights is not None:
        if not (weights.get("type") == "float" and weights.get("num_bits") == 8):
            raise ValueError(
                f"{name}: sparse-24-bitmask with weight quantization {weights.get('type')}"
                f"{weights.get('num_bits')} is not supported (unquantized or FP8 E4M3 only)"
            )
        if values.dtype != _FP8:
            raise ValueError(
                f"{name}.compressed: FP8 layer: dtype must be float8_e4m3fn, got {values.dtype}"
            )
        scale = _fp8_scale(get("weight_scale"), N, name)
        values = (values.float() * scale).to(dtype)
    elif values.dtype == _FP8:
        raise ValueError(
            f"{name}.compressed: float8_e4m3fn values but the layer has no FP8 weight "
            "quantization config"
        )
    bias = get("bias", False)
    return Sparse24Linear.from_interchange(values.to(dtype), meta, bias, dtype=dtype, device=device)


def save_bitmask_linear(module: Sparse24Linear) -> dict[str, torch.Tensor]:
    """``{"compressed", "bitmask", "shape"[, "bias"]}`` of a Sparse24Linear (values in its
    dtype)."""
    values, meta = module.interchange()
    out = to_bitmask(values, meta)
    if module.bias is not None:
        out["bias"] = module.bias.detach().cpu()
    return out


def sparsify_dense_24(model: nn.Module, names, tensors_dtype=None) -> list[str]:
    """Replace the Linear layers ``names`` of ``model`` by Sparse24Linear after checking their
    weights have the 2:4 pattern (ValueError naming ``<name>.weight``, row and group). Returns
    the names replaced. Linear layers whose in_features is not a multiple of 8 cannot be 2:4
    (ValueError)."""
    done = []
    for name in names:
        lin = model.get_submodule(name)
        if type(lin) is not nn.Linear:
            continue
        if lin.in_features % 8:
            raise ValueError(
                f"{name}.weight: in_features {lin.in_features} is not a multiple of 8: "
                "cannot be 2:4"
            )
        new = Sparse24Linear.from_dense(
            lin.weight.detach(), lin.bias, device=lin.weight.device, name=f"{name}.weight"
        )
        replace_module(model, name, new)
        done.append(name)
    return done


# --------------------------------------------------------------------------------------------
# Dense 2:4 checkpoints
# --------------------------------------------------------------------------------------------


def _matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    # compressed-tensors' rule (bitpress.compressed_tensors): a module name, a 're:' regex
    # matched from the start of the name, or a class name of the module.
    for t in targets:
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or any(c.__name__ == t for c in type(module).__mro__):
            return True
    return False


def dense_24_layers(model: nn.Module, qc: dict | None, sparse24: bool) -> list[str]:
    """The plain Linear layers of a loaded model to turn into Sparse24Linear: those the config's
    ``sparsity_config`` (format "dense", ``sparsity_structure`` "2:4") targets; with
    ``sparse24=True`` also, without such a config, every Linear but ``lm_head``."""
    sc = (qc or {}).get("sparsity_config")
    targeted = (
        sc is not None
        and sc.get("format") == "dense"
        and str(sc.get("sparsity_structure", "")).replace(" ", "") == "2:4"
    )
    if not targeted and not sparse24:
        return []
    out = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        if targeted:
            if _matches(name, m, sc.get("targets", [])) and not _matches(
                name, m, sc.get("ignore", [])
            ):
                out.append(name)
        elif name.split(".")[-1] != "lm_head":
            out.append(name)
    return out


# --------------------------------------------------------------------------------------------
# The compressed-tensors scheme
# --------------------------------------------------------------------------------------------

SUFFIXES = ("compressed", "bitmask", "shape", "weight_scale", "bias")


def _load(name: str, linear: nn.Linear, tensors, cfg: dict, dtype, device) -> Sparse24Linear:
    sc = cfg.get("sparsity_config") or {}
    structure = str(sc.get("sparsity_structure", "2:4")).replace(" ", "")
    if structure != "2:4":
        raise ValueError(
            "quantization_config.sparsity_config.sparsity_structure: sparse-24-bitmask layers "
            f"are 2:4, got {sc.get('sparsity_structure')!r}"
        )
    if cfg.get("input_activations") is not None or cfg.get("output_activations") is not None:
        where = f"quantization_config.config_groups.{cfg.get('group')}"
        raise ValueError(
            f"{where}.input_activations: activation quantization of sparse-24-bitmask layers is "
            "not supported (weights only)"
        )
    return load_bitmask_linear(name, linear, tensors, cfg.get("weights"), dtype, device)


def _save(name: str, module: Sparse24Linear) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = {
        "format": FORMAT,
        "weights": None,
        "sparsity_config": {"format": FORMAT, "sparsity_structure": "2:4"},
    }
    return save_bitmask_linear(module), cfg


def _hostile() -> CompressedTensorsHostile:
    def quantize(name: str, linear: nn.Linear):
        if linear.in_features % 8:
            return None
        return Sparse24Linear.from_linear(linear, "magnitude")

    return CompressedTensorsHostile(
        quantize=quantize,
        tensors={
            "compressed": ((torch.float16, torch.bfloat16, torch.float32), 2),
            "bitmask": ((torch.uint8,), 2),
            "shape": ((torch.int64, torch.int32), 2),
        },
        required=("compressed", "bitmask"),
    )


SPARSE_24_BITMASK = register_compressed_tensors_scheme(
    CompressedTensorsScheme(
        format=FORMAT,
        module_types=(Sparse24Linear,),
        load=_load,
        save=_save,
        suffixes=SUFFIXES,
        hostile=_hostile,
    )
)
