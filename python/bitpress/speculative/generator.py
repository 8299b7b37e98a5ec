"""The speculative generator: a transformers causal LM (the target) plus a drafter, batched, with
ragged acceptance, exact (greedy: the target's argmax chain; sampling: the target's
distribution), verified by :func:`bitpress.ops.spec_verify` once per step for the whole batch.

One step, for all active rows at once:

1. the drafter proposes up to K tokens per row (``num_draft`` per row: adaptive K, fewer near
   ``max_new_tokens``, prompt lookup without a match);
2. the target runs ONE forward pass over ``[last token, d_1 .. d_K]`` per row, with explicit
   position ids (each row's own length) and a 4-D mask over its cache slots;
3. ``spec_verify`` decides every row: ``a`` accepted drafts and one corrected/bonus token;
4. the target's cache keeps the first ``a + 1`` new slots of each row (the last token and the
   accepted drafts); the rejected slots are masked, cropped when dead in every row, and the cache
   is compacted when dead slots pile up (:class:`~bitpress.speculative.drafters.SlotCache`);
5. rows that emitted EOS or reached ``max_new_tokens`` leave the batch (their cache rows are
   dropped: no more compute for them).

Limitation: the cache is a plain ``DynamicCache`` without sliding windows; a sliding-window model
(Mistral with ``sliding_window`` set) is exact only while sequences stay within its window.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from bitpress.speculative.drafters import (
    Drafter,
    Int4SelfDrafter,
    LayerSkipDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    Sampling,
    SlotCache,
)
from bitpress.speculative.ops import spec_verify

# Golden-ratio multiplier: spreads (seed, row) over the 64-bit key space of Philox.
_SEED_MIX = 0x9E3779B97F4A7C15


@dataclasses.dataclass
class GenerationStats:
    """Per-row statistics of one :meth:`SpeculativeGenerator.generate` call (tensors [B]).

    proposed / accepted: draft tokens proposed and accepted; rejections: steps that ended with a
    rejected draft; target_forwards: target forward passes the row took part in (prefill
    included); new_tokens: tokens generated (EOS included); k_history: [steps, B] the K each row
    drafted with at each step (-1: row finished).
    """

    proposed: torch.Tensor
    accepted: torch.Tensor
    rejections: torch.Tensor
    target_forwards: torch.Tensor
    new_tokens: torch.Tensor
    seconds: float
    num_draft: int
    k_history: torch.Tensor
    extra: dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def steps(self) -> torch.Tensor:
        """Verification steps per row (target forward passes after the prefill)."""
        return self.target_forwards - 1

    @property
    def mean_accepted_length(self) -> torch.Tensor:
        """Tokens emitted per verification step (accepted drafts + 1), per row."""
        return (self.accepted + self.steps).float() / self.steps.clamp_min(1).float()

    @property
    def acceptance_rate(self) -> torch.Tensor:
        """Per-token acceptance α: accepted / (accepted + rejections), per row (each verified
        draft token is one trial; the drafts after a rejection are not trials)."""
        return self.accepted.float() / (self.accepted + self.rejections).clamp_min(1).float()

    @property
    def tokens_per_s(self) -> torch.Tensor:
        return self.new_tokens.float() / max(self.seconds, 1e-9)

    def totals(self) -> dict[str, float]:
        """Batch totals: α, observed and expected accepted length, tokens/s."""
        acc, rej = int(self.accepted.sum()), int(self.rejections.sum())
        steps = int(self.steps.sum())
        alpha = acc / max(acc + rej, 1)
        K = self.num_draft
        expected = K + 1.0 if alpha >= 1.0 else (1 - alpha ** (K + 1)) / (1 - alpha)
        return {
            "proposed": int(self.proposed.sum()),
            "accepted": acc,
            "alpha": alpha,
            "mean_accepted_length": (acc + steps) / max(steps, 1),
            "expected_accepted_length": expected,
            "target_forwards": int(self.target_forwards.max()) if len(self.new_tokens) else 0,
            "new_tokens": int(self.new_tokens.sum()),
            "tokens_per_s": float(self.new_tokens.sum()) / max(self.seconds, 1e-9),
        }

    def summary(self) -> str:
        t = self.totals()
        return (
            f"{t['new_tokens']} tokens in {self.seconds:.2f} s ({t['tokens_per_s']:.1f} tokens/s), "
            f"{t['target_forwards']} target forward passes; drafts: {t['accepted']}/"
            f"{t['proposed']} accepted, α = {t['alpha']:.3f}; accepted length "
            f"{t['mean_accepted_length']:.2f} per step (expected from α with K = "
            f"{self.num_draft}: {t['expected_accepted_length']:.2f})"
        )


@dataclasses.dataclass
class GenerationOutput:
    """``sequences`` [B, T + new]: the prompts (as given, left padding included) followed by the
    new tokens, rows that finished early padded with ``pad_token_id`` (as transformers'
    ``generate``); ``stats``: :class:`GenerationStats`. Unpacks as ``(sequences, stats)``."""

    sequences: torch.Tensor
    stats: GenerationStats

    def __iter__(self):
        return iter((self.sequences, self.stats))


class SpeculativeGenerator:
    """Speculative decoding of a transformers causal LM ``target`` with ``drafter``.

    Parameters
    ----------
    target : transformers causal LM (``model(input_ids, attention_mask, position_ids,
        past_key_values)`` with a ``DynamicCache``: Llama, Qwen2, Mistral, GPT-2, ...).
    drafter : :class:`~bitpress.speculative.drafters.Drafter`.
    num_draft : int
        K, the most draft tokens per row and step.
    adaptive : bool
        Choose K per row from its recent acceptance: +1 after a step that accepted every draft,
        -1 after one that rejected, within ``[1, num_draft]`` (``stats.k_history``).
    """

    def __init__(
        self, target: nn.Module, drafter: Drafter, num_draft: int = 4, adaptive: bool = False
    ):
        if num_draft < 0:
            raise ValueError(f"num_draft must be >= 0, got {num_draft}")
        self.target = target
        self.drafter = drafter
        self.num_draft = num_draft
        self.adaptive = adaptive

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = None,
        streamer=None,
        pad_token_id: int | None = None,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` per row.

        ``input_ids`` [B, T] left-padded as ``attention_mask`` says (1: real token). Greedy
        unless ``do_sample``; ``temperature``, ``top_k``, ``top_p`` as in spec_verify.
        ``eos_token_id`` / ``pad_token_id``: None takes the target's ``generation_config``
        (pad: else the first EOS, else 0). ``seed``: per-row Philox seeds for verification and a
        seeded generator for the drafter's draws (None: drawn from torch's default generator, so
        ``torch.manual_seed`` makes runs repeatable). ``streamer``: a transformers streamer
        (``put``/``end``), batch 1.
        """
        t0 = time.perf_counter()
        target, drafter = self.target, self.drafter
        dev = input_ids.device
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()
        if bool((mask.sum(1) == 0).any()):
            raise ValueError("every row needs at least one prompt token (attention_mask)")
        if streamer is not None and B != 1:
            raise ValueError(f"a streamer needs batch 1, got {B} rows")
        gcfg = getattr(target, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(gcfg, "eos_token_id", None)
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if pad_token_id is None:
            pad_token_id = getattr(gcfg, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = eos[0] if eos else 0
        eos_t = torch.tensor(eos, dtype=torch.long, device=dev)

        temp = torch.full((B,), float(temperature) if do_sample else 0.0, device=dev)
        tk = torch.full((B,), int(top_k), device=dev) if (do_sample and top_k) else None
        tp = torch.full((B,), float(top_p), device=dev) if (do_sample and top_p) else None
        if seed is None:
            base = int(torch.randint(-(2**62), 2**62, ()))
        else:
            base = int(seed)
        rows_all = torch.arange(B, device=dev)
        mixed = (base * _SEED_MIX) & (2**63 - 1)
        step = (_SEED_MIX >> 3) & (2**62 - 1)
        seeds = torch.tensor([(mixed + b * step) & (2**63 - 1) for b in range(B)], device=dev)
        gen = torch.Generator(device=dev).manual_seed(base & (2**63 - 1))
        sampling = Sampling(temp, tk, tp, gen)

        # Text so far per row, right-padded (prompt lookup and the drafters' pending tokens).
        K0 = self.num_draft
        cap = T + max_new_tokens + K0 + 2
        lengths = mask.sum(1)
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # real tokens first
        history = torch.zeros(B, cap, dtype=torch.long, device=dev)
        history[:, :T] = input_ids.gather(1, order)
        history[:, :T].masked_fill_(torch.arange(T, device=dev)[None, :] >= lengths[:, None], 0)

        out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
        n_out = torch.zeros(B, dtype=torch.long, device=dev)
        proposed = torch.zeros(B, dtype=torch.long, device=dev)
        accepted = torch.zeros_like(proposed)
        rejections = torch.zeros_like(proposed)
        forwards = torch.zeros_like(proposed)
        k_rows = torch.full((B,), K0, dtype=torch.long, device=dev)
        k_hist: list[torch.Tensor] = []
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if max_new_tokens <= 0:
            return self._output(
                input_ids,
                out[:, :0],
                proposed,
                accepted,
                rejections,
                forwards,
                n_out,
                t0,
                k_hist,
                B,
            )

        # Prefill: the target's first token is a plain (K = 0) verification step.
        tcache = SlotCache(target)
        tcache.reset(B, dev)
        logits = tcache.forward(input_ids, mask, last_only=True)
        empty = torch.zeros(B, 0, dtype=torch.long, device=dev)
        toks, _, _ = spec_verify(
            logits,
            empty,
            None,
            None,
            temp,
            tk,
            tp,
            seeds,
            torch.zeros(B, dtype=torch.long, device=dev),
        )
        forwards += 1
        active = rows_all.clone()  # original row of each active row
        last = toks[:, 0]
        finished = self._emit(
            toks[:, :1],
            torch.ones(B, dtype=torch.long, device=dev),
            active,
            out,
            n_out,
            history,
            lengths,
            eos_t,
            max_new_tokens,
            streamer,
        )
        if max_new_tokens > 1 and K0 > 0:
            drafter.start(history, lengths, sampling)
        step = 0
        while True:
            if bool(finished.any()):
                keep = (~finished).nonzero()[:, 0]
                if keep.numel() == 0:
                    break
                active, last, history, lengths = (
                    active[keep],
                    last[keep],
                    history[keep],
                    lengths[keep],
                )
                sampling = sampling.select(keep)
                tcache.select(keep)
                if K0 > 0:
                    drafter.select(keep)
            elif active.numel() == 0:
                break
            step += 1
            Ba = active.numel()
            remaining = max_new_tokens - n_out[active]
            want = torch.minimum(k_rows[active], remaining - 1).clamp_min(0)
            row_k = torch.full((B,), -1, dtype=torch.long, device=dev)
            row_k[active] = want
            k_hist.append(row_k)
            K = int(want.max())
            if K > 0:
                d, n, q = drafter.propose(history, lengths, want, sampling)
                K = d.shape[1]
            else:
                d = torch.zeros(Ba, 0, dtype=torch.long, device=dev)
                n = torch.zeros(Ba, dtype=torch.long, device=dev)
                q = None
            pos = torch.arange(K + 1, device=dev)[None, :]
            step_toks = torch.cat([last[:, None], d], 1)
            logits = tcache.forward(step_toks, pos <= n[:, None])
            toks, a, emitted = spec_verify(
                logits,
                d,
                n,
                q,
                sampling.temperature,
                sampling.top_k,
                sampling.top_p,
                seeds[active],
                torch.full((Ba,), step, dtype=torch.long, device=dev),
            )
            tcache.commit(pos <= a[:, None])
            tcache.maybe_compact()
            if K > 0:
                drafter.accept(a)
            last = toks.gather(1, a[:, None])[:, 0]
            proposed[active] += n
            accepted[active] += a
            rejections[active] += (a < n).long()
            forwards[active] += 1
            if self.adaptive:
                k = k_rows[active]
                k = torch.where(a >= n, k + 1, k - 1).clamp(1, K0)
                k_rows[active] = torch.where(n > 0, k, k_rows[active])
            finished = self._emit(
                toks, emitted, active, out, n_out, history, lengths, eos_t, max_new_tokens, streamer
            )
        if streamer is not None:
            streamer.end()
        new = int(n_out.max())
        stats_extra = {"target_cache_compactions": tcache.compactions, **drafter.stats()}
        res = self._output(
            input_ids, out[:, :new], proposed, accepted, rejections, forwards, n_out, t0, k_hist, B
        )
        res.stats.extra.update(stats_extra)
        return res

    def _output(
        self, input_ids, new, proposed, accepted, rejections, forwards, n_out, t0, k_hist, B
    ) -> GenerationOutput:
        dev = input_ids.device
        stats = GenerationStats(
            proposed=proposed,
            accepted=accepted,
            rejections=rejections,
            target_forwards=forwards,
            new_tokens=n_out,
            seconds=time.perf_counter() - t0,
            num_draft=self.num_draft,
            k_history=torch.stack(k_hist)
            if k_hist
            else torch.zeros(0, B, dtype=torch.long, device=dev),
        )
        return GenerationOutput(torch.cat([input_ids, new], 1), stats)

    @staticmethod
    def _emit(toks, emitted, active, out, n_out, history, lengths, eos_t, max_new, streamer):
        """Write the emitted tokens of the active rows (cut at EOS and at max_new_tokens) into
        ``out`` and ``history``; returns which active rows are finished."""
        dev = toks.device
        Ba, W = toks.shape
        j = torch.arange(W, device=dev)[None, :]
        room = (max_new - n_out[active])[:, None]
        valid = (j < emitted[:, None]) & (j < room)
        is_eos = torch.isin(toks, eos_t) & valid if eos_t.numel() else torch.zeros_like(valid)
        # Through the first EOS, inclusive.
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        valid &= ~after_eos
        count = valid.sum(1)
        cols = (n_out[active][:, None] + j).clamp(max=out.shape[1] - 1)
        rows = active[:, None].expand(Ba, W)
        out[rows[valid], cols[valid]] = toks[valid]
        hcols = (lengths[:, None] + j).clamp(max=history.shape[1] - 1)
        hrows = torch.arange(Ba, device=dev)[:, None].expand(Ba, W)
        history[hrows[valid], hcols[valid]] = toks[valid]
        lengths += count
        n_out[active] += count
        if streamer is not None:
            streamer.put(toks[0, : int(count[0])].cpu())
        return is_eos.any(1) | (n_out[active] >= max_new)


def make_drafter(target: nn.Module, draft) -> Drafter:
    """``draft``: a Drafter, a causal LM (ModelDrafter), "prompt-lookup", "self-int4" or
    "layer-skip:L"."""
    if isinstance(draft, Drafter):
        return draft
    if isinstance(draft, nn.Module):
        return ModelDrafter(draft)
    if draft == "prompt-lookup":
        return PromptLookupDrafter()
    if draft == "self-int4":
        return Int4SelfDrafter(target)
    if isinstance(draft, str) and draft.startswith("layer-skip:"):
        return LayerSkipDrafter(target, int(draft.split(":", 1)[1]))
    raise ValueError(
        "draft must be a Drafter, a causal LM, 'prompt-lookup', 'self-int4' or 'layer-skip:L', "
        f"got {draft!r}"
    )


def generate(
    target: nn.Module,
    input_ids: torch.Tensor,
    draft="prompt-lookup",
    num_draft: int = 4,
    adaptive: bool = False,
    **kwargs,
) -> GenerationOutput:
    """One-call speculative generation: ``SpeculativeGenerator(target, make_drafter(target,
    draft), num_draft, adaptive).generate(input_ids, **kwargs)``.

    ``draft``: a causal LM with the target's vocabulary, "prompt-lookup", "self-int4" (the
    target quantized to INT4), "layer-skip:L" (the target's first L layers) or a Drafter."""
    gen = SpeculativeGenerator(target, make_drafter(target, draft), num_draft, adaptive)
    return gen.generate(input_ids, **kwargs)
