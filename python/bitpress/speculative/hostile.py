"""The hostile-input description of ``spec_verify`` (the suite is ``tests/hostile``; the data
model is :class:`bitpress._core.registry.HostileSpec`): ragged batches (num_draft 0..K, padding
of any value beyond it), greedy / sampling / mixed rows, top_k and top_p, draft_probs or one-hot
q, ``-inf`` (masked) and ``+inf`` logits, int32 or int64 integer arguments; the result must
equal the reference's tokens exactly.
"""

from __future__ import annotations

import torch

from bitpress._core.checks import FLOAT_DTYPES, INT_DTYPES
from bitpress._core.registry import Dim, HostileSpec, TensorArg, register_hostile
from bitpress.speculative import reference
from bitpress.speculative.ops import spec_verify

ARGS = (
    "target_logits",
    "draft_tokens",
    "num_draft",
    "draft_probs",
    "temperature",
    "top_k",
    "top_p",
    "seeds",
    "offsets",
)


def _make(sizes, options, gen, backend):
    B, K, V = sizes["B"], sizes["K"], sizes["V"]
    dtype = options["dtype"]
    logits = (torch.randn(B, K + 1, V, generator=gen) * 3).to(dtype)
    q = torch.softmax(logits[:, :K].float() + torch.randn(B, K, V, generator=gen), -1)
    d = (
        torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
        if B * K
        else torch.zeros(B, K, dtype=torch.long)
    )
    num_draft = None
    if options["ragged"]:
        num_draft = torch.randint(0, K + 1, (B,), generator=gen)
        pad = torch.arange(K)[None, :] >= num_draft[:, None]
        # Padding beyond num_draft is ignored, whatever it holds (-1, or any integer).
        filler = -1
        if options["padding"] == "any":
            filler = int(torch.randint(-(2**31), 2**31 - 1, (1,), generator=gen))
        d = torch.where(pad, filler, d)
    temp = None
    mode = options["temperature"]
    if mode == "greedy":
        temp = torch.zeros(B)
    elif mode == "sampling":
        temp = 0.25 + torch.rand(B, generator=gen) * 2
    elif mode == "mixed":
        temp = torch.where(torch.rand(B, generator=gen) < 0.4, 0.0, 0.5 + torch.rand(B))
    top_k = torch.randint(-2, V + 3, (B,), generator=gen) if options["top_k"] else None
    top_p = torch.rand(B, generator=gen) * 1.2 - 0.1 if options["top_p"] else None
    seeds = offsets = None
    if temp is not None:
        seeds = torch.randint(-(2**63), 2**63 - 1, (B,), generator=gen)
        offsets = torch.randint(0, 2**40, (B,), generator=gen) if options["offsets"] else None
    return dict(
        target_logits=logits,
        draft_tokens=d.to(options["int_dtype"]),
        num_draft=None if num_draft is None else num_draft.to(options["int_dtype"]),
        draft_probs=q.to(dtype) if options["draft_probs"] else None,
        temperature=temp,
        top_k=top_k,
        top_p=top_p,
        seeds=seeds,
        offsets=offsets,
    )


def _bad_values(a, gen):
    B, K1, V = a["target_logits"].shape
    K = K1 - 1
    if B == 0:
        return []
    b = int(torch.randint(0, B, (1,), generator=gen))
    n = a["num_draft"].long() if a["num_draft"] is not None else torch.full((B,), K)
    bad = []
    for v in (K + 1, -1):
        nd = n.clone()
        nd[b] = v
        bad.append(("num_draft", {**a, "num_draft": nd.to(a["draft_tokens"].dtype)}))
    if int(n[b]) > 0:
        for v in (V, -1):
            d = a["draft_tokens"].clone()
            d[b, int(torch.randint(0, int(n[b]), (1,), generator=gen))] = v
            bad.append(("draft_tokens", {**a, "draft_tokens": d}))
    if a["temperature"] is not None:
        for v in (-1.0, float("nan")):
            t = a["temperature"].clone()
            t[b] = v
            bad.append(("temperature", {**a, "temperature": t}))
        t = a["temperature"]
        if a["draft_probs"] is not None and float(t[b]) > 0 and int(n[b]) > 0:
            for v in (-0.5, float("nan"), float("inf")):
                q = a["draft_probs"].clone()
                q[b, int(torch.randint(0, int(n[b]), (1,), generator=gen)), 0] = v
                bad.append(("draft_probs", {**a, "draft_probs": q}))
    return bad


@register_hostile("spec_verify")
def spec_verify_hostile() -> HostileSpec:
    per_row = ("target_logits", "draft_tokens")
    return HostileSpec(
        op="spec_verify",
        dims=(
            Dim("B", small=7, large=(33,)),
            Dim("K", small=5),
            Dim("V", small=40, large=(4099,), min=1),
        ),
        options={
            "dtype": FLOAT_DTYPES,
            "int_dtype": INT_DTYPES,
            "ragged": (True, False),
            "padding": ("-1", "any"),
            "temperature": (None, "greedy", "sampling", "mixed"),
            "draft_probs": (False, True),
            "top_k": (False, True),
            "top_p": (False, True),
            "offsets": (False, True),
        },
        args=(
            TensorArg(
                "target_logits",
                FLOAT_DTYPES,
                3,
                related=(
                    "draft_tokens",
                    "draft_probs",
                    "num_draft",
                    "temperature",
                    "top_k",
                    "top_p",
                    "seeds",
                    "offsets",
                ),
                nonfinite=(float("inf"), float("-inf")),
            ),  # fmt: skip
            # Not expandable: row b's padding starts at num_draft[b], so neither can repeat row 0.
            TensorArg(
                "draft_tokens",
                INT_DTYPES,
                2,
                related=("target_logits",),
                cast=INT_DTYPES,
                expandable=False,
            ),
            TensorArg(
                "num_draft", INT_DTYPES, 1, related=per_row, cast=INT_DTYPES, expandable=False
            ),
            TensorArg("draft_probs", FLOAT_DTYPES, 3, related=per_row),
            TensorArg("temperature", (torch.float32,), 1, related=per_row),
            TensorArg("top_k", INT_DTYPES, 1, related=per_row, cast=INT_DTYPES),
            TensorArg("top_p", (torch.float32,), 1, related=per_row),
            TensorArg("seeds", (torch.int64,), 1, related=per_row),
            TensorArg("offsets", (torch.int64,), 1, related=per_row),
        ),
        make=_make,
        call=lambda backend, a: spec_verify(*(a[k] for k in ARGS), backend=backend),
        reference=lambda a: reference.spec_verify(*(a[k] for k in ARGS)),
        tol=lambda options: 0.0,
        bad_values=_bad_values,
        value_checks=("cpu", "reference", "triton"),
        work=lambda s: s["B"] * (s["K"] + 1) * s["V"],
    )
