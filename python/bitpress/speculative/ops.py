"""spec_verify: fused, batched speculative-decoding verification.

The public function (re-exported by :mod:`bitpress.ops`) with its contract, the Python argument
checks (fake, Triton and reference paths; the compiled backends check in C++ with the same
messages), the fake, the backend implementations and the op's registry entry.
"""

from __future__ import annotations

import torch

from bitpress._core import backends, ext  # noqa: F401  (ext registers the C++ ops)
from bitpress._core.backends import Capability
from bitpress._core.checks import FLOAT_DTYPES as _FLOAT_DTYPES
from bitpress._core.checks import INT_DTYPES as _INT_DTYPES
from bitpress._core.checks import check_device as _check_device
from bitpress._core.checks import check_dim as _check_dim
from bitpress._core.checks import check_dtype as _check_dtype
from bitpress._core.checks import check_size as _check_size
from bitpress._core.checks import fail as _fail
from bitpress._core.registry import OpSpec, register_op
from bitpress.speculative import cases, reference

try:  # triton is optional (it comes with CUDA builds of torch); without it the backend refuses
    from bitpress.triton_kernels import spec_verify as tk_spec_verify
except ImportError:  # pragma: no cover
    tk_spec_verify = None

# The CUDA kernel is compiled for sm_80 and sm_90a and uses nothing newer than sm_80.
_CUDA_SM80 = Capability(devices=("cuda",), min_cc=(8, 0), compiled_cuda=True)


