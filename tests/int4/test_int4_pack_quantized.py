"""compressed-tensors "pack-quantized" INT4 checkpoints (llm-compressor W4A16) into Int4Linear:
checkpoints written here from the format's definition (compressed-tensors' pack_to_int32 and
its config.json layout), loaded with bitpress.from_pretrained and compared with the format's
own decompression formula; save_pretrained(quant_method="compressed-tensors") round trips;
errors name the tensor or the field. compressed-tensors' own decompressor is used where it is
installed."""

from __future__ import annotations

import json
import math

import pytest
import torch

import bitpress
from bitpress.int4 import Int4Linear
from bitpress.testing import rel_err

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tiny_llama import linears, logits, tiny_llama  # noqa: E402

# --------------------------------------------------------------------------------------------
# The format's definition (compressed-tensors pack_to_int32 / unpack_from_int32, 4 bits)
# --------------------------------------------------------------------------------------------


def pack_to_int32(q_signed: torch.Tensor, packed_dim: int = 1) -> torch.Tensor:
    """int8 codes in [-8, 7] -> int32 words of 8 nibbles (q + 8), along ``packed_dim``."""
    v = (q_signed.to(torch.int64) + 8) & 0xF
    if packed_dim == 0:
        v = v.t()
    rows, cols = v.shape
    padded = math.ceil(cols / 8) * 8
    v = torch.nn.functional.pad(v, (0, padded - cols))
    words = (v.view(rows, padded // 8, 8) << (4 * torch.arange(8))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous() if packed_dim == 0 else words


def unpack_from_int32(words: torch.Tensor, shape, packed_dim: int = 1) -> torch.Tensor:
    w = words.t() if packed_dim == 0 else words
    nib = (w.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    out = nib.reshape(w.shape[0], -1) - 8
    out = out[:, : shape[1] if packed_dim == 1 else shape[0]]
    return out.t() if packed_dim == 0 else out


def decompress(t: dict, N: int, K: int) -> torch.Tensor:
    """compressed-tensors' decompression of one pack-quantized layer, float64 [N, K]."""
    q = unpack_from_int32(t["weight_packed"], (N, K)).double()
    s = t["weight_scale"].double()
    G = s.shape[1]
    z = torch.zeros(N, G, dtype=torch.float64)
    if "weight_zero_point" in t:
        z = unpack_from_int32(t["weight_zero_point"], (N, G), packed_dim=0).double()
    g = t.get("weight_g_idx")
    if g is None or bool((g == -1).any()):
        g = torch.arange(K) // (K // G if K % G == 0 else math.ceil(K / G))
    g = g.long()
    return (q - z[:, g]) * s[:, g]


def quantize_layer(w: torch.Tensor, group_size: int, sym: bool, act_order: bool, gen):
    """compressed-tensors' min-max quantization of one weight [N, K] -> the layer's tensors."""
    N, K = w.shape
    gs = K if group_size == -1 else group_size
    G = K // gs
    g_idx = torch.arange(K) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    out = {}
    scale = torch.empty(N, G)
    zp = torch.zeros(N, G, dtype=torch.int64)
    for grp in range(G):
        cols = w[:, g_idx == grp]
        if sym:
            s = cols.abs().amax(1) / 7.5
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s = (hi - lo) / 15
            zp[:, grp] = torch.clamp(torch.round(-8 - lo / s), -8, 7).long()
        scale[:, grp] = s.clamp(min=1e-6)
    scale = scale.half()
    q = torch.round(w / scale.float()[:, g_idx] + zp[:, g_idx]).clamp(-8, 7).to(torch.int8)
    out["weight_packed"] = pack_to_int32(q)
    out["weight_scale"] = scale
    out["weight_shape"] = torch.tensor([N, K])
    if not sym:
        out["weight_zero_point"] = pack_to_int32(zp.to(torch.int8), packed_dim=0)
    if act_order:
        out["weight_g_idx"] = g_idx.to(torch.int32)
    return out


def weight_args(group_size, sym, act_order):
    return {
        "num_bits": 4,
        "type": "int",
        "symmetric": sym,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": "group" if act_order else None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def write_checkpoint(path, model, group_size=32, sym=True, act_order=False, seed=0, **qc_extra):
    """An llm-compressor style W4A16 checkpoint of ``model``'s Linear layers (not lm_head);
    returns {layer: tensors}."""
    gen = torch.Generator().manual_seed(seed)
    tensors, layers = {}, {}
    for k, v in model.state_dict().items():
        tensors[k] = v.detach().clone()
    for name, lin in linears(model).items():
        t = quantize_layer(lin.weight.detach(), group_size, sym, act_order, gen)
        layers[name] = t
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {
        "config_groups": {
            "group_0": {
                "format": "pack-quantized",
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weight_args(group_size, sym, act_order),
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.12.2",
        **qc_extra,
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    safetensors_torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return layers


@pytest.mark.parametrize(
    "group_size, sym, act_order",
    [
        (32, True, False),
        (32, False, False),
        (-1, False, False),
        (16, False, True),
        (-1, True, False),
    ],
)
def test_load_matches_the_formats_decompression(tmp_path, group_size, sym, act_order):
    model = tiny_llama()
    layers = write_checkpoint(tmp_path, model, group_size, sym, act_order)
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    ref = tiny_llama()
    for name, t in layers.items():
        m = loaded.get_submodule(name)
        assert isinstance(m, Int4Linear) and m.sym == sym, name
        N, K = m.out_features, m.in_features
        want = decompress(t, N, K)
        assert torch.equal(m.dequantize(torch.float64), want), name
        ref.get_submodule(name).weight.data = want.float()
    assert type(loaded.lm_head) is torch.nn.Linear
    assert rel_err(logits(loaded), logits(ref)) < 1e-5
    qc = loaded.config.quantization_config
    assert qc["quant_method"] == "compressed-tensors"


@pytest.mark.parametrize("sym", [True, False])
def test_save_round_trip_and_tensors(tmp_path, sym):
    from tiny_llama import quantize_rtn

    model, ref = quantize_rtn(tiny_llama(bias=True), sym)
    bitpress.save_pretrained(model, tmp_path, quant_method="compressed-tensors")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["symmetric"] == sym
    assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32
    assert sorted(group["targets"]) == sorted(linears(ref))
    files = safetensors_torch.load_file(tmp_path / "model.safetensors")
    for name, lin in linears(ref).items():
        t = {k.removeprefix(f"{name}."): v for k, v in files.items() if k.startswith(f"{name}.")}
        N, K = lin.out_features, lin.in_features
        assert t["weight_packed"].dtype == torch.int32 and list(t["weight_packed"].shape) == [
            N,
            K // 8,
        ]
        assert list(t["weight_scale"].shape) == [N, K // 32]
        assert ("weight_zero_point" in t) == (not sym)
        assert t["weight_shape"].tolist() == [N, K]
        assert torch.equal(decompress(t, N, K).float(), lin.weight), name
        if lin.bias is not None:
            assert torch.equal(t["bias"], lin.bias)
        else:
            assert "bias" not in t
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    assert rel_err(logits(loaded), logits(ref)) < 1e-5
    # GPTQ remains the default writer of Int4Linear models.
    bitpress.save_pretrained(loaded, tmp_path / "gptq")
    qc2 = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc2["quant_method"] == "gptq"


def test_act_order_round_trip(tmp_path):
    model = tiny_llama()
    write_checkpoint(tmp_path / "a", model, 16, False, True, seed=3)
    a = bitpress.from_pretrained(tmp_path / "a", dtype=torch.float32)
    bitpress.save_pretrained(a, tmp_path / "b", quant_method="compressed-tensors")
    qc = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert next(iter(qc["config_groups"].values()))["weights"]["actorder"] == "group"
    b = bitpress.from_pretrained(tmp_path / "b", dtype=torch.float32)
    for name in linears(model):
        assert torch.equal(a.get_submodule(name).dequantize(), b.get_submodule(name).dequantize())


def _edit(path, fn):
    f = path / "model.safetensors"
    t = safetensors_torch.load_file(f)
    fn(t)
    safetensors_torch.save_file(t, f, metadata={"format": "pt"})


def _edit_qc(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


L = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda t: t.__setitem__(f"{L}.weight_packed", t[f"{L}.weight_packed"].long()),
            rf"tensor '{L}.weight_packed' has dtype int64, expected int32",
        ),
        (
            lambda t: t.__setitem__(f"{L}.weight_packed", t[f"{L}.weight_packed"][:, :-1].clone()),
            rf"tensor '{L}.weight_packed' has shape \[64, 15\], expected \[64, 16\]",
        ),
        (
            lambda t: t.__setitem__(f"{L}.weight_scale", t[f"{L}.weight_scale"].t().contiguous()),
            rf"tensor '{L}.weight_scale' has shape",
        ),
        (lambda t: t.pop(f"{L}.weight_zero_point"), rf"missing tensor '{L}.weight_zero_point'"),
        (
            lambda t: t.__setitem__(f"{L}.weight_shape", torch.tensor([64, 64])),
            rf"tensor '{L}.weight_shape' holds \[64, 64\]",
        ),
        (lambda t: t.__setitem__(f"{L}.weight", torch.zeros(64, 128)), rf"tensor.*'{L}.weight'"),
    ],
)
def test_bad_tensors_name_the_tensor(tmp_path, change, match):
    write_checkpoint(tmp_path, tiny_llama(), 32, False)
    _edit(tmp_path, change)
    with pytest.raises(ValueError, match=match):
        bitpress.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda qc: qc["config_groups"]["group_0"].__setitem__("format", "int-quantized"),
            r"group_0.format: compressed-tensors format 'int-quantized' is not supported",
        ),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].__setitem__("num_bits", 8),
            r"group_0.weights: pack-quantized layers are read as INT4",
        ),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].__setitem__("strategy", "block"),
            r"group_0.weights.block_structure must be given exactly with strategy 'block'",
        ),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].__setitem__("group_size", "32"),
            r"group_0.weights.group_size must be",
        ),
        (
            lambda qc: qc.__setitem__("ignore", "lm_head"),
            r"quantization_config.ignore must be a list",
        ),
        (
            lambda qc: qc["config_groups"]["group_0"].__setitem__("targets", ["re:(("]),
            r"group_0.targets: 're:\(\(' is not a valid regular expression",
        ),
        (lambda qc: qc.__setitem__("ignore", []), r"tensor 'lm_head\.weight(_packed)?'"),
        (lambda qc: qc.__setitem__("kv_cache_scheme", {"num_bits": 8}), r"kv_cache_scheme"),
        (lambda qc: qc.__setitem__("quantization_status", "frozen"), r"quantization_status"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, change, match):
    write_checkpoint(tmp_path, tiny_llama(), 32, False)
    _edit_qc(tmp_path, change)
    with pytest.raises(ValueError, match=match):
        bitpress.from_pretrained(tmp_path)


