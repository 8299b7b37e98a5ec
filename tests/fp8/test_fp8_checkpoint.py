"""FP8 checkpoints through bitpress.from_pretrained / save_pretrained: compressed-tensors
"float-quantized" as llm-compressor writes it (FP8_DYNAMIC, static FP8, FP8_BLOCK, weight-only;
scales in float32 or bfloat16; ignore lists) and block-scaled ``quant_method: "fp8"``
(weight_scale_inv) checkpoints, written here from the formats' definitions and compared with
their decompression formula (``weight * scale`` of the element's tensor / row / block); round
trips, a model mixing FP8 and INT4 layers, and errors naming the tensor or the field.
compressed-tensors' own decompressor is used where it is installed."""

from __future__ import annotations

import json

import pytest
import torch

import bitpress
from bitpress.int4 import Int4Linear
from bitpress.testing import rel_err

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

E4M3 = torch.float8_e4m3fn
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def llama(hidden=160, inter=200):
    """A tiny Llama whose projections are not multiples of 128 (ragged 128 x 128 blocks)."""
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def linears(model):
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    }


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


# --------------------------------------------------------------------------------------------
# The formats' definitions
# --------------------------------------------------------------------------------------------


def block_amax(w, b=128):
    N, K = w.shape
    out = torch.zeros(-(-N // b), -(-K // b))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = w[i * b : (i + 1) * b, j * b : (j + 1) * b].abs().amax()
    return out


def expand(s, N, K):
    """The scale of every element of a weight [N, K]: [1], [N, 1] or [ceil(N/128), ceil(K/128)]."""
    if s.numel() == 1:
        return s.reshape(1, 1).expand(N, K)
    if list(s.shape) == [N, 1]:
        return s.expand(N, K)
    return s.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]


def quantize_fp8(w, strategy, scale_dtype=torch.float32):
    """(weight E4M3, weight_scale) as llm-compressor's observers compute them (amax / 448)."""
    N, K = w.shape
    if strategy == "tensor":
        s = (w.abs().amax() / 448).reshape(1)
    elif strategy == "channel":
        s = w.abs().amax(1, keepdim=True) / 448
    else:
        s = block_amax(w) / 448
    s = s.to(scale_dtype)
    q = (w / expand(s.float(), N, K)).clamp(-448, 448).to(E4M3)
    return q, s


def decompress(q, s):
    """compressed-tensors' / DeepSeek's dequantization: code times its scale, float64."""
    N, K = q.shape
    return q.double() * expand(s.double(), N, K)


PRESETS = {
    # llm-compressor's presets (compressed_tensors.quantization.quant_scheme)
    "FP8_DYNAMIC": ("channel", {"strategy": "token", "dynamic": True}),
    "FP8": ("tensor", {"strategy": "tensor", "dynamic": False}),
    "FP8_BLOCK": ("block", {"strategy": "group", "group_size": 128, "dynamic": True}),
    "FP8_W8A16": ("channel", None),
}


def args(strategy, **kw):
    a = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": strategy,
        "group_size": None,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    a.update(kw)
    return a


def write_ct_checkpoint(path, model, preset, scale_dtype=torch.float32, fmt="float-quantized"):
    """An llm-compressor style checkpoint: every Linear but lm_head in FP8 (``preset``)."""
    strategy, act = PRESETS[preset]
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = {}
    for name, lin in linears(model).items():
        q, s = quantize_fp8(lin.weight.detach(), strategy, scale_dtype)
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale"] = s
        if act is not None and not act["dynamic"]:
            tensors[f"{name}.input_scale"] = torch.tensor([0.02], dtype=scale_dtype)
        layers[name] = (q, s)
    weights = args(strategy, block_structure=[128, 128] if strategy == "block" else None)
    acts = None if act is None else args(**act, observer=None if act["dynamic"] else "minmax")
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {
        "config_groups": {
            "group_0": {
                "format": fmt,
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": acts,
                "output_activations": None,
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.12.2",
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    safetensors_torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return layers


EXPECT = {
    "FP8_DYNAMIC": ("channel", "dynamic"),
    "FP8": ("tensor", "static"),
    "FP8_BLOCK": ("block", "dynamic"),
    "FP8_W8A16": ("channel", None),
}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_load_llm_compressor_layout(tmp_path, preset, scale_dtype):
    model = llama()
    layers = write_ct_checkpoint(tmp_path, model, preset, scale_dtype)
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(loaded.lm_head) is torch.nn.Linear
    ref = llama()
    for name, (q, s) in layers.items():
        m = loaded.get_submodule(name)
        assert isinstance(m, bitpress.Fp8Linear), name
        assert (m.granularity, m.activations) == EXPECT[preset]
        assert m.weight.dtype == E4M3 and m.weight_scale.dtype == torch.float32
        want = decompress(q, s)
        assert torch.equal(m.dequantize(torch.float64), want), name
        ref.get_submodule(name).weight.data = want.float()
        if EXPECT[preset][1] == "static":
            assert float(m.input_scale) == float(torch.tensor(0.02, dtype=scale_dtype))
    # Activation quantization adds its own error; weight-only is the dequantized model.
    tol = 1e-5 if PRESETS[preset][1] is None else 0.1
    assert rel_err(logits(loaded), logits(ref)) < tol


def test_naive_quantized_weight_only(tmp_path):
    """llm-compressor names an FP8 weight-only layer "naive-quantized"."""
    model = llama()
    layers = write_ct_checkpoint(tmp_path, model, "FP8_W8A16", fmt="naive-quantized")
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    for name, (q, s) in layers.items():
        assert torch.equal(loaded.get_submodule(name).dequantize(torch.float64), decompress(q, s))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("activations", [None, "dynamic", "static"])
def test_save_round_trip(tmp_path, granularity, activations):
    model = llama()
    calib = [IDS] if activations == "static" else None
    bitpress.quantize_(model, bitpress.Fp8Config(granularity, activations, calibration=calib))
    bitpress.save_pretrained(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == granularity
    assert sorted(group["targets"]) == sorted(linears(llama()))
    a = group["input_activations"]
    if activations is None:
        assert a is None
    elif activations == "static":
        assert (a["strategy"], a["dynamic"]) == ("tensor", False)
    else:
        assert a["dynamic"] is True
        assert a["strategy"] == ("group" if granularity == "block" else "token")
    files = safetensors_torch.load_file(tmp_path / "model.safetensors")
    for name, m in linears(model).items():
        assert torch.equal(files[f"{name}.weight"].view(torch.uint8), m.weight.view(torch.uint8))
        assert torch.equal(files[f"{name}.weight_scale"], m.weight_scale)
        assert (f"{name}.input_scale" in files) == (activations == "static")
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(logits(loaded), logits(model))


def write_fp8_block_checkpoint(path, model, skip=()):
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = {}
    for name, lin in linears(model).items():
        if name in skip:
            continue
        q, s = quantize_fp8(lin.weight.detach(), "block")
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale_inv"] = s
        layers[name] = (q, s)
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": list(skip) + ["lm_head"],
    }
    (path / "config.json").write_text(json.dumps(cfg))
    safetensors_torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return layers


def test_load_and_save_block_fp8(tmp_path):
    model = llama()
    skip = ("model.layers.1.self_attn.o_proj",)
    layers = write_fp8_block_checkpoint(tmp_path / "a", model, skip)
    loaded = bitpress.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert type(loaded.get_submodule(skip[0])) is torch.nn.Linear
    for name, (q, s) in layers.items():
        m = loaded.get_submodule(name)
        assert (m.granularity, m.activations) == ("block", "dynamic")
        assert list(m.weight_scale.shape) == [-(-m.out_features // 128), -(-m.in_features // 128)]
        assert torch.equal(m.dequantize(torch.float64), decompress(q, s)), name
    bitpress.save_pretrained(loaded, tmp_path / "b", quant_method="fp8")
    qc = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    b = bitpress.from_pretrained(tmp_path / "b", dtype=torch.float32)
    assert torch.equal(logits(b), logits(loaded))
    # The default writer of Fp8Linear is compressed-tensors (FP8_BLOCK), read back the same.
    bitpress.save_pretrained(loaded, tmp_path / "c")
    c = bitpress.from_pretrained(tmp_path / "c", dtype=torch.float32)
    assert torch.equal(logits(c), logits(loaded))


def test_fp8_writer_refuses_other_layers(tmp_path):
    model = llama()
    bitpress.quantize_(model, bitpress.Fp8Config("channel"))
    with pytest.raises(ValueError, match="quant_method 'fp8' cannot write layer"):
        bitpress.save_pretrained(model, tmp_path, quant_method="fp8")


def test_mixed_fp8_and_int4_layers(tmp_path):
    model = llama(hidden=128, inter=256)
    bitpress.quantize_(model, bitpress.Fp8Config("channel", ignore=["re:.*mlp"]))
    for name, lin in linears(model).items():
        if ".mlp." in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int4Linear.from_linear(lin, 32, sym=False))
    bitpress.save_pretrained(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    formats = sorted(g["format"] for g in qc["config_groups"].values())
    assert formats == ["float-quantized", "pack-quantized"]
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, Int4Linear)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, bitpress.Fp8Linear)
    assert torch.equal(logits(loaded), logits(model))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

L = "model.layers.0.mlp.down_proj"  # in_features 200, out_features 160


def _edit(path, fn):
    f = path / "model.safetensors"
    t = safetensors_torch.load_file(f)
    fn(t)
    safetensors_torch.save_file(t, f, metadata={"format": "pt"})


def _edit_qc(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "preset, change, match",
    [
        (
            "FP8_DYNAMIC",
            lambda t: t.__setitem__(f"{L}.weight", t[f"{L}.weight"].float()),
            rf"tensor '{L}.weight' has dtype float32, expected float8_e4m3fn",
        ),
        (
            "FP8_DYNAMIC",
            lambda t: t.__setitem__(f"{L}.weight_scale", t[f"{L}.weight_scale"][:, 0].clone()),
            rf"tensor '{L}.weight_scale' has shape \[160\], expected \[160, 1\]",
        ),
        (
            "FP8_DYNAMIC",
            lambda t: t.pop(f"{L}.weight_scale"),
            rf"missing tensor '{L}.weight_scale'",
        ),
        ("FP8", lambda t: t.pop(f"{L}.input_scale"), rf"missing tensor '{L}.input_scale'"),
        (
            "FP8",
            lambda t: t.__setitem__(f"{L}.input_scale", torch.tensor([-1.0])),
            rf"tensor '{L}.input_scale' holds a scale that is not positive",
        ),
        (
            "FP8_DYNAMIC",
            lambda t: t.__setitem__(f"{L}.input_scale", torch.tensor([1.0])),
            rf"tensor '{L}.input_scale' in a layer without static activations",
        ),
        (
            "FP8_BLOCK",
            lambda t: t.__setitem__(f"{L}.weight_scale", torch.ones(1, 1)),
            rf"tensor '{L}.weight_scale' has shape \[1, 1\], expected \[2, 2\]",
        ),
        (
            "FP8_DYNAMIC",
            lambda t: t.__setitem__(f"{L}.weight_packed", torch.zeros(160, 25, dtype=torch.int32)),
            rf"tensor '{L}.weight_packed' is not a tensor of format 'float-quantized'",
        ),
    ],
)
def test_bad_tensors_name_the_tensor(tmp_path, preset, change, match):
    write_ct_checkpoint(tmp_path, llama(), preset)
    _edit(tmp_path, change)
    with pytest.raises(ValueError, match=match):
        bitpress.from_pretrained(tmp_path)


def _group(qc):
    return qc["config_groups"]["group_0"]


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda qc: _group(qc).__setitem__("format", "nvfp4-pack-quantized"),
            r"group_0.format: compressed-tensors format 'nvfp4-pack-quantized' is not supported",
        ),
        (
            lambda qc: _group(qc)["weights"].__setitem__("type", "int"),
            r"group_0.weights: float-quantized layers are read as FP8 E4M3",
        ),
        (
            lambda qc: _group(qc)["weights"].__setitem__("type", "complex"),
            r"group_0.weights.type must be",
        ),
        (
            lambda qc: _group(qc)["input_activations"].__setitem__("strategy", "tensor"),
            r"group_0.input_activations: bitpress reads dynamic per-token",
        ),
        (
            lambda qc: _group(qc).__setitem__("output_activations", _group(qc)["weights"]),
            r"group_0.output_activations: output quantization is unsupported",
        ),
        (lambda qc: qc.__setitem__("format", None), r"quantization_config.format must be a string"),
        (
            lambda qc: qc.__setitem__("config_groups", []),
            r"quantization_config.config_groups must be",
        ),
        (lambda qc: qc.__setitem__("transform_config", {"x": 1}), r"transform_config"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, change, match):
    write_ct_checkpoint(tmp_path, llama(), "FP8_DYNAMIC")
    _edit_qc(tmp_path, change)
    with pytest.raises(ValueError, match=match):
        bitpress.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda qc: qc.__setitem__("weight_block_size", [64, 64]),
            r"weight_block_size must be \[128, 128\]",
        ),
        (
            lambda qc: qc.__setitem__("activation_scheme", "static"),
            r"activation_scheme must be 'dynamic'",
        ),
        (lambda qc: qc.__setitem__("fmt", "e5m2"), r"fmt must be 'e4m3'"),
    ],
)
def test_bad_block_configs(tmp_path, change, match):
    write_fp8_block_checkpoint(tmp_path, llama())
    _edit_qc(tmp_path, change)
    with pytest.raises(ValueError, match=match):
        bitpress.from_pretrained(tmp_path)


