"""Shared data of the 2:4 tests: correlated layer inputs and the tiny Llama of tests/int4."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# tests/int4/tiny_llama.py builds the seeded tiny Llama: importable from here too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "int4"))

from tiny_llama import tiny_llama  # noqa: E402, F401


def correlated_inputs(n, K, seed, rank=8, outliers=4):
    """x = z @ L + noise: a random low-rank mixing plus noise, with uneven channel scales and a
    few outlier channels (the structure of LLM activations that Wanda and SparseGPT exploit)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    L = torch.randn(rank, K, generator=g)
    x = z @ L + 0.3 * torch.randn(n, K, generator=g)
    x *= torch.logspace(-0.5, 0.5, K)[torch.randperm(K, generator=g)]
    x[:, torch.randperm(K, generator=g)[:outliers]] *= 15
    return x


def assert_24(w):
    """At most 2 nonzeros in every group of 4 along the last dimension."""
    N, K = w.shape
    assert ((w != 0).reshape(N, K // 4, 4).sum(-1) <= 2).all()
