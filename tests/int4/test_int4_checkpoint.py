"""GPTQ checkpoint directories: bitpress.save_pretrained / bitpress.from_pretrained on a tiny
Llama built here, a checkpoint written by hand the way AutoGPTQ's pack() writes it, sharding,
tied embeddings, and the error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bitpress
from bitpress.checkpoint import parse_quantization_config
from bitpress.int4 import Int4Linear
from bitpress.testing import rel_err

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tiny_llama import GS, logits, quantize_rtn, tiny_llama  # noqa: E402
from tiny_llama import linears as _linears  # noqa: E402


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
def test_save_load_matches_dequantized_reference(tmp_path, fmt, sym):
    model, ref = quantize_rtn(tiny_llama(), sym)
    bitpress.save_pretrained(model, tmp_path, checkpoint_format=fmt)
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["bits"] == 4 and qc["group_size"] == GS and qc["sym"] == sym
    assert qc["checkpoint_format"] == fmt and qc["desc_act"] is False
    assert json.loads((tmp_path / "quantize_config.json").read_text()) == qc
    files = safetensors_torch.load_file(tmp_path / "model.safetensors")
    q_proj = files["model.layers.0.self_attn.q_proj.qzeros"]
    assert q_proj.dtype == torch.int32 and list(q_proj.shape) == [2, 8]
    if sym:
        expect = 0x77777777 if fmt == "gptq" else 0x88888888 - 2**32
        assert (q_proj == expect).all()
    assert files["model.layers.0.mlp.down_proj.qweight"].shape == (128 // 8, 64)
    assert files["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16

    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(loaded.model.layers[1].mlp.gate_proj, Int4Linear)
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    for name, m in _linears(ref).items():
        got = loaded.get_submodule(name)
        assert torch.equal(got.dequantize(torch.float32), m.weight), name
    assert rel_err(logits(loaded), logits(ref)) < 1e-5


def test_reload_is_bit_identical_sharded_and_tied(tmp_path):
    model, _ = quantize_rtn(tiny_llama(tie=True), sym=False)
    bitpress.save_pretrained(model, tmp_path / "a")
    a = bitpress.from_pretrained(tmp_path / "a")  # float16, as stored
    assert a.lm_head.weight is a.model.embed_tokens.weight
    bitpress.save_pretrained(a, tmp_path / "b", max_shard_size="20KB")
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "b" / "model.safetensors").exists()
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once
    b = bitpress.from_pretrained(tmp_path / "b")
    assert b.lm_head.weight is b.model.embed_tokens.weight
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert torch.equal(logits(a), logits(b))
    # Saving unsharded into the same directory removes the stale shards and index.
    bitpress.save_pretrained(b, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "config.json",
        "model.safetensors",
        "quantize_config.json",
    ]
    assert torch.equal(logits(bitpress.from_pretrained(tmp_path / "b")), logits(a))


def test_tied_config_but_checkpoint_has_its_own_lm_head(tmp_path):
    model, _ = quantize_rtn(tiny_llama(tie=True))
    bitpress.save_pretrained(model, tmp_path)
    t = safetensors_torch.load_file(tmp_path / "model.safetensors")
    t["lm_head.weight"] = torch.randn(256, 64).half()
    safetensors_torch.save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = bitpress.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, t["lm_head.weight"])
    assert torch.equal(loaded.model.embed_tokens.weight, t["model.embed_tokens.weight"].half())


def test_several_safetensors_without_index(tmp_path):
    model, ref = quantize_rtn(tiny_llama())
    bitpress.save_pretrained(model, tmp_path)
    t = safetensors_torch.load_file(tmp_path / "model.safetensors")
    keys = sorted(t)
    (tmp_path / "model.safetensors").unlink()
    safetensors_torch.save_file({k: t[k] for k in keys[::2]}, tmp_path / "part1.safetensors")
    safetensors_torch.save_file({k: t[k] for k in keys[1::2]}, tmp_path / "part2.safetensors")
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    assert rel_err(logits(loaded), logits(ref)) < 1e-5


def test_gptq_act_order_model_round_trip(tmp_path):
    from bitpress.int4.gptq import gptq_quantize_model

    model = tiny_llama(correlated=True)
    calib = [
        torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    gptq_quantize_model(model, calib, group_size=GS, sym=False, act_order=True)
    bitpress.save_pretrained(model.half(), tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["sym"] is False
    loaded = bitpress.from_pretrained(tmp_path)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    g_idx = q_proj.quantized().g_idx
    assert bool((g_idx[1:] < g_idx[:-1]).any())  # act-order: not monotonic
    assert torch.equal(g_idx, loaded.state_dict()["model.layers.0.self_attn.q_proj.g_idx"].cpu())
    assert q_proj.packed_perm is not None  # the kernel layout holds the row permutation
    sa, sb = model.state_dict(), loaded.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # Not bit-identical logits: model.half() also cast the RoPE inv_freq buffer (not saved),
    # which from_pretrained keeps in float32 as transformers does.
    assert rel_err(logits(loaded), logits(model)) < 2e-3


# --------------------------------------------------------------------------------------------
# A checkpoint written by hand, as AutoGPTQ's QuantLinear.pack() writes it (numpy uint32 words)
# --------------------------------------------------------------------------------------------


def _autogptq_pack(q: np.ndarray, zeros: np.ndarray, v1: bool):
    """q [K, N] and real zeros [G, N] (uint32) -> (qweight [K/8, N], qzeros [G, N/8]) int32."""
    K, N = q.shape
    qweight = np.zeros((K // 8, N), dtype=np.uint32)
    for row in range(K // 8):
        for j in range(8):
            qweight[row] |= q[8 * row + j] << np.uint32(4 * j)
    z = (zeros - 1) if v1 else zeros  # AutoGPTQ: zeros -= 1 (real zeros here are >= 1)
    qzeros = np.zeros((z.shape[0], N // 8), dtype=np.uint32)
    for col in range(N // 8):
        for j in range(8):
            qzeros[:, col] |= z[:, 8 * col + j] << np.uint32(4 * j)
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def write_hand_checkpoint(path, *, sym, fmt, desc_act, config_in):
    """Returns the dense float32 reference model that the checkpoint represents."""
    model = tiny_llama(seed=3)
    rng = np.random.default_rng(11)
    tensors = {}
    for name, lin in _linears(model).items():
        K, N = lin.in_features, lin.out_features
        G = K // GS
        q = rng.integers(0, 16, (K, N)).astype(np.uint32)
        zeros = (
            np.full((G, N), 8, np.uint32) if sym else rng.integers(1, 16, (G, N)).astype(np.uint32)
        )
        scales = torch.from_numpy(rng.uniform(0.005, 0.03, (G, N))).half()
        g_idx = np.arange(K) // GS
        if desc_act:
            g_idx = g_idx[rng.permutation(K)]
        qweight, qzeros = _autogptq_pack(q, zeros, v1=fmt == "gptq")
        tensors[f"{name}.qweight"] = qweight
        tensors[f"{name}.qzeros"] = qzeros
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        # Older AutoGPTQ writes a (zero) bias for bias-free layers.
        tensors[f"{name}.bias"] = torch.zeros(N, dtype=torch.float16)
        w = (q.astype(np.float64) - zeros[g_idx].astype(np.float64)) * scales.double().numpy()[
            g_idx
        ]
        lin.weight.data = torch.from_numpy(w.T).float()
    for k, v in model.state_dict().items():
        if not any(k.startswith(n + ".") for n in _linears(model)):
            tensors[k] = v.half()
            model.get_parameter(k).data = v.half().float()
    safetensors_torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_dict()
    qc = {"bits": 4, "group_size": GS, "damp_percent": 0.01, "desc_act": desc_act}
    qc.update({"static_groups": False, "true_sequential": True, "model_file_base_name": "model"})
    if not sym:
        qc["sym"] = False  # sym missing from the config means True
    if fmt != "gptq":
        qc["checkpoint_format"] = fmt
    if config_in == "config.json":
        cfg["quantization_config"] = {"quant_method": "gptq", **qc}
    else:
        (path / "quantize_config.json").write_text(json.dumps(qc))
    (path / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize(
    "sym, fmt, desc_act, config_in",
    [
        (True, "gptq", True, "quantize_config.json"),  # AutoGPTQ act-order checkpoint
        (False, "gptq", False, "config.json"),  # optimum / transformers
        (False, "gptq_v2", True, "config.json"),  # GPTQModel v2
    ],
)
def test_hand_written_autogptq_checkpoint(tmp_path, sym, fmt, desc_act, config_in):
    ref = write_hand_checkpoint(tmp_path, sym=sym, fmt=fmt, desc_act=desc_act, config_in=config_in)
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    qc = loaded.config.quantization_config
    assert (qc["sym"], qc["checkpoint_format"], qc["desc_act"]) == (sym, fmt, desc_act)
    for name, m in _linears(ref).items():
        got = loaded.get_submodule(name)
        assert isinstance(got, Int4Linear) and got.sym == sym
        assert torch.equal(got.dequantize(torch.float32), m.weight), name
    assert rel_err(logits(loaded), logits(ref)) < 1e-5
    # Writing it back in the same convention reproduces the words.
    bitpress.save_pretrained(loaded.half(), tmp_path / "out", checkpoint_format=fmt)
    orig = safetensors_torch.load_file(tmp_path / "model.safetensors")
    new = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    for k in orig:
        if k.endswith((".qweight", ".qzeros", ".g_idx", ".scales")):
            assert torch.equal(orig[k], new[k]), k
    assert new["model.layers.0.self_attn.q_proj.g_idx"].dtype == torch.int32


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model, _ = quantize_rtn(tiny_llama())
    bitpress.save_pretrained(model, tmp_path)
    return tmp_path


def _edit_tensors(path, fn):
    t = safetensors_torch.load_file(path / "model.safetensors")
    fn(t)
    safetensors_torch.save_file(t, path / "model.safetensors", metadata={"format": "pt"})


def _edit_qc(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_quantized_tensor(saved):
    _edit_tensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros"))
    with pytest.raises(
        ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.qzeros'.*\[2, 16\]"
    ):
        bitpress.from_pretrained(saved)


def test_linear_bias_saved_loaded_and_required(tmp_path):
    model, ref = quantize_rtn(tiny_llama(bias=True))
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    bitpress.save_pretrained(model, tmp_path)
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    assert rel_err(logits(loaded), logits(ref)) < 1e-5
    _edit_tensors(tmp_path, lambda t: t.pop("model.layers.1.self_attn.v_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.self_attn.v_proj.bias'"):
        bitpress.from_pretrained(tmp_path)


def test_missing_plain_tensor(saved):
    _edit_tensors(saved, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.norm.weight'.*\[64\]"):
        bitpress.from_pretrained(saved)


def test_missing_lm_head_when_not_tied(saved):
    _edit_tensors(saved, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'lm_head.weight'.*\[256, 64\]"):
        bitpress.from_pretrained(saved)


def test_misshaped_tensors(saved):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.scales"] = t["model.layers.0.self_attn.k_proj.scales"][
            :1
        ]

    _edit_tensors(saved, shrink)
    with pytest.raises(
        ValueError,
        match=r"'model.layers.0.self_attn.k_proj.scales' has shape \[1, 32\], expected \[2, 32\]",
    ):
        bitpress.from_pretrained(saved)


def test_misshaped_plain_tensor(saved):
    _edit_tensors(saved, lambda t: t.update({"model.norm.weight": torch.ones(65).half()}))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \[65\], expected \[64\]"):
        bitpress.from_pretrained(saved)


def test_wrong_dtype(saved):
    key = "model.layers.0.mlp.gate_proj.qweight"
    _edit_tensors(saved, lambda t: t.update({key: t[key].long()}))
    with pytest.raises(ValueError, match=rf"'{key}' has dtype int64, expected int32"):
        bitpress.from_pretrained(saved)


def test_unexpected_tensor(saved):
    _edit_tensors(saved, lambda t: t.update({"model.layers.0.mlp.extra": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"no place for: \['model.layers.0.mlp.extra'\]"):
        bitpress.from_pretrained(saved)


def test_qweight_for_a_module_that_is_not_linear(saved):
    _edit_tensors(saved, lambda t: t.update({"model.norm.qweight": torch.zeros(8, 64).int()}))
    with pytest.raises(ValueError, match=r"'model.norm.qweight' has no nn.Linear 'model.norm'"):
        bitpress.from_pretrained(saved)


def test_old_rotary_inv_freq_is_ignored(saved):
    """Checkpoints written by older transformers hold each layer's RoPE ``inv_freq`` buffer: it is
    not an unexpected tensor, and it is ignored (a garbage value changes nothing)."""
    clean = bitpress.from_pretrained(saved)
    key = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _edit_tensors(saved, lambda t: t.update({key: torch.full((8,), 123.0)}))
    assert key in safetensors_torch.load_file(saved / "model.safetensors")
    loaded = bitpress.from_pretrained(saved)  # no "no place for" ValueError
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, Int4Linear)
    assert not any(k.endswith("rotary_emb.inv_freq") for k in loaded.state_dict())
    assert torch.equal(logits(loaded), logits(clean))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(bits=8), r"quantization_config.bits must be 4.*got 8"),
        (dict(quant_method="awq"), r"quant_method must be .*'gptq'.* got 'awq'"),
        (dict(quant_method="bitsandbytes"), r"quant_method must be .*'gptq'.* got 'bitsandbytes'"),
        (dict(group_size=12), r"group_size must be -1 or a positive multiple of 8, got 12"),
        (dict(checkpoint_format="marlin"), r"checkpoint_format must be one of .* got 'marlin'"),
        (dict(sym="yes"), r"sym must be true or false"),
        (dict(dynamic={"-:.*": {}}), r"dynamic"),
    ],
)
def test_unsupported_config(saved, changes, match):
    _edit_qc(saved, **changes)
    with pytest.raises(ValueError, match=match):
        bitpress.from_pretrained(saved)


def test_group_size_that_disagrees_with_tensors(saved):
    _edit_qc(saved, group_size=64)
    with pytest.raises(ValueError, match=r"'model.layers.0.\S+' has shape \[\d+, \d+\], expected"):
        bitpress.from_pretrained(saved)


def test_no_quantization_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["quantization_config"]
    (saved / "config.json").write_text(json.dumps(cfg))
    (saved / "quantize_config.json").unlink()
    with pytest.raises(ValueError, match="no quantization config"):
        bitpress.from_pretrained(saved)


def test_quantize_config_json_alone_is_enough(saved):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["quantization_config"]
    (saved / "config.json").write_text(json.dumps(cfg))
    assert isinstance(bitpress.from_pretrained(saved).model.layers[0].mlp.up_proj, Int4Linear)
    (saved / "quantize_config.json").write_text(json.dumps({"bits": 3, "group_size": 32}))
    with pytest.raises(ValueError, match=r"quantize_config.json.bits must be 4"):
        bitpress.from_pretrained(saved)


def test_sharded_index_pointing_at_missing_file(tmp_path):
    model, _ = quantize_rtn(tiny_llama())
    bitpress.save_pretrained(model, tmp_path, max_shard_size=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard '{victim}'.* does not exist"):
        bitpress.from_pretrained(tmp_path)


def test_safetensors_only(tmp_path):
    model, _ = quantize_rtn(tiny_llama())
    bitpress.save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        bitpress.from_pretrained(tmp_path)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no quantized layer \(.*Int4Linear"):
        bitpress.save_pretrained(tiny_llama(), tmp_path)
    model, _ = quantize_rtn(tiny_llama())
    with pytest.raises(ValueError, match="checkpoint_format"):
        bitpress.save_pretrained(model, tmp_path, checkpoint_format="awq")
    with pytest.raises(ValueError, match="max_shard_size"):
        bitpress.save_pretrained(model, tmp_path, max_shard_size="lots")
    lin = model.model.layers[0].mlp.up_proj
    lin.group_size = 64
    with pytest.raises(ValueError, match="share group_size and sym"):
        bitpress.save_pretrained(model, tmp_path, quant_method="gptq")


def test_parse_quantization_config_defaults():
    qc = parse_quantization_config({"bits": 4, "group_size": -1})
    assert qc == dict(
        bits=4,
        group_size=-1,
        desc_act=False,
        sym=True,
        checkpoint_format="gptq",
        quant_method="gptq",
    )
    assert parse_quantization_config({"bits": 4, "format": "gptq_v2"})["checkpoint_format"] == (
        "gptq_v2"
    )
