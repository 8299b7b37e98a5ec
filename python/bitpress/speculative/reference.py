"""Plain-PyTorch reference of spec_verify (and its Philox stream): the ground truth of the tests.

Computes exactly what :func:`bitpress.speculative.ops.spec_verify` defines, on every position at
once. Imports only torch.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for a in [0, 2^32) held in int64: a is split into 16-bit
    halves so that no partial product overflows int64."""
    t = (a & 0xFFFF) * m  # < 2^48
    mid = (a >> 16) * m + (t >> 16)  # < 2^49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Salmon et al. 2011) on int64 tensors holding uint32 values; the same rounds
    as csrc/include/bitpress/common/philox.h."""
    for r in range(10):
        if r:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_stream(seed: torch.Tensor, offset: torch.Tensor, position: torch.Tensor):
    """The four words at (seed, offset, position): key (seed lo, seed hi), counter (offset lo,
    offset hi, position, 0). Arguments broadcast; int64 tensors."""
    seed, offset, position = torch.broadcast_tensors(seed.long(), offset.long(), position.long())
    zero = torch.zeros_like(seed)
    return philox4x32_10(
        offset & _MASK32,
        (offset >> 32) & _MASK32,
        position & _MASK32,
        zero,
        seed & _MASK32,
        (seed >> 32) & _MASK32,
    )


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """u = (bits >> 8) * 2^-24 in float32: exact, in [0, 1)."""
    return (bits >> 8).to(torch.float32) * 2.0**-24


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# The constants of spec::exp2_neg (csrc/include/bitpress/speculative/spec_verify.h), as float32.
_LOG2E = 1.44269504088896341
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: (t + M) - M rounds t to the nearest integer (even ties)
_EXP2_C = (
    6.931471825e-01,
    2.402264774e-01,
    5.550332367e-02,
    9.618436918e-03,
    1.339887502e-03,
    1.535336196e-04,
)
_EXP2_MIN = -126.0


def exp2_neg(d: torch.Tensor) -> torch.Tensor:
    """2^d for float32 d <= 0 with exactly the operations of spec::exp2_neg (each rounded on its
    own): n = round(d), f = d - n (exact), a degree-6 polynomial in f times 2^n; 0 for d < -126,
    -inf and NaN."""
    c = [_f32(v) for v in _EXP2_C]
    magic = _f32(_ROUND_MAGIC)
    ok = d >= _EXP2_MIN
    d = torch.where(ok, d, torch.zeros_like(d))
    n = (d + magic) - magic
    f = d - n
    y = c[5] * f + c[4]
    for coef in (c[3], c[2], c[1], c[0]):
        y = y * f + coef
    y = y * f + 1.0
    pow2 = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(ok, y * pow2, torch.zeros_like(y))


def _top_k_threshold(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k-th largest value along the last dim (k >= 1), -inf where k is off (<= 0 or >= V)."""
    V = z.shape[-1]
    on = (k > 0) & (k < V)
    kth = z.sort(-1, descending=True).values.gather(-1, (k.clamp(1, V) - 1)[..., None])[..., 0]
    return torch.where(on, kth, torch.full_like(kth, float("-inf")))


