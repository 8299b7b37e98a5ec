"""The selftest cases of spec_verify (``python -m bitpress selftest``): tokens compared exactly
with :mod:`bitpress.speculative.reference` (same Philox stream and float formulas)."""

from __future__ import annotations

import torch

from bitpress._core.registry import Case
from bitpress.speculative import reference


def _case(B, K, V, dtype, draft_probs, filters):
    def make(device, gen, backend):
        logits = (torch.randn(B, K + 1, V, generator=gen) * 3).to(dtype)
        q = torch.softmax(logits[:, :K].float() + torch.randn(B, K, V, generator=gen), -1)
        d = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
        num_draft = torch.randint(0, K + 1, (B,), generator=gen)
        temp = torch.where(
            torch.rand(B, generator=gen) < 0.25, 0.0, 0.5 + torch.rand(B, generator=gen)
        )
        top_k = torch.randint(0, V, (B,), generator=gen) if filters else None
        top_p = torch.rand(B, generator=gen) * 0.5 + 0.5 if filters else None
        seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen)
        offsets = torch.arange(B)
        args = (logits, d, num_draft, q.to(dtype) if draft_probs else None, temp, top_k, top_p)
        args += (seeds, offsets)
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    tag = f"B={B} K={K} V={V} {str(dtype).removeprefix('torch.')}"
    tag += (" draft_probs" if draft_probs else " one-hot q") + (" top_k/top_p" if filters else "")
    return Case("spec_verify", tag, make, reference.spec_verify, 0.0, B * (K + 1) * V)


def spec_verify_cases() -> list[Case]:
    return [
        _case(16, 4, 32000, torch.bfloat16, False, False),
        _case(32, 3, 1000, torch.float32, True, True),
    ]
