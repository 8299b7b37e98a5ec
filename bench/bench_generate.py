"""Speculative generation (bitpress.speculative.SpeculativeGenerator) against the target alone
(``target.generate``) and against transformers' assisted generation (``assistant_model=``) with
the same draft, greedy, 128 new tokens, on the CPU, baselines in the same run.

Models (built and trained here, cached under build/; nothing is downloaded), byte-level (256
tokens), trained on the source of Python's standard library like the demo's:

* target: a Llama-architecture model, 1024 wide, 6 layers (68 M parameters, 272 MB in fp32): at
  batch 1 a decode step reads every weight, so the forward pass, not Python, dominates;
* draft: the demo's model (``bitpress.demo.trained_model``: 256 wide, 4 layers, 3.4 M), trained
  on the same text, and the same draft distilled on the target's soft targets
  (``bitpress.speculative.distill_draft``);
* model-free / self drafts: prompt lookup, the target in INT4 (``self-int4``), the target's
  first 2 layers (``layer-skip:2``).

Prompts: held-out standard-library text (bitpress.demo.HELD_OUT_MODULES). Every speculative
output is checked token for token against ``target.generate`` in the same run.

Threads: ``BENCH_THREADS`` (default: torch's). On a two-core machine shared with other jobs,
two OpenMP threads can be an order of magnitude slower than one; bench/NOTES_generate.md says
which was used.

Run: ``pytest bench/bench_generate.py --benchmark-only -s``.
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
from bench_util import Row, record

from bitpress import demo
from bitpress.speculative import (
    Int4SelfDrafter,
    LayerSkipDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeGenerator,
    distill_draft,
)

CACHE = os.path.join("build", "bench_generate")
NEW_TOKENS = 128
TARGET_STEPS = 120
DISTILL_STEPS = 80
THREADS = int(os.environ.get("BENCH_THREADS", "0")) or torch.get_num_threads()
PROMPT_LEN = 64


def build_target(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=6,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _train_batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (n, batch), generator=g)
    return [torch.stack([data[s : s + seq] for s in row]) for row in starts]


def trained_target(train: torch.Tensor, steps: int = TARGET_STEPS, log=print):
    """The target, trained ``steps`` AdamW steps of 8 x 64 bytes (cached)."""
    path = os.path.join(CACHE, f"target-1024x6-{steps}.pt")
    model = build_target()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    log(f"training the bench target ({steps} steps; cached in {path})")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    model.train()
    t0 = time.time()
    for step, ids in enumerate(_train_batches(train, steps, 8, 64, 1)):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def distilled_draft(draft, target, train: torch.Tensor, steps: int = DISTILL_STEPS, log=print):
    """A copy of ``draft`` distilled on ``target`` (T = 2, alpha = 0.9; cached)."""
    path = os.path.join(CACHE, f"draft-distilled-{steps}.pt")
    d = copy.deepcopy(draft)
    if os.path.exists(path):
        d.load_state_dict(torch.load(path, weights_only=True))
        return d.eval()
    log(f"distilling the draft on the target ({steps} steps; cached in {path})")
    batches = _train_batches(train, steps, 8, 64, 2)
    distill_draft(d, target, batches, steps, temperature=2.0, alpha=0.9, lr=5e-4, log=log)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(d.state_dict(), path)
    return d.eval()


def models(log=print):
    torch.set_num_threads(THREADS)
    train = torch.frombuffer(bytearray(demo._text(demo.TRAIN_MODULES)), dtype=torch.uint8).long()
    target = trained_target(train, log=log)
    draft = demo.trained_model(train, 300, log=log)
    distilled = distilled_draft(draft, target, train, log=log)
    for m in (target, draft, distilled):
        m.generation_config.eos_token_id = None  # 128 tokens in every run
        m.generation_config.pad_token_id = 0
    return target, draft, distilled


def prompts(batch: int):
    held = torch.frombuffer(bytearray(demo._text(demo.HELD_OUT_MODULES)), dtype=torch.uint8)
    held = held.long()
    starts = [1000 + 3000 * i for i in range(batch)]
    lens = [PROMPT_LEN - 4 * (i % 4) for i in range(batch)]  # ragged: left padding
    ids = torch.zeros(batch, PROMPT_LEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (s, n) in enumerate(zip(starts, lens, strict=True)):
        ids[b, PROMPT_LEN - n :] = held[s : s + n]
        mask[b, PROMPT_LEN - n :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def setup():
    target, draft, distilled = models()
    return {"target": target, "draft": draft, "distilled": distilled, "baseline": {}}


def _paired(base_fn, fn, rounds=3):
    """Best-of-``rounds`` seconds of the baseline and of the candidate, measured alternately (the
    machine is shared: load changes within seconds, so both see the same conditions), and the
    last outputs of both."""
    best_b = best = float("inf")
    out_b = out = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out_b = base_fn()
        best_b = min(best_b, time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best_b, best, out_b, out


def _hf(target, ids, mask, **kw):
    with torch.no_grad():
        return target.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, **kw
        )


def _warm(setup, batch):
    if batch not in setup["baseline"]:
        ids, mask = prompts(batch)
        _hf(setup["target"], ids[:, -8:], mask[:, -8:])
        setup["baseline"][batch] = True


def _drafter(kind, setup, confidence=None):
    t = setup["target"]
    return {
        "draft": lambda: ModelDrafter(setup["draft"], confidence=confidence),
        "distilled": lambda: ModelDrafter(setup["distilled"], confidence=confidence),
        "prompt-lookup": lambda: PromptLookupDrafter(),
        "self-int4": lambda: Int4SelfDrafter(t),
        "layer-skip:2": lambda: LayerSkipDrafter(t, 2),
    }[kind]()


def _generator(setup, kind, K, adaptive=False, confidence=None):
    drafter = _drafter(kind, setup, confidence)
    return SpeculativeGenerator(setup["target"], drafter, num_draft=K, adaptive=adaptive)


def _name(kind, K, adaptive, confidence):
    return (
        f"{kind} K={K}"
        + (" adaptive" if adaptive else "")
        + (f" conf={confidence}" if confidence else "")
    )


def _report(benchmark, setup, case, seconds, batch, base_s, stats=None, base="target.generate"):
    """One result row. Bytes: the target's weights (read once per target forward pass), so the
    floor column is one forward pass at the measured read bandwidth."""
    nbytes = sum(p.numel() * p.element_size() for p in setup["target"].parameters())
    row = Row("generate", case, seconds, nbytes, 0, base, base_s)
    record(row, benchmark)
    tok_s = batch * NEW_TOKENS / seconds
    line = f"[generate] {case}: {tok_s:.1f} tokens/s, {base_s / seconds:.2f}x {base}"
    if stats is not None:
        tt = stats.totals()
        benchmark.extra_info.update({k: round(v, 4) for k, v in tt.items()})
        line += (
            f"; alpha {tt['alpha']:.3f}, accepted length {tt['mean_accepted_length']:.2f} "
            f"(expected {tt['expected_accepted_length']:.2f}), {tt['target_forwards']} target "
            "forwards"
        )
    print(line)


# (drafter, K, adaptive, confidence threshold of the model draft)
BATCH1 = [
    ("draft", 4, False, None),
    ("distilled", 4, False, None),
    ("prompt-lookup", 4, False, None),
    ("self-int4", 4, False, None),
    ("layer-skip:2", 4, False, None),
    ("draft", 8, False, None),
    ("distilled", 8, False, None),
    ("draft", 16, True, 0.4),
]


@pytest.mark.parametrize("kind,K,adaptive,conf", BATCH1, ids=lambda v: str(v))
def bench_generate_batch1(benchmark, setup, kind, K, adaptive, conf):
    ids, mask = prompts(1)
    _warm(setup, 1)
    gen = _generator(setup, kind, K, adaptive, conf)
    gen.generate(ids[:, -8:], mask[:, -8:], max_new_tokens=8)  # warm-up
    benchmark.group = "generate B=1"
    base_s, s, ref, out = _paired(
        lambda: _hf(setup["target"], ids, mask),
        lambda: gen.generate(ids, mask, max_new_tokens=NEW_TOKENS),
        rounds=2,
    )
    benchmark.pedantic(lambda: None, rounds=1)
    assert torch.equal(out.sequences, ref), kind
    _report(benchmark, setup, f"B=1 {_name(kind, K, adaptive, conf)}", s, 1, base_s, out.stats)


@pytest.mark.parametrize("kind", ["draft", "distilled"])
def bench_generate_assisted_hf(benchmark, setup, kind):
    """transformers' assisted generation with the same draft (its default schedule: 20 draft
    tokens to start, +2 after a fully accepted step, -1 otherwise; confidence threshold 0.4)."""
    ids, mask = prompts(1)
    _warm(setup, 1)
    assistant = setup[kind]
    _hf(setup["target"], ids[:, -8:], mask[:, -8:], assistant_model=assistant)
    base_s, s, ref, out = _paired(
        lambda: _hf(setup["target"], ids, mask),
        lambda: _hf(setup["target"], ids, mask, assistant_model=assistant),
        rounds=2,
    )
    benchmark.group = "generate B=1"
    benchmark.pedantic(lambda: None, rounds=1)
    assert torch.equal(out, ref)
    _report(benchmark, setup, f"B=1 HF assisted ({kind})", s, 1, base_s)


VS_ASSISTED = [
    ("draft", 8, False, None),
    ("draft", 16, True, 0.4),
    ("draft", 48, True, 0.4),
    ("distilled", 8, False, None),
]


@pytest.mark.parametrize("kind,K,adaptive,conf", VS_ASSISTED, ids=lambda v: str(v))
def bench_generate_vs_assisted(benchmark, setup, kind, K, adaptive, conf):
    """bitpress against transformers' assisted generation with the same draft, measured
    alternately (the baseline column is assisted generation here)."""
    ids, mask = prompts(1)
    _warm(setup, 1)
    assistant = setup[kind]
    gen = _generator(setup, kind, K, adaptive, conf)
    gen.generate(ids[:, -8:], mask[:, -8:], max_new_tokens=8)
    _hf(setup["target"], ids[:, -8:], mask[:, -8:], assistant_model=assistant)
    base_s, s, ref, out = _paired(
        lambda: _hf(setup["target"], ids, mask, assistant_model=assistant),
        lambda: gen.generate(ids, mask, max_new_tokens=NEW_TOKENS),
        rounds=3,
    )
    benchmark.group = "generate B=1 vs assisted"
    benchmark.pedantic(lambda: None, rounds=1)
    assert torch.equal(out.sequences, ref)
    name = f"B=1 {_name(kind, K, adaptive, conf)}"
    _report(benchmark, setup, name, s, 1, base_s, out.stats, base=f"HF assisted ({kind})")


BATCH8 = [
    ("distilled", 4, False, None),
    ("draft", 8, True, 0.4),
    ("prompt-lookup", 4, False, None),
]


@pytest.mark.parametrize("kind,K,adaptive,conf", BATCH8, ids=lambda v: str(v))
def bench_generate_batch8(benchmark, setup, kind, K, adaptive, conf):
    ids, mask = prompts(8)
    _warm(setup, 8)
    gen = _generator(setup, kind, K, adaptive, conf)
    gen.generate(ids[:, -8:], mask[:, -8:], max_new_tokens=8)
    benchmark.group = "generate B=8"
    base_s, s, ref, out = _paired(
        lambda: _hf(setup["target"], ids, mask),
        lambda: gen.generate(ids, mask, max_new_tokens=NEW_TOKENS),
        rounds=2,
    )
    benchmark.pedantic(lambda: None, rounds=1)
    assert torch.equal(out.sequences, ref), kind
    _report(benchmark, setup, f"B=8 {_name(kind, K, adaptive, conf)}", s, 8, base_s, out.stats)
