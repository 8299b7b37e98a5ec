"""A tiny transformers Llama (random weights) for the pipeline and report tests."""

from __future__ import annotations

import torch


def tiny_causal_lm(layers: int = 2, seed: int = 0, vocab: int = 64, max_positions: int = 256):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()
