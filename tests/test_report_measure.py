"""bitpress.report.measure: perplexity / agreement, weight bytes, cold timing, generation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_causal_lm import tiny_causal_lm

import bitpress
from bitpress.report import measure

transformers = pytest.importorskip("transformers")


def _tiny(layers=2, seed=0):
    return tiny_causal_lm(layers, seed)


def _ids(n=5, t=24, seed=1):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def test_quality_perplexity_is_exp_of_the_models_own_loss():
    model, ids = _tiny(), _ids()
    q = measure.quality(model, ids, batch=2)  # batches of 2, 2 and 1 rows: counts per token
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert q.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert q.agreement is None and q.argmax.shape == ids.shape


def test_quality_agreement_counts_equal_argmaxes():
    model, ids = _tiny(), _ids()
    ref = measure.quality(model, ids)
    assert measure.quality(model, ids, ref.argmax).agreement == 1.0
    other = ref.argmax.clone()
    other[0, :6] = (other[0, :6] + 1) % 64
    assert measure.quality(model, ids, other).agreement == pytest.approx(1 - 6 / ids.numel())


def test_weight_bytes_follows_the_state_dict():
    model = _tiny()
    fp32 = measure.weight_bytes(model)
    assert fp32 == 4 * sum(p.numel() for p in model.parameters())
    q = bitpress.quantize_(_tiny(), bitpress.Int4Config(group_size=32))
    # INT4 Linear layers: a quarter of a byte... of fp32's four, plus scales; the rest fp32.
    assert measure.weight_bytes(q) < 0.6 * fp32


def test_last_level_cache_and_flusher():
    n = measure.last_level_cache_bytes()
    assert n >= 2**20
    flush = measure.CacheFlusher(4096)
    flush()
    flush()
    assert flush.buffer.numel() == 1024 and bool((flush.buffer == 2).all())


def test_speed_times_prefill_and_decode():
    calls = []
    flush = measure.CacheFlusher(64)
    real = flush.__call__
    flush.__class__ = type("Counting", (measure.CacheFlusher,), {})
    flush.__class__.__call__ = lambda self: (calls.append(1), real())
    s = measure.speed(_tiny(), prompt_len=12, decode_tokens=3, repeats=2, flush=flush, vocab=64)
    assert s.decode_ms > 0 and s.prefill_ms > 0 and math.isfinite(s.decode_ms)
    assert len(calls) == 2 * (1 + 3)  # before every timed call


def test_speculative_generation_matches_plain_greedy():
    model = _tiny()
    prompts = [_ids(1, 8, seed=s) for s in (3, 4)]
    plain = measure.plain_generation(model, prompts, 10)
    assert plain.tokens.shape == (2, 10) and plain.mean_accepted is None
    spec = measure.speculative_generation(model, prompts, 10, "layer-skip:1")
    assert torch.equal(spec.tokens, plain.tokens)
    assert 1.0 <= spec.mean_accepted <= 5.0 and spec.tokens_per_s > 0
