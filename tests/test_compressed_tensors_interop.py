"""compressed-tensors checkpoints against the real producer and consumers, skipped where they are
not installed (CI does not depend on them):

* checkpoints written by compressed-tensors' own ``ModelCompressor`` (llm-compressor's writer:
  presets FP8_DYNAMIC, FP8, FP8_BLOCK, W4A16, W4A16_ASYM, scales from its ``calculate_qparams``)
  load into bitpress with weights equal, bit for bit, to compressed-tensors' own decompression;
* checkpoints bitpress writes load in transformers (its compressed-tensors integration) and give
  bitpress's logits.
"""

from __future__ import annotations

import pytest
import torch

import bitpress
from bitpress.testing import rel_err

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

IDS = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=256,  # whole 128 x 128 blocks: compressed-tensors' block strategy needs them
        intermediate_size=384,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _produce(path, preset: str) -> dict[str, torch.Tensor]:
    """Write ``preset`` with compressed-tensors; returns its own decompression of every weight."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    model = _llama()
    qcfg = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=["lm_head"]
    )
    apply_quantization_config(model, qcfg)
    for name, m in model.named_modules():
        if not hasattr(m, "quantization_scheme") or name.endswith("lm_head"):
            continue
        args = m.quantization_scheme.weights
        w = m.weight.detach()
        N, K = w.shape
        if args.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif args.strategy == "group":
            g = w.reshape(N, K // args.group_size, args.group_size)
            lo, hi = g.amin(-1), g.amax(-1)
        else:
            b = w.reshape(N // 128, 128, K // 128, 128)
            lo, hi = b.amin((1, 3)), b.amax((1, 3))
        s, z = calculate_qparams(lo, hi, args)
        m.weight_scale.data = s.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
        if hasattr(m, "weight_zero_point"):
            zp = m.weight_zero_point
            zp.data = z.to(zp.dtype).reshape(zp.shape)
        if hasattr(m, "input_scale"):
            m.input_scale.data = torch.full_like(m.input_scale, 0.01)
        m.quantization_status = QuantizationStatus.FROZEN
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.config.save_pretrained(path)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    comp.update_config(str(path))
    comp.decompress_model(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".weight")}


EXPECT = {
    "FP8_DYNAMIC": (bitpress.Fp8Linear, ("channel", "dynamic")),
    "FP8": (bitpress.Fp8Linear, ("tensor", "static")),
    "FP8_BLOCK": (bitpress.Fp8Linear, ("block", "dynamic")),
    "W4A16": (bitpress.Int4Linear, (128, True)),
    "W4A16_ASYM": (bitpress.Int4Linear, (128, False)),
}


@pytest.mark.parametrize("preset", list(EXPECT))
def test_bitpress_loads_what_compressed_tensors_writes(tmp_path, preset):
    try:
        ref = _produce(tmp_path, preset)
    except (ImportError, AttributeError, TypeError) as e:  # another compressed-tensors API
        pytest.skip(f"compressed-tensors {ct.__version__}: {e}")
    model = bitpress.from_pretrained(tmp_path, dtype=torch.float32)
    kind, settings = EXPECT[preset]
    n = 0
    for key, w in ref.items():
        m = model.get_submodule(key.removesuffix(".weight"))
        if key.startswith("lm_head") or not isinstance(
            m, (bitpress.Fp8Linear, bitpress.Int4Linear)
        ):
            assert not isinstance(m, (bitpress.Fp8Linear, bitpress.Int4Linear)), key
            continue
        assert isinstance(m, kind), key
        got = (
            (m.granularity, m.activations) if kind is bitpress.Fp8Linear else (m.group_size, m.sym)
        )
        assert got == settings, key
        assert torch.equal(m.dequantize(torch.float32), w.float()), key
        n += 1
    assert n == 7
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize(
    "config",
    [
        bitpress.Fp8Config("channel", "dynamic"),
        bitpress.Fp8Config("tensor", "static", calibration=[IDS]),
        bitpress.Fp8Config("block", "dynamic"),
        bitpress.Fp8Config("channel", None),
        bitpress.Int4Config(group_size=128, sym=True),
    ],
    ids=["fp8-dynamic", "fp8-static", "fp8-block", "fp8-weight-only", "w4a16"],
)
def test_transformers_loads_what_bitpress_writes(tmp_path, config):
    """(transformers 5.24 with compressed-tensors 0.20.1 cannot load asymmetric pack-quantized
    checkpoints at all, compressed-tensors' own included: it expects unpacked zero points.)"""
    model = bitpress.quantize_(_llama(), config)
    bitpress.save_pretrained(model, tmp_path, quant_method="compressed-tensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, device_map="cpu"
    )
    with torch.no_grad():
        assert rel_err(theirs(IDS).logits, model(IDS).logits) < 1e-4
