"""SpeculativeGenerator, greedy: token-identical to ``target.generate(do_sample=False)`` on tiny
random fp32 models of four families (Llama, Qwen2, Mistral, GPT-2), for every drafter, at batch 1
and at batch > 1 with left-padded prompts of different lengths; EOS and padding, adaptive K,
compaction, finished rows, statistics and the ``bitpress.generate`` shortcut."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, hf_greedy, perturbed, prompts, tiny_model

import bitpress
from bitpress.speculative import (
    Int4SelfDrafter,
    LayerSkipDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeGenerator,
)
from bitpress.speculative.drafters import SlotCache

VOCAB = 96
NEW = 16


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: two OpenMP threads on a shared two-core machine only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def targets():
    return {f: tiny_model(f, vocab=VOCAB) for f in FAMILIES}


def _drafter(kind, target):
    if kind == "model":
        return ModelDrafter(perturbed(target, noise=0.03))
    if kind == "prompt-lookup":
        return PromptLookupDrafter()
    if kind == "self-int4":
        return Int4SelfDrafter(target)
    if kind == "layer-skip":
        return LayerSkipDrafter(target, 2)
    raise ValueError(kind)


DRAFTERS = ("model", "prompt-lookup", "self-int4", "layer-skip")


@pytest.mark.parametrize("kind", DRAFTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_exact_batched(targets, family, kind):
    """Batch 4, prompts of 3..21 tokens (left padding): the same tokens as HF's generate."""
    target = targets[family]
    ids, mask = prompts(VOCAB, [12, 7, 21, 3], seed=1)
    ref = hf_greedy(target, ids, mask, NEW)
    gen = SpeculativeGenerator(target, _drafter(kind, target), num_draft=4)
    out = gen.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    st = out.stats
    assert torch.equal(st.new_tokens, torch.full((4,), NEW))
    assert (st.accepted <= st.proposed).all()
    # Every step emits a + 1 tokens (the last step may be cut at max_new_tokens).
    assert (st.accepted + st.steps >= st.new_tokens - 1).all()


