"""Tiny random causal LMs of four transformers families (Llama, Qwen2, Mistral, GPT-2), built
locally from configs (nothing is downloaded), float32, eval mode, and a draft for each.

The default init (std 0.02) gives nearly flat logits, where argmax ties decided by rounding would
make exactness tests flaky: the weights are spread (std ``scale``) so that the logits are well
separated.
"""

from __future__ import annotations

import copy

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


def _config(family: str, vocab: int, hidden: int, layers: int, heads: int):
    import transformers

    common = dict(vocab_size=vocab, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, **common
        )
    kw = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **common,
    )
    if family == "llama":
        return transformers.LlamaConfig(**kw)
    if family == "qwen2":
        return transformers.Qwen2Config(**kw)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, **kw)
    raise ValueError(f"unknown family {family!r}")


def tiny_model(
    family: str = "llama",
    vocab: int = 96,
    hidden: int = 64,
    layers: int = 3,
    heads: int = 4,
    seed: int = 0,
    scale: float = 0.12,
):
    """A seeded random causal LM of ``family`` (see FAMILIES), float32, eval mode."""
    import transformers

    cfg = _config(family, vocab, hidden, layers, heads)
    seed += 1000 * FAMILIES.index(family)  # different weights per family
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):  # biases: Qwen2's q/k/v, GPT-2's
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def perturbed(model, noise: float = 0.02, seed: int = 1):
    """A copy of ``model`` with Gaussian noise added to every matrix: a draft that agrees with the
    target often but not always (exercises partial acceptance and corrections)."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return draft


def prompts(vocab: int, lengths, seed: int = 0, repeat: bool = True):
    """Left-padded prompts of the given lengths: (input_ids [B, T], attention_mask [B, T]).
    ``repeat``: each prompt repeats a short random phrase (gives prompt lookup matches)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if repeat:
            phrase = torch.randint(0, vocab, (5,), generator=g)
            row = phrase.repeat(n // 5 + 1)[:n]
            row[torch.randint(0, n, (max(1, n // 6),), generator=g)] = torch.randint(
                0, vocab, (max(1, n // 6),), generator=g
            )
        else:
            row = torch.randint(0, vocab, (n,), generator=g)
        ids[b, T - n :] = row
        mask[b, T - n :] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, eos_token_id=None, pad_token_id=0):
    """``model.generate(do_sample=False)``: the reference of the exactness tests."""
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
