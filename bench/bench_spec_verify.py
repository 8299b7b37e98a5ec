"""spec_verify: batched verification of K drafts against [B, K+1, V] target logits (Llama-2
V = 32000, Llama-3 V = 128256), fp32 and bf16 logits, on the CPU.

Worst case for reading: every draft is accepted (the draft token holds almost all of the target's
mass), so each row reads all K+1 positions and then samples the bonus token (one more pass over
the last position). Bytes = the logits, read once. The floor divides them by the read bandwidth
measured in the same run. Baseline in the same run: a vectorized torch implementation of the same
algorithm (softmax over every position, accept test, first rejection by cumprod, residual and
bonus by torch.multinomial).

Also reported: the expected number of tokens per step, (1 - α^(K+1)) / (1 - α) with
α = Σ min(p, q) (Leviathan et al. 2023, eq. 1), beside the mean num_emitted of the op for
synthetic p / q pairs.
"""

from __future__ import annotations

import csv
import os

import pytest
import torch
from bench_util import RESULTS_DIR, Row, record, seconds_of, timeit

from bitpress import ops

SHAPES = [(B, K, V) for V in (32000, 128256) for K in (4, 8) for B in (1, 8, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _data(B, K, V, dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K + 1, V, generator=g)
    d = torch.randint(0, V, (B, K), generator=g)
    logits.scatter_(-1, torch.cat([d, d[:, :1]], 1)[..., None], 30.0)  # p(draft) ~ 1
    return logits.to(dtype), d


def torch_spec_verify(logits, d, temperature, q=None):
    """The same algorithm, vectorized in plain torch (uniforms from torch's generator)."""
    B, K1, V = logits.shape
    K = K1 - 1
    p = torch.softmax(logits.float() / temperature[:, None, None], -1)  # [B, K+1, V]
    px = p[:, :K].gather(-1, d[..., None])[..., 0]
    qx = q.gather(-1, d[..., None])[..., 0] if q is not None else torch.ones_like(px)
    acc = torch.rand(B, K) * qx < px
    a = acc.long().cumprod(-1).sum(-1)
    rows = torch.arange(B)
    p_a = p[rows, a]
    rejected = a < K
    onehot = torch.zeros_like(p_a).scatter_(-1, d[rows, a.clamp(max=K - 1), None], 1.0)
    w = torch.where(rejected[:, None], (p_a - onehot).clamp_min(0), p_a)
    tok = torch.multinomial(w, 1)[:, 0]
    tokens = torch.full((B, K1), -1)
    tokens[:, :K] = torch.where(torch.arange(K) < a[:, None], d, -1)
    tokens[rows, a] = tok
    return tokens, a, a + 1


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("B,K,V", SHAPES, ids=lambda s: str(s))
def bench_spec_verify_cpu(benchmark, B, K, V, dt):
    logits, d = _data(B, K, V, DTYPES[dt])
    temp = torch.ones(B)
    seeds = torch.arange(B)
    out = ops.spec_verify(logits, d, temperature=temp, seeds=seeds)
    assert (out[1] == K).all()  # the worst case really reads every position
    benchmark.group = f"spec_verify B={B} K={K} V={V} {dt}"
    benchmark(ops.spec_verify, logits, d, temperature=temp, seeds=seeds)
    t_base = timeit(lambda: torch_spec_verify(logits, d, temp), min_reps=3)
    record(
        Row(
            "spec_verify",
            f"B={B} K={K} V={V} {dt}",
            seconds_of(benchmark),
            logits.numel() * logits.element_size(),
            0,
            "torch vectorized",
            t_base,
        ),
        benchmark,
    )


def _pair(V, lam, g):
    """p and q = (1 - lam) p + lam r: acceptance rate alpha = sum(min(p, q))."""
    p = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, -1)
    r = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, -1)
    q = (1 - lam) * p + lam * r
    return p, q, float(torch.minimum(p, q).sum())


def bench_acceptance_length(benchmark):
    """Empirical tokens per step of the op against (1 - α^(K+1)) / (1 - α)."""
    g = torch.Generator().manual_seed(1)
    V, rows = 1000, 20000
    table = []
    for K in (4, 8):
        for lam in (0.1, 0.3, 0.6, 0.9):
            p, q, alpha = _pair(V, lam, g)
            logits = p.log().float().expand(rows, K + 1, V)
            qk = q.float().expand(rows, K, V)
            d = torch.multinomial(q.float(), rows * K, replacement=True, generator=g)
            d = d.reshape(rows, K)
            _, _, emitted = ops.spec_verify(
                logits, d, None, qk, temperature=1.0, seeds=torch.arange(rows)
            )
            expected = (1 - alpha ** (K + 1)) / (1 - alpha)
            got = emitted.double().mean().item()
            stderr = emitted.double().std().item() / rows**0.5
            table.append((K, round(alpha, 4), round(expected, 4), round(got, 4), round(stderr, 4)))
    benchmark.group = "spec_verify acceptance"
    benchmark.pedantic(lambda: None, rounds=1)
    header = ("K", "alpha", "expected tokens/step", "empirical tokens/step", "stderr")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(str(v) for v in row) + " |")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "spec_verify_acceptance.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(table)
    for K, _, expected, got, stderr in table:
        assert abs(got - expected) < 5 * stderr + 1e-3, (K, expected, got)