def test_targets_by_regex_and_ignore(tmp_path):
    """Only the layers the config targets are Int4Linear; a regex target, an ignore regex."""
    model = tiny_llama()
    layers = write_checkpoint(tmp_path, model, 32, True)
    # Keep the attention layers dense: their tensors back to float weights.
    dense = [n for n in layers if ".self_attn." in n]
    ref = tiny_llama()

    def restore(t):
        for n in dense:
            for k in [k for k in t if k.startswith(f"{n}.")]:
                del t[k]
            t[f"{n}.weight"] = ref.get_submodule(n).weight.detach().clone()

    _edit(tmp_path, restore)
    _edit_qc(
        tmp_path,
        lambda qc: (
            qc["config_groups"]["group_0"].__setitem__("targets", [r"re:.*mlp\.", "Linear"]),
            qc.__setitem__("ignore", ["lm_head", r"re:.*self_attn"]),
        ),
    )
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    for n in layers:
        want = torch.nn.Linear if n in dense else Int4Linear
        assert type(loaded.get_submodule(n)) is want, n


def test_compressed_tensors_decompressor_agrees(tmp_path):
    """compressed-tensors' own PackedQuantizationCompressor on what bitpress writes."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from tiny_llama import quantize_rtn

    for sym in (True, False):
        model, ref = quantize_rtn(tiny_llama(), sym)
        bitpress.save_pretrained(model, tmp_path / str(sym), quant_method="compressed-tensors")
        qc = json.loads((tmp_path / str(sym) / "config.json").read_text())["quantization_config"]
        weights = next(iter(qc["config_groups"].values()))["weights"]
        files = safetensors_torch.load_file(tmp_path / str(sym) / "model.safetensors")
        for name, lin in linears(ref).items():
            data = {
                k.removeprefix(f"{name}."): v for k, v in files.items() if k.startswith(f"{name}.")
            }
            w = ct_decompress(PackedQuantizationCompressor, data, weights)
            assert torch.equal(w.float(), lin.weight), (ct.__version__, name)


def test_mixed_group_sizes_default_to_compressed_tensors(tmp_path):
    """GPTQ has one group size per checkpoint; compressed-tensors writes one group per setting."""
    model = tiny_llama()
    ref = tiny_llama()
    for i, (name, lin) in enumerate(linears(model).items()):
        parent, _, child = name.rpartition(".")
        new = Int4Linear.from_linear(lin, group_size=(32, 64, -1)[i % 3], sym=i % 2 == 0)
        setattr(model.get_submodule(parent), child, new)
        ref.get_submodule(name).weight.data = new.dequantize(torch.float32)
    with pytest.raises(ValueError, match="share group_size and sym"):
        bitpress.save_pretrained(model, tmp_path / "gptq", quant_method="gptq")
    bitpress.save_pretrained(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and len(qc["config_groups"]) == 6
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    for name in linears(model):
        m = loaded.get_submodule(name)
        assert torch.equal(m.dequantize(torch.float32), ref.get_submodule(name).weight), name


def ct_decompress(compressor, data: dict, weights: dict) -> torch.Tensor:
    """compressed-tensors' own decompression of one layer: the classmethod interface
    (``decompress(state_dict, scheme)``, >= 0.20) or the instance one (``decompress_weight``)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qargs = QuantizationArgs(**weights)
    if hasattr(compressor, "decompress_weight"):
        return compressor(config=None).decompress_weight(data, quantization_args=qargs)
    scheme = QuantizationScheme(targets=["Linear"], weights=qargs)
    return compressor.decompress(dict(data), scheme)["weight"]
