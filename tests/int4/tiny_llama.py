"""A tiny seeded Llama (transformers) for the quantization and checkpoint tests, built locally:
nothing is downloaded."""

from __future__ import annotations

import copy

import torch

from bitpress.int4 import Int4Linear
from bitpress.int4.rtn import rtn_quantize

GS = 32


def tiny_llama(tie=False, seed=0, correlated=False, bias=False):
    """LlamaForCausalLM, float32, eval mode. ``correlated``: token embeddings mixed by a random
    matrix with uneven scales, so that layer inputs are correlated (what GPTQ exploits)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_bias=bias,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the default init (std 0.02) gives near-constant logits: spread them
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if correlated:
            A = torch.randn(64, 64, generator=g) / 8
            A *= torch.logspace(-1, 1, 64)[torch.randperm(64, generator=g)]
            model.model.embed_tokens.weight.copy_(torch.randn(256, 64, generator=g) @ A)
    return model


def linears(model):
    """Every nn.Linear but lm_head, by name."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    }


def set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_rtn(model, sym=True, group_size=GS):
    """(model with Int4Linear layers, dense reference holding the dequantized weights), float32."""
    ref = copy.deepcopy(model)
    for name, lin in linears(model).items():
        qw = rtn_quantize(lin.weight, group_size, sym)
        set_module(model, name, Int4Linear.from_quantized(qw, lin.bias, dtype=torch.float32))
        ref.get_submodule(name).weight.data = qw.dequantize()
    return model, ref


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()
