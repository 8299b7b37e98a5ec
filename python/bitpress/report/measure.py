"""What the compression report measures: weight bytes, held-out perplexity and next-token
agreement of a causal LM, decode and prefill time of a model with real layer shapes (cold
weights), and speculative generation against plain generation.

Speed on a CPU is memory-bound in decode, so the weights must come from memory, not from a
cache that happens to hold a small model: :func:`flush_cache` evicts the last-level cache before
every timed call (a buffer twice its size, read and written), and only the call is timed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time

import torch
from torch import nn

from bitpress.speculative.generator import generate as speculative_generate


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model.state_dict()``: every weight as stored (what ``save_pretrained`` writes:
    packed INT4 / FP8 / 2:4 tensors with their scales, indices and metadata, and the layers that
    stay in floating point, embeddings and output head included)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclasses.dataclass
class Quality:
    perplexity: float
    agreement: float | None  # fraction of positions whose argmax equals the reference's
    argmax: torch.Tensor  # [n, T] the model's next-token argmax (the reference for others)


@torch.no_grad()
def quality(model: nn.Module, ids: torch.Tensor, ref_argmax: torch.Tensor | None = None, batch=16):
    """Perplexity of ``model`` on the token ids [n, T] (next-token cross-entropy over every
    position but the last of each row, exp of the mean) and, given the reference model's argmax
    [n, T], the fraction of positions where this model's argmax agrees with it."""
    nll, count, argmax = 0.0, 0, []
    for i in range(0, ids.shape[0], batch):
        chunk = ids[i : i + batch]
        logits = model(input_ids=chunk).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        nll -= lp.gather(-1, chunk[:, 1:, None]).sum().item()
        count += chunk[:, 1:].numel()
        argmax.append(logits.argmax(-1))
    argmax = torch.cat(argmax)
    agree = None if ref_argmax is None else (argmax == ref_argmax).float().mean().item()
    return Quality(math.exp(nll / count), agree, argmax)


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size from sysfs (Linux); 512 MiB when it cannot be read."""
    best = 0
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(root):
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or 512 * 2**20


class CacheFlusher:
    """Evicts the caches: reads and writes a buffer of twice the last-level cache."""

    def __init__(self, nbytes: int | None = None) -> None:
        n = nbytes if nbytes is not None else 2 * last_level_cache_bytes()
        self.buffer = torch.zeros(max(n // 4, 1), dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.add_(1.0)


@dataclasses.dataclass
class Speed:
    decode_ms: float  # median per generated token (batch 1, KV cache), cold weights
    prefill_ms: float  # best prompt pass of prompt_len tokens, cold weights


@torch.no_grad()
def speed(
    model: nn.Module,
    prompt_len: int,
    decode_tokens: int,
    repeats: int,
    flush: CacheFlusher,
    vocab: int,
) -> Speed:
    """Decode and prefill time of a causal LM on this device, batch 1.

    Prefill: the forward pass over a random prompt of ``prompt_len`` tokens that fills the KV
    cache (best of ``repeats``). Decode: one-token steps with the cache (greedy), median over
    ``repeats`` x ``decode_tokens`` steps. The caches are flushed before every timed call."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    model(input_ids=prompt[:, :8], use_cache=True)  # warm-up: first-use costs (repacks, tables)
    prefill, decode = [], []
    for _ in range(repeats):
        flush()
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill.append(time.perf_counter() - t0)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            flush()
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            decode.append(time.perf_counter() - t0)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
    return Speed(statistics.median(decode) * 1e3, min(prefill) * 1e3)


@dataclasses.dataclass
class SpecRun:
    tokens_per_s: float
    mean_accepted: float | None  # tokens per verification step (accepted drafts + 1)
    tokens: torch.Tensor  # [n_prompts, new_tokens] what was generated (checked against plain)


@torch.no_grad()
def plain_generation(model: nn.Module, prompts: list[torch.Tensor], new_tokens: int) -> SpecRun:
    """transformers' greedy ``generate`` (KV cache), batch 1 per prompt."""
    # An explicit attention mask: without one, transformers masks every prompt token equal to
    # pad_token_id as padding.
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run(p):
        return model.generate(p, attention_mask=torch.ones_like(p), **kw)[:, p.shape[1] :]

    run(prompts[0])  # warm-up
    t0 = time.perf_counter()
    out = [run(p) for p in prompts]
    seconds = time.perf_counter() - t0
    return SpecRun(len(prompts) * new_tokens / seconds, None, torch.cat(out))


@torch.no_grad()
def speculative_generation(
    model: nn.Module, prompts: list[torch.Tensor], new_tokens: int, draft, num_draft: int = 4
) -> SpecRun:
    """bitpress's speculative generator with ``draft`` (a causal LM or a drafter name), greedy,
    batch 1 per prompt; the mean accepted length is over every verification step."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False)
    speculative_generate(model, prompts[0], draft=draft, num_draft=num_draft, **kw)  # warm-up
    out, accepted, steps = [], 0, 0
    t0 = time.perf_counter()
    for p in prompts:
        res = speculative_generate(model, p, draft=draft, num_draft=num_draft, **kw)
        out.append(res.sequences[:, p.shape[1] :])
        accepted += int(res.stats.accepted.sum())
        steps += int(res.stats.steps.sum())
    seconds = time.perf_counter() - t0
    tokens = torch.cat(out)
    # Tokens per verification step: the accepted drafts plus the target's own token.
    return SpecRun(tokens.numel() / seconds, (accepted + steps) / max(steps, 1), tokens)
