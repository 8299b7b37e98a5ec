"""GPTQ checkpoints bitpress writes, as other loaders read them: the default checkpoint_format
(v1 for symmetric, v2 for asymmetric, since GPTQModel refuses asymmetric v1 checkpoints it did
not produce), the meta.quantizer entry, and, where GPTQModel is installed, the round trip
through GPTQModel.load and transformers (skipped otherwise)."""

from __future__ import annotations

import json

import pytest
import torch

import bitpress
from bitpress.testing import rel_err

transformers = pytest.importorskip("transformers")

from tiny_llama import linears, logits, quantize_rtn, tiny_llama  # noqa: E402


def _qc(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


def _gptqmodel_would_refuse(qc: dict) -> bool:
    """GPTQModel's rule (models/loader.py): a sym=False checkpoint in format "gptq" (v1) loads
    only if meta.quantizer names gptqmodel >= 0.9.0 as its producer."""
    producers = [q.split(":")[0].lower() for q in qc.get("meta", {}).get("quantizer", [])]
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    return fmt == "gptq" and not qc.get("sym", True) and "gptqmodel" not in producers


@pytest.mark.parametrize("sym", [True, False])
def test_default_format_is_loadable_by_gptqmodel_rules(tmp_path, sym):
    model, ref = quantize_rtn(tiny_llama(), sym)
    bitpress.save_pretrained(model, tmp_path)
    qc = _qc(tmp_path)
    assert qc["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    assert not _gptqmodel_would_refuse(qc)
    (producer,) = qc["meta"]["quantizer"]
    assert producer.split(":")[0] == "bitpress" and len(producer.split(":")) == 2
    assert qc["pack_dtype"] == "int32"
    loaded = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    for name, lin in linears(ref).items():
        assert torch.equal(loaded.get_submodule(name).dequantize(torch.float32), lin.weight)


def test_explicit_v1_asymmetric_does_not_claim_another_producer(tmp_path):
    model, ref = quantize_rtn(tiny_llama(), sym=False)
    bitpress.save_pretrained(model, tmp_path, checkpoint_format="gptq")
    qc = _qc(tmp_path)
    assert qc["checkpoint_format"] == "gptq" and qc["sym"] is False
    assert _gptqmodel_would_refuse(qc)  # honest: GPTQModel's own rule refuses it
    assert (
        rel_err(logits(bitpress.from_pretrained(tmp_path, dtype=torch.float32)), logits(ref)) < 1e-5
    )


def test_pack_dtype_other_than_int32_is_refused(tmp_path):
    model, _ = quantize_rtn(tiny_llama(), sym=True)
    bitpress.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["pack_dtype"] = "int8"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quantization_config.pack_dtype must be 'int32'"):
        bitpress.from_pretrained(tmp_path)


def _save_tokenizer(path):
    """A word-level tokenizer over the tiny model's 256 ids (loaders want one in the folder)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(256)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2", bos_token="t3"
    )
    fast.save_pretrained(path)


@pytest.mark.parametrize("sym", [True, False])
def test_gptqmodel_loads_what_bitpress_saves(tmp_path, sym):
    """The producer check: GPTQModel's TORCH kernel on the CPU (fp16/bf16 only) gives the logits
    of bitpress's model. Skipped where GPTQModel is not installed."""
    gptqmodel = pytest.importorskip("gptqmodel")
    model, ref = quantize_rtn(tiny_llama(), sym)
    bitpress.save_pretrained(model, tmp_path)
    _save_tokenizer(tmp_path)
    g = gptqmodel.GPTQModel.load(
        str(tmp_path), backend=gptqmodel.BACKEND.TORCH, device="cpu", dtype=torch.bfloat16
    )
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = g.model(ids).logits.float()
    assert rel_err(got, logits(ref.bfloat16(), ids)) < 0.05


@pytest.mark.parametrize("sym", [True, False])
def test_transformers_loads_what_bitpress_saves(tmp_path, sym):
    """transformers' GPTQ integration (optimum + GPTQModel). Skipped without them."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    model, ref = quantize_rtn(tiny_llama(), sym)
    bitpress.save_pretrained(model, tmp_path)
    _save_tokenizer(tmp_path)
    t = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), device_map="cpu", dtype=torch.bfloat16
    )
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = t(ids).logits.float()
    assert rel_err(got, logits(ref.bfloat16(), ids)) < 0.05