def test_block_scale_missing_names_it(tmp_path):
    write_fp8_block_checkpoint(tmp_path, llama())
    _edit(tmp_path, lambda t: t.pop(f"{L}.weight_scale_inv"))
    with pytest.raises(ValueError, match=rf"missing tensor '{L}.weight_scale_inv'"):
        bitpress.from_pretrained(tmp_path)


def test_compressed_tensors_decompressor_agrees(tmp_path):
    """compressed-tensors' FloatQuantizationCompressor on what bitpress writes."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import FloatQuantizationCompressor

    for granularity in ("tensor", "channel", "block"):
        model = llama(hidden=256, inter=384)  # whole 128 blocks: compressed-tensors needs them
        bitpress.quantize_(model, bitpress.Fp8Config(granularity, None))
        bitpress.save_pretrained(model, tmp_path / granularity)
        qc = json.loads((tmp_path / granularity / "config.json").read_text())["quantization_config"]
        weights = _group(qc)["weights"]
        files = safetensors_torch.load_file(tmp_path / granularity / "model.safetensors")
        for name, m in linears(model).items():
            data = {
                k.removeprefix(f"{name}."): v for k, v in files.items() if k.startswith(f"{name}.")
            }
            w = ct_decompress(FloatQuantizationCompressor, data, weights)
            assert torch.equal(w.float(), m.dequantize(torch.float32)), (granularity, name)


def ct_decompress(compressor, data: dict, weights: dict) -> torch.Tensor:
    """compressed-tensors' own decompression of one layer: the classmethod interface
    (``decompress(state_dict, scheme)``, >= 0.20) or the instance one (``decompress_weight``)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qargs = QuantizationArgs(**weights)
    if hasattr(compressor, "decompress_weight"):
        return compressor(config=None).decompress_weight(data, quantization_args=qargs)
    scheme = QuantizationScheme(targets=["Linear"], weights=qargs)
    return compressor.decompress(dict(data), scheme)["weight"]