def _top_p_threshold(e: torch.Tensor, top_p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Largest tau with sum(e[e >= tau]) >= top_p * s (the smallest top set, ties kept); 0 where
    top_p is off (outside (0, 1))."""
    on = (top_p > 0) & (top_p < 1)
    sorted_e = e.sort(-1, descending=True).values
    mass = sorted_e.cumsum(-1)
    # mass at each sorted position, extended over ties: the sum of every e >= that value.
    target = top_p * s
    reached = mass >= target[..., None]
    first = torch.where(reached.any(-1), reached.to(torch.int8).argmax(-1), e.shape[-1] - 1)
    first = first[..., None]  # none reached (rounding of the running sum): keep everything
    tau = sorted_e.gather(-1, first)[..., 0]
    return torch.where(on, tau, torch.zeros_like(tau))


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first running sum of w above u * sum(w); the last index with w > 0 when
    rounding leaves the running sum short; -1 where every weight is 0. w: [N, V], u: [N]."""
    V = w.shape[-1]
    total = w.sum(-1)
    t = u * total
    run = w.cumsum(-1)
    hit = (run > t[:, None]) & (w > 0)
    idx = torch.arange(V, device=w.device)
    first = torch.where(hit, idx, V).min(-1).values
    last = torch.where(w > 0, idx, -1).max(-1).values
    out = torch.where(first < V, first, last)
    return torch.where(total > 0, out, torch.full_like(out, -1))


def spec_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_draft: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative verification exactly as bitpress.ops.spec_verify defines it, on every position
    at once (materializes the [B, K+1, V] probabilities: the kernels do not)."""
    B, K1, V = target_logits.shape
    K, dev = K1 - 1, target_logits.device
    x = target_logits.float()
    d = draft_tokens.long()
    n = num_draft.long() if num_draft is not None else torch.full((B,), K, device=dev)
    temp = temperature.float() if temperature is not None else torch.zeros(B, device=dev)
    greedy_row = ~(temp > 0)
    # Base-2 units: z = x * (log2(e) / T), the scale rounded once, so that p = 2^(z - m) / S.
    scale = _f32(_LOG2E).to(dev) / torch.where(greedy_row, torch.ones_like(temp), temp)
    z = x * scale[:, None, None]
    m = z.max(-1).values
    zthr = (
        _top_k_threshold(z, top_k.long()[:, None].expand(B, K1))
        if top_k is not None
        else torch.full_like(m, float("-inf"))
    )
    e = exp2_neg(z - m[..., None])
    e = torch.where(z >= zthr[..., None], e, torch.zeros_like(e))
    s = e.sum(-1)
    if top_p is not None:
        etau = _top_p_threshold(e, top_p.float()[:, None].expand(B, K1), s)
        e = torch.where(e >= etau[..., None], e, torch.zeros_like(e))
        s = torch.where(((top_p > 0) & (top_p < 1))[:, None], e.sum(-1), s)
    else:
        etau = torch.zeros_like(m)
    # A position with no distribution (infinite or all -inf logits) is decided greedily.
    greedy = greedy_row[:, None] | ~(s > 0)  # [B, K+1]
    argmax = x.argmax(-1)  # ties: the lowest index
    prob = e / s[..., None]  # [B, K+1, V]; 0 outside the kept set (e was zeroed there)

    pos = torch.arange(K1, device=dev)
    w0, w1, _, _ = philox_stream(
        seeds.long()[:, None] if seeds is not None else torch.zeros(B, 1, dtype=torch.long),
        offsets.long()[:, None] if offsets is not None else torch.zeros(B, 1, dtype=torch.long),
        pos[None, :],
    )
    u0, u1 = uniform_from_bits(w0.to(dev)), uniform_from_bits(w1.to(dev))

    dj = d.clamp(0, V - 1)
    px = prob[:, :K].gather(-1, dj[..., None])[..., 0]
    qx = (
        draft_probs.float().gather(-1, dj[..., None])[..., 0]
        if draft_probs is not None
        else torch.ones_like(px)
    )
    acc = torch.where(greedy[:, :K], d == argmax[:, :K], u0[:, :K] * qx < px)
    acc = acc & (pos[None, :K] < n[:, None])
    a = acc.long().cumprod(-1).sum(-1)  # accepted drafts: the leading run of accepts

    rows = torch.arange(B, device=dev)
    p_a = prob[rows, a]  # [B, V] at the deciding position
    rejected = a < n
    q_a = torch.zeros_like(p_a)
    if draft_probs is not None and K > 0:
        q_a = torch.where(rejected[:, None], draft_probs[rows, a.clamp(max=K - 1)].float(), q_a)
    diff = p_a - q_a
    w = torch.where(diff > 0, diff, torch.zeros_like(diff))
    if draft_probs is None and K > 0:  # q one-hot at the rejected draft: no residual mass there
        # d at the deciding position may be -1 padding (a == num_draft < K: nothing rejected).
        one_hot = torch.nn.functional.one_hot(d[rows, a.clamp(max=K - 1)].clamp(0, V - 1), V)
        one_hot = one_hot.bool()
        w = torch.where(one_hot & rejected[:, None], torch.zeros_like(w), w)
    u = u1[rows, a]
    tok = _inverse_cdf(w, u)
    tok = torch.where(tok < 0, _inverse_cdf(p_a, u), tok)  # p <= q everywhere: sample p
    tok = torch.where(greedy[rows, a], argmax[rows, a], tok)

    tokens = torch.full((B, K1), -1, dtype=torch.long, device=dev)
    keep = pos[None, :K] < a[:, None]
    tokens[:, :K] = torch.where(keep, d, tokens[:, :K])
    tokens[rows, a] = tok
    return tokens, a, a + 1
