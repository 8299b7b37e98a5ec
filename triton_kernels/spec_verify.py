"""Triton kernel of spec_verify (contract in bitpress.ops.spec_verify).

One program per row. The row walks its positions in order and stops at the first rejection; each
position is one pass over its V logits in BLOCK_V chunks that yields both the argmax of the raw
logits (greedy rows, and positions without a distribution) and the online-softmax statistics
(chunk max, running sum rescaled when the max grows). The token sampled at the deciding position
takes two more passes (the total of the weights, then the chunk walk that stops at the target);
top_k / top_p rows take extra passes for their binary searches (32 counting passes, ~30 masked
sums), like the C++ kernels.

Randomness is ``tl.philox``: Philox4x32-10 with key (seed lo, seed hi), the generator and stream
layout of csrc/include/bitpress/common/philox.h (the tests check the words against the C++ and
torch implementations). The float math spells out spec::exp_neg of
csrc/include/bitpress/speculative/spec_verify.h operation by operation; launches pass
``enable_fp_fusion=False`` so that the compiled kernel keeps
every multiply and add rounded on its own, as the CPU kernel and the reference do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import keep_compilable, launch, new_output


@triton.jit
def _exp2_neg(d):
    # spec::exp2_neg: 2^d for d <= 0, 0 below -126 (and for -inf / NaN); n = round(d), f = d - n.
    ok = d >= -126.0
    d = tl.where(ok, d, 0.0)
    n = (d + 12582912.0) - 12582912.0
    f = d - n
    y = 1.535336196e-04 * f + 1.339887502e-03
    y = y * f + 9.618436918e-03
    y = y * f + 5.550332367e-02
    y = y * f + 2.402264774e-01
    y = y * f + 6.931471825e-01
    y = y * f + 1.0
    pow2 = ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(ok, y * pow2, 0.0)


@triton.jit
def _order_key(z):
    # spec::order_key as int64: unsigned order of the keys is the order of the floats.
    bits = z.to(tl.uint32, bitcast=True)
    key = tl.where((bits & 0x80000000) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return key.to(tl.int64)


@triton.jit
def _key_float(k):
    bits = k.to(tl.uint32)
    bits = tl.where((bits & 0x80000000) != 0, bits & 0x7FFFFFFF, bits ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _weights(row_ptr, q_ptr, v0, V, scale, m, s, zthr, etau, one_hot, USE_Q, BLOCK_V: tl.constexpr):
    # w = max(0, p - q), p = kept ? e / S : 0; q one-hot at `one_hot` (w = 0 there) when not USE_Q.
    offs = v0 + tl.arange(0, BLOCK_V)
    mask = offs < V
    z = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * scale
    e = _exp2_neg(z - m)
    p = tl.where((z >= zthr) & (e >= etau), tl.math.div_rn(e, s), 0.0)
    if USE_Q:
        p = p - tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.where(p > 0.0, p, 0.0)
    return tl.where((offs == one_hot) | ~mask, 0.0, w), offs


@triton.jit
def _sample(row_ptr, q_ptr, V, scale, m, s, zthr, etau, one_hot, u, USE_Q, BLOCK_V: tl.constexpr):
    # Inverse CDF: first v whose running sum exceeds u * W (chunk by chunk, then inside the chunk);
    # the last positive weight of the chunk if rounding leaves the walk short; -1 if W = 0.
    total = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        w, _ = _weights(row_ptr, q_ptr, v0, V, scale, m, s, zthr, etau, one_hot, USE_Q, BLOCK_V)
        total = total + tl.sum(w, axis=0)
    t = u * total
    run = tl.zeros((), tl.float32)
    pick = tl.full((), -1, tl.int64)
    last = tl.full((), -1, tl.int64)
    found = total <= 0.0
    v0 = tl.zeros((), tl.int64)
    while (v0 < V) & (found == 0):
        w, offs = _weights(row_ptr, q_ptr, v0, V, scale, m, s, zthr, etau, one_hot, USE_Q, BLOCK_V)
        csum = tl.sum(w, axis=0)
        chunk_last = tl.max(tl.where(w > 0.0, offs, -1), axis=0).to(tl.int64)
        last = tl.where(csum > 0.0, chunk_last, last)
        if run + csum > t:
            c = run + tl.cumsum(w, axis=0)
            first = tl.min(tl.where((c > t) & (w > 0.0), offs, V), axis=0).to(tl.int64)
            pick = tl.where(first < V, first, chunk_last)
            found = t == t
        run = run + csum
        v0 += BLOCK_V
    return tl.where(pick >= 0, pick, tl.where(total > 0.0, last, -1))


@triton.jit
def spec_verify_kernel(
    logits_ptr,
    draft_ptr,
    num_draft_ptr,
    q_ptr,
    temp_ptr,
    top_k_ptr,
    top_p_ptr,
    seeds_ptr,
    offsets_ptr,
    tokens_ptr,
    num_acc_ptr,
    num_emit_ptr,
    K,
    V,
    stride_lb,
    stride_lk,
    stride_qb,
    stride_qk,
    HAS_Q: tl.constexpr,
    HAS_FILTER: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(num_draft_ptr + b)
    n = tl.minimum(tl.maximum(n, 0), K)  # no host sync to report it: clamp, never read past K
    temp = tl.load(temp_ptr + b)
    greedy_row = ~(temp > 0.0)
    scale = tl.math.div_rn(1.4426950408889634, tl.where(greedy_row, 1.0, temp))  # log2(e) / T
    top_k = tl.load(top_k_ptr + b)
    top_p = tl.load(top_p_ptr + b)
    use_k = (top_k > 0) & (top_k < V)
    use_p = (top_p > 0.0) & (top_p < 1.0)
    seed = tl.load(seeds_ptr + b)
    offset = tl.load(offsets_ptr + b)
    c0 = (offset & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero32 = tl.zeros((), tl.uint32)

    a = tl.zeros((), tl.int64)
    token = tl.full((), -1, tl.int64)
    j = tl.zeros((), tl.int64)
    done = j > 0
    while (j <= n) & (done == 0):
        row = logits_ptr + b * stride_lb + j * stride_lk
        is_draft = j < n
        x = tl.load(draft_ptr + b * K + j, mask=is_draft, other=-1)
        x_ok = is_draft & (x >= 0) & (x < V)
        # One pass: argmax of the raw logits and the online-softmax statistics of z = x * scale.
        best = tl.full((), float("-inf"), tl.float32)
        best_i = tl.zeros((), tl.int64)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            xv = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            cmax = tl.max(xv, axis=0)
            carg = tl.argmax(xv, axis=0, tie_break_left=True).to(tl.int64) + v0
            best_i = tl.where(cmax > best, carg, best_i)
            best = tl.maximum(cmax, best)
            z = xv * scale
            new_m = tl.maximum(tl.max(z, axis=0), m)
            s = s * _exp2_neg(m - new_m) + tl.sum(_exp2_neg(z - new_m), axis=0)
            m = new_m
        zthr = tl.full((), float("-inf"), tl.float32)
        etau = tl.zeros((), tl.float32)
        if HAS_FILTER:
            if ~greedy_row & use_k:  # largest key t with #{key(z) >= t} >= k
                lo = tl.zeros((), tl.int64)
                hi = tl.full((), 1 << 32, tl.int64)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    cnt = tl.zeros((), tl.int64)
                    for v0 in range(0, V, BLOCK_V):
                        offs = v0 + tl.arange(0, BLOCK_V)
                        mask = offs < V
                        z = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32) * scale
                        cnt += tl.sum(((_order_key(z) >= mid) & mask).to(tl.int64), axis=0)
                    lo = tl.where(cnt >= top_k, mid, lo)
                    hi = tl.where(cnt >= top_k, hi, mid)
                zthr = _key_float(lo)
            if ~greedy_row & (use_k | use_p):
                s = tl.zeros((), tl.float32)
                for v0 in range(0, V, BLOCK_V):
                    offs = v0 + tl.arange(0, BLOCK_V)
                    z = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                    z = z * scale
                    s += tl.sum(tl.where(z >= zthr, _exp2_neg(z - m), 0.0), axis=0)
            if ~greedy_row & use_p:  # largest tau with sum(e[e >= tau]) >= top_p * S
                target = top_p * s
                lo = tl.zeros((), tl.int64)
                hi = tl.full((), 0x3F800001, tl.int64)
                mass_lo = s
                while hi - lo > 1:
                    mid = lo + (hi - lo) // 2
                    tau = mid.to(tl.int32).to(tl.float32, bitcast=True)
                    mass = tl.zeros((), tl.float32)
                    for v0 in range(0, V, BLOCK_V):
                        offs = v0 + tl.arange(0, BLOCK_V)
                        z = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                        e = tl.where(z * scale >= zthr, _exp2_neg(z * scale - m), 0.0)
                        mass += tl.sum(tl.where(e >= tau, e, 0.0), axis=0)
                    ok = mass >= target
                    lo = tl.where(ok, mid, lo)
                    hi = tl.where(ok, hi, mid)
                    mass_lo = tl.where(ok, mass, mass_lo)
                etau = lo.to(tl.int32).to(tl.float32, bitcast=True)
                s = mass_lo
        # Greedy rows, and positions without a distribution (infinite or all -inf logits).
        greedy = greedy_row | ~(s > 0.0)
        w = tl.philox(seed, c0, c1, j.to(tl.uint32), zero32, n_rounds=10)
        u0 = (w[0] >> 8).to(tl.float32) * 5.9604644775390625e-08
        u1 = (w[1] >> 8).to(tl.float32) * 5.9604644775390625e-08
        xs = tl.where(x_ok, x, 0)
        zx = tl.load(row + xs).to(tl.float32) * scale
        ex = _exp2_neg(zx - m)
        px = tl.where((zx >= zthr) & (ex >= etau), tl.math.div_rn(ex, s), 0.0)
        q_row = q_ptr + b * stride_qb + j * stride_qk
        if HAS_Q:
            qx = tl.load(q_row + xs, mask=x_ok, other=1.0).to(tl.float32)
        else:
            qx = 1.0
        accept_sample = x_ok & (u0 * qx < px)
        accept = tl.where(greedy, is_draft & (x == best_i), accept_sample)
        if accept:
            a += 1
        else:
            if greedy:
                token = best_i
            else:
                one_hot = tl.where(is_draft & (HAS_Q == 0), x, -1)
                token = _sample(
                    row, q_row, V, scale, m, s, zthr, etau, one_hot, u1, HAS_Q & is_draft, BLOCK_V
                )
                if token < 0:  # p <= q everywhere: sample p
                    token = _sample(row, q_row, V, scale, m, s, zthr, etau, -1, u1, False, BLOCK_V)
            done = j >= 0
        j += 1
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k <= K
    d = tl.load(draft_ptr + b * K + offs_k, mask=offs_k < K, other=-1)
    out = tl.where(offs_k < a, d, tl.where(offs_k == a, token, -1))
    tl.store(tokens_ptr + b * (K + 1) + offs_k, out, mask=mask_k)
    tl.store(num_acc_ptr + b, a)
    tl.store(num_emit_ptr + b, a + 1)


keep_compilable(globals(), ("_exp2_neg", "_order_key", "_key_float", "_weights", "_sample"))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def spec_verify(
    target_logits,
    draft_tokens,
    num_draft,
    draft_probs,
    temperature,
    top_k,
    top_p,
    seeds,
    offsets,
    block_v: int = 1024,
):
    """Launch the kernel; arguments already checked by bitpress.ops."""
    B, K1, V = target_logits.shape
    K, dev = K1 - 1, target_logits.device
    tokens = new_output((B, K1), torch.int64, dev)
    num_acc = new_output((B,), torch.int64, dev)
    num_emit = new_output((B,), torch.int64, dev)
    if B == 0:
        return tokens, num_acc, num_emit

    def per_row(t, fill, dtype):
        return (
            t.to(dtype).contiguous()
            if t is not None
            else torch.full((B,), fill, dtype=dtype, device=dev)
        )

    logits = _unit_last(target_logits)
    q = _unit_last(draft_probs) if draft_probs is not None else None
    kwargs = {} if dev.type == "cpu" else {"enable_fp_fusion": False}
    launch(
        spec_verify_kernel,
        (B,),
        dev,
        logits,
        draft_tokens.to(torch.int64).contiguous(),
        per_row(num_draft, K, torch.int64),
        q if q is not None else logits,
        per_row(temperature, 0.0, torch.float32),
        per_row(top_k, 0, torch.int64),
        per_row(top_p, 1.0, torch.float32),
        per_row(seeds, 0, torch.int64),
        per_row(offsets, 0, torch.int64),
        tokens,
        num_acc,
        num_emit,
        K,
        V,
        logits.stride(0),
        logits.stride(1),
        q.stride(0) if q is not None else 0,
        q.stride(1) if q is not None else 0,
        HAS_Q=q is not None,
        HAS_FILTER=top_k is not None or top_p is not None,
        BLOCK_V=min(block_v, triton.next_power_of_2(V)),
        BLOCK_K=triton.next_power_of_2(K1),
        **kwargs,
    )
    return tokens, num_acc, num_emit