def spec_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_draft: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | float | None = None,
    top_k: torch.Tensor | int | None = None,
    top_p: torch.Tensor | float | None = None,
    seeds: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Verify speculative-decoding drafts against the target's logits, for a batch of rows.

    The draft proposed ``num_draft[b]`` tokens for row ``b``; the target scored them in one
    forward pass. The result reproduces the target exactly: greedy rows emit the target's argmax
    chain, sampling rows emit tokens distributed as the target's own samples (Leviathan et al.
    2023, Chen et al. 2023).

    For row ``b`` with ``n = num_draft[b]`` drafts ``d[0..n)``, position ``j`` (``0 <= j <= n``):

    * **greedy** (``temperature[b] == 0``): accept ``d[j]`` while it equals
      ``argmax_v target_logits[b, j, v]`` (ties: the lowest ``v``); emit that argmax at the first
      mismatch, or at position ``n`` (the bonus token) when all ``n`` are accepted.
    * **sampling**: the target distribution is

      .. math:: p_j(v) = \frac{e_j(v)}{S_j}, \quad e_j(v) = 2^{z_{j,v} - \max_w z_{j,w}},
         \quad z_{j,v} = \mathrm{logit}_{j,v} \cdot (\log_2 e / T),
         \quad S_j = \sum_{v\ \mathrm{kept}} e_j(v)

      (that is, softmax(logit / T); the scale log2(e)/T is rounded once to float32 and 2^d is the
      canonical ``exp2_neg`` of ``bitpress/speculative/spec_verify.h``, so that every backend
      computes the same bits)
      over the tokens kept by ``top_k`` and ``top_p`` (all when they are off), 0 elsewhere.
      ``d[j]`` is accepted iff :math:`u_0 \, q_j(d_j) < p_j(d_j)`, i.e. with probability
      :math:`\min(1, p/q)`; ``q`` is ``draft_probs[b, j]``, or one-hot at ``d[j]`` when
      ``draft_probs`` is None (deterministic drafts: prompt lookup, greedy draft model). At the
      first rejection the emitted token is sampled from :math:`\max(0, p_j - q_j)` (normalized;
      0 at ``d[j]`` for one-hot q; from :math:`p_j` if that has no mass); when all ``n`` are
      accepted the bonus token is sampled from :math:`p_n`. Sampling is by inverse CDF: the
      first ``v`` whose running sum of the weights exceeds :math:`u_1 W` (``W`` their total);
      if rounding leaves the running sum short, the last ``v`` with positive weight, so a token
      with zero weight is never returned.

    ``u0``, ``u1`` are words 0 and 1 of Philox4x32-10 at key ``(seed lo, seed hi)`` and counter
    ``(offset lo, offset hi, j, 0)``, as ``(bits >> 8) * 2^-24``
    (csrc/include/bitpress/common/philox.h).

    Parameters
    ----------
    target_logits : Tensor, float32 / float16 / bfloat16, shape [B, K+1, V]
        The target's logits at each draft position and at the bonus position. Read once per
        decided position; no probability tensor is materialized. Must not hold NaN (``-inf``
        masks a token; a position whose logits are all ``-inf`` or that has ``+inf`` has no
        distribution and is decided greedily).
    draft_tokens : Tensor, int32 / int64, shape [B, K]
        Proposed tokens; entries at ``j >= num_draft[b]`` are padding and are ignored. Real ones
        must lie in ``[0, V)``.
    num_draft : Tensor, int32 / int64, shape [B], optional
        Real drafts per row, in ``0..K`` (ragged batches; 0: only the bonus token is sampled).
        Default: K for every row.
    draft_probs : Tensor, float32 / float16 / bfloat16, shape [B, K, V], optional
        The draft's distribution ``q`` at each position (rows need not be exactly normalized).
        None: q is one-hot at the proposed token.
    temperature : Tensor float32 [B], or float, optional
        ``> 0``: sampling at that temperature; ``0``: greedy. Greedy and sampling rows mix in one
        batch. Default (None): every row greedy.
    top_k : Tensor int32 / int64 [B], or int, optional
        Keep the tokens whose scaled logit is at least the k-th largest (ties kept); ``<= 0`` or
        ``>= V``: off. Applied to p before verification.
    top_p : Tensor float32 [B], or float, optional
        After top_k, keep the smallest set of most probable tokens whose mass reaches ``top_p``
        (ties at the threshold kept); outside ``(0, 1)``: off.
    seeds, offsets : Tensor, int64, shape [B], optional
        Per-row randomness: use one seed per sequence and a new offset per call (e.g. the decode
        step). ``seeds=None``: drawn from torch's default generator for the device when any
        temperature is given, so ``torch.manual_seed`` makes runs repeatable (the op
        ``torch.ops.bitpress.spec_verify`` itself takes 0). ``offsets=None``: 0.
    backend : str, optional
        Force a backend for this call (see :mod:`bitpress.backends`).

    Returns
    -------
    tokens : Tensor, int64, shape [B, K+1]
        The accepted drafts, then the correction or bonus token, then -1 padding.
    num_accepted : Tensor, int64, shape [B]
        Accepted drafts ``a`` (``0..num_draft[b]``).
    num_emitted : Tensor, int64, shape [B]
        ``a + 1``.

    Notes
    -----
    *Exactness across backends.* Every backend uses the same uniforms, the same base-2 exp
    polynomial (only individually rounded ``+ - *``; no FMA) and the same formulas, so they agree
    bit for bit except through the order of the sums ``S``, ``W`` and the running CDF, which differs
    between the CPU kernel (16/8/4 SIMD lanes), the CUDA kernel (block reductions), the Triton
    kernel and the reference: a decision can differ only when a uniform falls within rounding of a
    boundary (probability ~1e-7 per decision). The tests check identical tokens on many seeds.

    *Cost.* A row reads only the positions it decides: one pass per position; the sampled token
    costs one more pass over that row (CUDA / Triton: two). Rows with ``top_k`` / ``top_p`` take
    binary searches over their positions: up to 32 counting passes (top_k) and ~30 masked sums
    (top_p), from cache on the CPU.

    *Errors.* Shapes, dtypes and devices are checked on every backend. Values (``num_draft`` in
    ``[0, K]``, draft ids in ``[0, V)``, ``temperature >= 0``) are checked on CPU tensors; on CUDA
    that would cost a host sync, so the kernels clamp ``num_draft`` to ``[0, K]``, reject a draft
    id outside the vocabulary without reading it, and treat a negative temperature as greedy.
    ``draft_probs`` values must be finite and ``>= 0``: the CPU backends reject an invalid value
    where they read it (q at the drafts of sampling rows up to the first rejection, and the
    whole row at that rejection); on CUDA they are not checked (a negative q accepts the draft,
    a NaN q rejects it).
    """
    B, dev = target_logits.shape[0], target_logits.device
    if isinstance(temperature, (int, float)):
        temperature = torch.full((B,), float(temperature), dtype=torch.float32, device=dev)
    if isinstance(top_k, int):
        top_k = torch.full((B,), top_k, dtype=torch.int64, device=dev)
    if isinstance(top_p, (int, float)):
        top_p = torch.full((B,), float(top_p), dtype=torch.float32, device=dev)
    if seeds is None and temperature is not None:
        seeds = torch.randint(-(2**63), 2**63 - 1, (B,), dtype=torch.int64, device=dev)
    _, impl = backends.select("spec_verify", dev, backend, target_logits.dtype)
    return impl(
        target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k, top_p, seeds,
        offsets,
    )  # fmt: skip


def _check_spec_verify(
    target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k, top_p, seeds, offsets
):
    """Shapes, dtypes and devices, with the messages of csrc/speculative/spec_verify_torch.cpp."""
    op = "spec_verify"
    _check_dtype(op, "target_logits", target_logits, _FLOAT_DTYPES)
    _check_dim(op, "target_logits", target_logits, 3, "[B, K+1, V]")
    B, K, V = target_logits.shape[0], target_logits.shape[1] - 1, target_logits.shape[2]
    if K < 0 or V < 1:
        _fail(
            op,
            "target_logits must have at least one position (K+1 >= 1) and one token (V >= 1), "
            f"got shape {list(target_logits.shape)}",
        )
    if V >= 2**31:
        _fail(op, f"target_logits.size(2) (V) must be below 2^31, got {V}")
    _check_dtype(op, "draft_tokens", draft_tokens, _INT_DTYPES)
    _check_dim(op, "draft_tokens", draft_tokens, 2, "[B, K]")
    _check_size(op, "draft_tokens", draft_tokens, 0, B, "B = target_logits.size(0)")
    _check_size(op, "draft_tokens", draft_tokens, 1, K, "K = target_logits.size(1) - 1")
    _check_device(op, "draft_tokens", draft_tokens, target_logits, "target_logits")

    def per_row(name, t, dtypes):
        if t is not None:
            _check_dtype(op, name, t, dtypes)
            _check_dim(op, name, t, 1, "[B]")
            _check_size(op, name, t, 0, B, "B = target_logits.size(0)")
            _check_device(op, name, t, target_logits, "target_logits")

    per_row("num_draft", num_draft, _INT_DTYPES)
    if draft_probs is not None:
        _check_dtype(op, "draft_probs", draft_probs, _FLOAT_DTYPES)
        _check_dim(op, "draft_probs", draft_probs, 3, "[B, K, V]")
        _check_size(op, "draft_probs", draft_probs, 0, B, "B = target_logits.size(0)")
        _check_size(op, "draft_probs", draft_probs, 1, K, "K = target_logits.size(1) - 1")
        _check_size(op, "draft_probs", draft_probs, 2, V, "V = target_logits.size(2)")
        _check_device(op, "draft_probs", draft_probs, target_logits, "target_logits")
    per_row("temperature", temperature, (torch.float32,))
    per_row("top_k", top_k, _INT_DTYPES)
    per_row("top_p", top_p, (torch.float32,))
    per_row("seeds", seeds, (torch.int64,))
    per_row("offsets", offsets, (torch.int64,))
    return B, K, V


def _check_spec_verify_values(
    target_logits, draft_tokens, num_draft, temperature, draft_probs=None
):
    """The value checks of the C++ glue (CPU tensors, outside torch.compile: they sync)."""
    if target_logits.device.type != "cpu" or torch.compiler.is_compiling():
        return
    op = "spec_verify"
    B, K, V = target_logits.shape[0], target_logits.shape[1] - 1, target_logits.shape[2]
    n = num_draft.long() if num_draft is not None else torch.full((B,), K, dtype=torch.long)
    d = draft_tokens.long()
    for b in range(B):
        nb = int(n[b])
        if not 0 <= nb <= K:
            _fail(op, f"num_draft values must lie in [0, K] (K = {K}), got num_draft[{b}] = {nb}")
        bad = ((d[b, :nb] < 0) | (d[b, :nb] >= V)).nonzero()
        if len(bad):
            j = int(bad[0, 0])
            _fail(
                op,
                f"draft_tokens values must lie in [0, V) (V = {V}), got draft_tokens[{b}, {j}] "
                f"= {int(d[b, j])}",
            )
        if temperature is not None and not float(temperature[b]) >= 0.0:
            _fail(
                op,
                f"temperature values must be >= 0 (0: greedy), got temperature[{b}] = "
                f"{float(temperature[b]):g}",
            )
        sampling = temperature is not None and float(temperature[b]) > 0.0
        if draft_probs is not None and sampling and nb:
            # q is read at the draft positions of sampling rows: a negative q would accept every
            # draft, a NaN reject every one.
            q = draft_probs[b, :nb].float()
            bad = (~(q >= 0) | torch.isinf(q)).nonzero()
            if len(bad):
                j, v = (int(i) for i in bad[0])
                _fail(
                    op,
                    f"draft_probs values must be finite and >= 0, got draft_probs[{b}, {j}, {v}] "
                    f"= {float(q[j, v]):g}",
                )


@torch.library.register_fake("bitpress::spec_verify")
def _spec_verify_fake(
    target_logits,
    draft_tokens,
    num_draft=None,
    draft_probs=None,
    temperature=None,
    top_k=None,
    top_p=None,
    seeds=None,
    offsets=None,
):
    B, K, _ = _check_spec_verify(
        target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k, top_p, seeds,
        offsets,
    )  # fmt: skip
    new = target_logits.new_empty
    return (
        new((B, K + 1), dtype=torch.int64),
        new((B,), dtype=torch.int64),
        new((B,), dtype=torch.int64),
    )


@backends.register("spec_verify", "cpu")
@backends.register("spec_verify", "cuda", _CUDA_SM80)
def _spec_verify_compiled(*args):
    return torch.ops.bitpress.spec_verify(*args)


@torch.library.custom_op("bitpress::spec_verify_triton", mutates_args=())
def _spec_verify_triton(
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
    args = (target_logits, draft_tokens, num_draft, draft_probs, temperature, top_k, top_p, seeds)
    _check_spec_verify(*args, offsets)
    _check_spec_verify_values(target_logits, draft_tokens, num_draft, temperature, draft_probs)
    return tk_spec_verify.spec_verify(*args, offsets)


torch.library.register_fake("bitpress::spec_verify_triton")(_spec_verify_fake)


@backends.register("spec_verify", "triton")
def _spec_verify_triton_backend(*args):
    return torch.ops.bitpress.spec_verify_triton(*args)


@backends.register("spec_verify", "reference")
def _spec_verify_reference(*args):
    _check_spec_verify(*args)
    _check_spec_verify_values(args[0], args[1], args[2], args[4], args[3])
    return reference.spec_verify(*args)


register_op(
    OpSpec(
        "spec_verify",
        "speculative",
        spec_verify,
        reference.spec_verify,
        cases=cases.spec_verify_cases,
        bench="bench/bench_spec_verify.py",
    )
)