@pytest.mark.parametrize("kind", DRAFTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_exact_batch1(targets, family, kind):
    target = targets[family]
    ids, mask = prompts(VOCAB, [10], seed=2)
    ref = hf_greedy(target, ids, mask, NEW)
    out = bitpress.generate(target, ids, draft=_drafter(kind, target), max_new_tokens=NEW)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_draft_accepted(targets, family):
    """The target as its own draft: every draft accepted, K + 1 tokens per step (bonus tokens;
    the draft's pending chunk holds two tokens every step)."""
    target = targets[family]
    ids, mask = prompts(VOCAB, [9, 4], seed=3)
    ref = hf_greedy(target, ids, mask, 21)
    out = SpeculativeGenerator(target, ModelDrafter(target), num_draft=4).generate(
        ids, mask, max_new_tokens=21, pad_token_id=0
    )
    assert torch.equal(out.sequences, ref)
    assert torch.equal(out.stats.accepted, out.stats.proposed)
    assert out.stats.steps.tolist() == [4, 4]  # 1 (prefill) + 4 x 5 tokens
    assert out.stats.totals()["alpha"] == 1.0


def test_eos_and_padding(targets):
    """Rows stop at their EOS and are padded like HF's output; finished rows leave the batch."""
    target = targets["llama"]
    ids, mask = prompts(VOCAB, [12, 7, 21, 3], seed=1)
    free = hf_greedy(target, ids, mask, NEW)
    eos = int(free[1, ids.shape[1] + 4])  # row 1 stops after 5 tokens (others maybe too)
    ref = hf_greedy(target, ids, mask, NEW, eos_token_id=eos, pad_token_id=95)
    gen = SpeculativeGenerator(target, ModelDrafter(perturbed(target, 0.03)), num_draft=3)
    out = gen.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=95)
    assert torch.equal(out.sequences, ref)
    assert int(out.stats.new_tokens[1]) <= 5
    assert (out.stats.k_history[-1] == -1).any() or out.stats.new_tokens.min() == NEW


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_adaptive_k(targets, family):
    target = targets[family]
    ids, mask = prompts(VOCAB, [12, 7, 21], seed=4)
    ref = hf_greedy(target, ids, mask, 24)
    gen = SpeculativeGenerator(target, Int4SelfDrafter(target), num_draft=6, adaptive=True)
    out = gen.generate(ids, mask, max_new_tokens=24, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    k = out.stats.k_history
    assert k.shape[1] == 3 and k.max() <= 6
    assert len(set(k[k >= 0].tolist())) > 1  # K changed over time


def test_compaction_keeps_exactness(targets, monkeypatch):
    """Compact after every step (dead slots gathered out): same tokens, and the caches were
    compacted (memory follows accepted tokens)."""
    monkeypatch.setattr(SlotCache, "MIN_DEAD", 0)
    monkeypatch.setattr(SlotCache, "COMPACT_RATIO", 0.0)
    target = targets["mistral"]
    ids, mask = prompts(VOCAB, [12, 7, 21, 3, 15], seed=5)
    ref = hf_greedy(target, ids, mask, NEW)
    gen = SpeculativeGenerator(target, ModelDrafter(perturbed(target, 0.05)), num_draft=4)
    out = gen.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    assert out.stats.extra["target_cache_compactions"] > 0
    assert out.stats.extra["draft_cache_compactions"] > 0


def test_slot_cache_memory_follows_accepted_tokens(targets):
    """After many steps with rejections, the cache holds the live tokens plus a bounded number of
    dead slots (cropping + compaction), not steps x K slots."""
    target = targets["llama"]
    ids, mask = prompts(VOCAB, [12, 7, 21, 3], seed=6)
    seen = []
    orig = SlotCache.maybe_compact

    def spy(self):
        r = orig(self)
        if self.model is target:
            seen.append((self.valid.shape, int(self.valid.sum()), int(self.valid.sum(1).max())))
        return r

    gen = SpeculativeGenerator(target, ModelDrafter(tiny_model("llama", vocab=VOCAB, seed=9)), 4)
    try:
        SlotCache.maybe_compact = spy
        out = gen.generate(ids, mask, max_new_tokens=48, pad_token_id=0)
    finally:
        SlotCache.maybe_compact = orig
    assert torch.equal(out.sequences, hf_greedy(target, ids, mask, 48))
    assert len(seen) >= 10
    for (B, L), live, longest in seen:
        # Either few dead slots, or just compacted (only the left padding of ragged rows left).
        assert B * L - live <= max(SlotCache.MIN_DEAD, SlotCache.COMPACT_RATIO * live) or (
            L == longest
        )


def test_stats_and_output(targets):
    target = targets["llama"]
    ids, mask = prompts(VOCAB, [8, 5], seed=7)
    seqs, st = bitpress.generate(target, ids, attention_mask=mask, draft="self-int4",
                                 max_new_tokens=10)  # fmt: skip
    assert seqs.shape == (2, ids.shape[1] + 10)
    t = st.totals()
    assert 0.0 <= t["alpha"] <= 1.0
    assert t["new_tokens"] == 20 and t["tokens_per_s"] > 0
    assert st.mean_accepted_length.shape == (2,)
    assert (st.target_forwards == st.steps + 1).all()
    assert "expected" in st.summary()


def test_draft_spec_strings(targets):
    target = targets["gpt2"]
    ids, mask = prompts(VOCAB, [8], seed=8)
    ref = hf_greedy(target, ids, mask, 8)
    for draft in ("prompt-lookup", "self-int4", "layer-skip:1", perturbed(target)):
        out = bitpress.generate(target, ids, draft=draft, max_new_tokens=8)
        assert torch.equal(out.sequences, ref), draft
    with pytest.raises(ValueError, match="draft must be"):
        bitpress.generate(target, ids, draft="nonsense")


def test_num_draft_zero_is_plain_decoding(targets):
    target = targets["qwen2"]
    ids, mask = prompts(VOCAB, [8, 3], seed=9)
    out = SpeculativeGenerator(target, PromptLookupDrafter(), num_draft=0).generate(
        ids, mask, max_new_tokens=6, pad_token_id=0
    )
    assert torch.equal(out.sequences, hf_greedy(target, ids, mask, 6))
    assert out.stats.proposed.sum() == 0


def test_streamer_gets_tokens_in_order(targets):
    target = targets["llama"]
    ids, mask = prompts(VOCAB, [8], seed=10)

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, t):
            self.chunks.append(t.reshape(-1).tolist())

        def end(self):
            self.ended = True

    s = Collect()
    out = bitpress.generate(target, ids, draft="self-int4", max_new_tokens=12, streamer=s)
    assert s.ended and s.chunks[0] == ids[0].tolist()
    assert sum(s.chunks[1:], []) == out.sequences[0, ids.shape[1] :].tolist()
    with pytest.raises(ValueError, match="batch 1"):
        bitpress.generate(target, ids.repeat(2, 1), draft="prompt-lookup", streamer=s)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_confidence_early_stop_stays_exact(targets, family):
    """ModelDrafter(confidence=...) stops a row's drafting after a doubtful token: fewer drafts,
    same tokens (greedy and the statistics' bookkeeping of ragged num_draft)."""
    target = targets[family]
    ids, mask = prompts(VOCAB, [12, 7, 21, 3], seed=11)
    ref = hf_greedy(target, ids, mask, NEW)
    draft = perturbed(target, noise=0.05)
    full = SpeculativeGenerator(target, ModelDrafter(draft), num_draft=6).generate(
        ids, mask, max_new_tokens=NEW, pad_token_id=0
    )
    early = SpeculativeGenerator(target, ModelDrafter(draft, confidence=0.6), num_draft=6)
    out = early.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(out.sequences, ref) and torch.equal(full.sequences, ref)
    assert out.stats.proposed.sum() < full.stats.proposed.sum()
