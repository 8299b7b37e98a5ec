"""SpeculativeGenerator, sampling: the generated text follows the target's own distribution.

A tiny-vocabulary (V = 6) target and an unrelated random draft: the first three generated tokens
of N rows (one batched call, a different Philox seed per row) are compared by a chi-square test
with the target's exact joint distribution, enumerated over all 6^3 continuations (temperature,
top-k, top-p applied as spec_verify defines them). A deliberately wrong sampler (sampled drafts
verified as if deterministic: q taken one-hot) must fail the same test. Seeded runs repeat.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from models import tiny_model

from bitpress.speculative import ModelDrafter, PromptLookupDrafter, SpeculativeGenerator

scipy_stats = pytest.importorskip("scipy.stats")

V = 6
N = 4000
PROMPT = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", vocab=V, hidden=32, layers=2, heads=4, seed=3, scale=0.25)
    draft = tiny_model("llama", vocab=V, hidden=32, layers=1, heads=4, seed=7, scale=0.25)
    return target, draft


def _filtered(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """The target's p at each position, float64, as spec_verify defines it."""
    z = logits.double() / temperature
    if top_k:
        kth = z.sort(-1, descending=True).values[..., top_k - 1 : top_k]
        z = torch.where(z >= kth, z, torch.full_like(z, float("-inf")))
    p = torch.softmax(z, -1)
    if top_p:
        sp = p.sort(-1, descending=True).values
        first = (sp.cumsum(-1) >= top_p * p.sum(-1, keepdim=True)).double().argmax(-1, True)
        tau = sp.gather(-1, first)
        p = torch.where(p >= tau, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    return p


@torch.no_grad()
def exact_joint(target, temperature, top_k, top_p) -> torch.Tensor:
    """P(t1, t2, t3 | prompt) for all V^3 continuations: [V, V, V]."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=2)))  # [V^2, 2]
    ids = torch.cat([PROMPT.expand(len(seqs), -1), seqs], 1)
    logits = target(input_ids=ids).logits  # [V^2, T + 2, V]
    T = PROMPT.shape[1]
    p1 = _filtered(logits[0, T - 1], temperature, top_k, top_p)  # [V]
    p2 = _filtered(logits[:, T], temperature, top_k, top_p).reshape(V, V, V)[:, 0]  # [t1, t2]
    p3 = _filtered(logits[:, T + 1], temperature, top_k, top_p).reshape(V, V, V)  # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_p(samples: torch.Tensor, joint: torch.Tensor) -> float:
    """p-value of the chi-square test of samples [N, 3] against joint [V, V, V]; outcomes with an
    expected count below 5 are pooled into one bin."""
    idx = samples[:, 0] * V * V + samples[:, 1] * V + samples[:, 2]
    obs = torch.bincount(idx, minlength=V**3).double()
    exp = joint.reshape(-1) * len(samples)
    assert float(obs[exp == 0].sum()) == 0, "a token outside top-k/top-p was generated"
    big = exp >= 5
    small = ~big & (exp > 0)
    o, e = obs[big], exp[big]
    if bool(small.any()):
        o, e = torch.cat([o, obs[small].sum()[None]]), torch.cat([e, exp[small].sum()[None]])
    e = e * (o.sum() / e.sum())
    return float(scipy_stats.chisquare(o.numpy(), e.numpy()).pvalue)


class StaleQDrafter(ModelDrafter):
    """WRONG on purpose: draws its drafts at the requested temperature T but reports q before
    the temperature (q^T renormalized): verification corrects for the wrong q, the output is
    biased."""

    def propose(self, history, lengths, max_draft, sampling):
        d, n, q = super().propose(history, lengths, max_draft, sampling)
        stale = q ** sampling.temperature[:, None, None]
        return d, n, stale / stale.sum(-1, keepdim=True)


class UniformQDrafter(ModelDrafter):
    """WRONG on purpose: reports q uniform whatever it drew from."""

    def propose(self, history, lengths, max_draft, sampling):
        d, n, q = super().propose(history, lengths, max_draft, sampling)
        return d, n, torch.full_like(q, 1.0 / V)


def _sample(target, drafter, seed, temperature=1.0, top_k=None, top_p=None, num_draft=3):
    gen = SpeculativeGenerator(target, drafter, num_draft=num_draft)
    out = gen.generate(
        PROMPT.expand(N, -1),
        max_new_tokens=6,  # the first 3 are tested; more lets step 1 draft tokens 2..4
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        pad_token_id=0,
    )
    return out.sequences[:, PROMPT.shape[1] : PROMPT.shape[1] + 3], out.stats


PARAMS = [(1.0, None, None), (0.7, 4, None), (1.3, None, 0.8)]


@pytest.mark.parametrize("temperature,top_k,top_p", PARAMS)
def test_model_drafter_matches_target_distribution(pair, temperature, top_k, top_p):
    target, draft = pair
    joint = exact_joint(target, temperature, top_k, top_p)
    samples, stats = _sample(target, ModelDrafter(draft), 11, temperature, top_k, top_p)
    assert stats.proposed.sum() > 2 * N and 0 < stats.accepted.sum() < stats.proposed.sum()
    assert chi_square_p(samples, joint) > 1e-3


def test_prompt_lookup_matches_target_distribution(pair):
    target, _ = pair
    joint = exact_joint(target, 1.0, None, None)
    samples, stats = _sample(target, PromptLookupDrafter(), 12)
    assert stats.proposed.sum() > N
    assert chi_square_p(samples, joint) > 1e-3


@pytest.mark.parametrize(
    "wrong,temperature,top_k", [(StaleQDrafter, 0.5, None), (UniformQDrafter, 1.0, None)]
)
def test_wrong_sampler_fails_the_test(pair, wrong, temperature, top_k):
    target, draft = pair
    joint = exact_joint(target, temperature, top_k, None)
    samples, _ = _sample(target, wrong(draft), 11, temperature, top_k)
    assert chi_square_p(samples, joint) < 1e-6


def test_draft_distribution_differs_from_target(pair):
    """The test has power only if the draft is far from the target: check it is."""
    target, draft = pair
    with torch.no_grad():
        p = torch.softmax(target(input_ids=PROMPT).logits[0, -1], -1)
        q = torch.softmax(draft(input_ids=PROMPT).logits[0, -1], -1)
    assert 0.5 * float((p - q).abs().sum()) > 0.1


def test_seeded_runs_repeat(pair):
    target, draft = pair
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]] * 3)

    def run(seed):
        gen = SpeculativeGenerator(target, ModelDrafter(draft), num_draft=3)
        return gen.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.9, seed=seed).sequences

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = run(None)
    torch.manual_seed(3)
    assert torch.equal(d, run(None))


def test_confidence_stop_keeps_distribution(pair):
    """Early stop on the draft's own probability (depends on the draft alone): still exact."""
    target, draft = pair
    joint = exact_joint(target, 1.0, None, None)
    samples, _ = _sample(target, ModelDrafter(draft, confidence=0.3), 13)
    assert chi_square_p(samples, joint) > 1e-3
