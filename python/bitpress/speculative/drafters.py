"""Drafters for :class:`bitpress.speculative.SpeculativeGenerator`, and the batched KV cache with
ragged rows that the generator and the model drafters share.

A drafter proposes up to K tokens per row for a whole batch at once, and is told afterwards how
many the target accepted. Four kinds:

* :class:`ModelDrafter`: a small causal LM with the target's vocabulary;
* :class:`PromptLookupDrafter`: n-gram match in the prompt and the text so far (no model);
* :class:`Int4SelfDrafter`: the target with its Linear layers quantized to INT4 (bitpress
  ``Int4Linear``), sharing the embeddings and the head;
* :class:`LayerSkipDrafter`: the target's first L layers, its final norm and its head (early
  exit), sharing their weights with the target.

Caches (:class:`SlotCache`): one transformers ``DynamicCache`` per model for the whole batch.
Each row has its own logical positions (explicit ``position_ids``: the number of valid slots
before a token), and a boolean slot mask says which cache slots hold that row's accepted
tokens. Slots that a step appended but the target rejected are masked out (the 4-D attention mask
hides them), trailing slots dead in every row are cropped at once, and the cache is compacted
(live slots gathered to the right, left-padded) once dead slots outnumber a fraction of the live
ones, so memory follows the accepted tokens, not steps x K.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from bitpress.int4.config import Int4Config, quantize_int4

# --------------------------------------------------------------------------------------------
# The batched cache with ragged rows


class SlotCache:
    """A causal LM with one ``DynamicCache`` for the batch and a validity mask over its slots.

    ``valid[b, s]``: slot ``s`` of the cache holds an accepted token of row ``b``. A token's
    position id is the number of valid slots before it in its row, so holes (left padding,
    rejected drafts, dead filler slots) never shift positions.
    """

    # Compact when dead slots exceed max(MIN_DEAD, COMPACT_RATIO x live slots): a gather of the
    # whole cache, amortized over the steps that produced that many dead slots.
    COMPACT_RATIO = 0.5
    MIN_DEAD = 64

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = None
        self.valid: torch.Tensor | None = None
        self.compactions = 0

    def reset(self, batch: int, device: torch.device) -> None:
        from transformers import DynamicCache

        # No config: plain (full-attention) layers everywhere; the 4-D mask below is the only mask
        # the model sees, so a sliding-window config is not applied (see the generator's notes).
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.compactions = 0

    @property
    def lengths(self) -> torch.Tensor:
        """Valid (accepted) tokens per row: the position id of the row's next token."""
        return self.valid.sum(1)

    def forward(
        self, tokens: torch.Tensor, tok_valid: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """Append ``tokens`` [B, q] (``tok_valid``: which are real; the others become dead slots)
        and return the logits [B, q, V] (``last_only``: [B, 1, V])."""
        B, q = tokens.shape
        L = self.valid.shape[1]
        dev = tokens.device
        pos = (self.lengths[:, None] + tok_valid.long().cumsum(1) - 1).clamp_min(0)
        full = torch.cat([self.valid, tok_valid], 1)  # [B, L + q]
        i = torch.arange(q, device=dev)[:, None]
        j = torch.arange(L + q, device=dev)[None, :]
        # Every query sees its own slot, even a dead one: a fully masked softmax row would turn
        # into NaN keys/values in the next layer, and NaN * 0 poisons the rows that mask it.
        allowed = (full[:, None, :] & (j <= L + i)[None]) | (j == L + i)[None]
        dtype = _model_dtype(self.model)
        mask = torch.zeros(B, 1, q, L + q, dtype=dtype, device=dev)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        kw = {"logits_to_keep": 1} if last_only else {}
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=True,
            **kw,
        )
        self.cache = out.past_key_values
        self.valid = full
        return out.logits

    def commit(self, keep: torch.Tensor) -> None:
        """Of the last ``keep.shape[1]`` slots, keep those where ``keep`` is True (and that were
        valid); crop the trailing slots dead in every row."""
        n = keep.shape[1]
        if n:
            self.valid[:, -n:] &= keep
        live_cols = self.valid.any(0)
        L = live_cols.numel()
        last = int(live_cols.nonzero().max()) + 1 if bool(live_cols.any()) else 0
        if last < L:
            self._slice(slice(0, last))

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (finished rows leave the batch: no more compute for them)."""
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys.numel():
                layer.keys = layer.keys[rows]
                layer.values = layer.values[rows]
        self.valid = self.valid[rows]
        self.maybe_compact()

    def maybe_compact(self) -> bool:
        B, L = self.valid.shape
        live = int(self.valid.sum())
        dead = B * L - live
        # Dead columns at the left (rows that left, shorter prompts) are removed by compaction.
        if dead > max(self.MIN_DEAD, self.COMPACT_RATIO * live):
            self.compact()
            return True
        return False

    def compact(self) -> None:
        """Gather each row's live slots to the right end (left padding), dropping the holes."""
        B, L = self.valid.shape
        counts = self.valid.sum(1)
        new_len = int(counts.max()) if B else 0
        # A stable sort on validity puts the dead slots first and keeps the live ones in order.
        idx = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices[:, L - new_len :]
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys.numel():
                _, H, _, D = layer.keys.shape
                g = idx[:, None, :, None].expand(B, H, new_len, D)
                layer.keys = layer.keys.gather(2, g)
                Dv = layer.values.shape[-1]
                layer.values = layer.values.gather(
                    2, idx[:, None, :, None].expand(B, H, new_len, Dv)
                )
        self.valid = self.valid.gather(1, idx)
        self.compactions += 1

    def _slice(self, cols: slice) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys.numel():
                layer.keys = layer.keys[:, :, cols]
                layer.values = layer.values[:, :, cols]
        self.valid = self.valid[:, cols]

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


# --------------------------------------------------------------------------------------------
# Sampling parameters and the draft's distribution


@dataclasses.dataclass
class Sampling:
    """Per-row sampling parameters of one generate call (temperature 0: greedy)."""

    temperature: torch.Tensor  # float32 [B]
    top_k: torch.Tensor | None  # int64 [B] or None
    top_p: torch.Tensor | None  # float32 [B] or None
    generator: torch.Generator | None = None  # draws of the drafter

    @property
    def greedy(self) -> bool:
        return not bool((self.temperature > 0).any())

    def select(self, rows: torch.Tensor) -> Sampling:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Sampling(self.temperature[rows], pick(self.top_k), pick(self.top_p), self.generator)


def filtered_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """softmax(logits / T) restricted to top_k, then top_p, per row; [B, V] float32. Greedy rows:
    one-hot at the argmax. (The draft's q: any q is exact as long as the drafts are drawn from
    it, this one follows the target's filters to raise acceptance.)"""
    x = logits.float()
    temp = s.temperature.float()
    greedy = ~(temp > 0)
    z = x / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    V = z.shape[-1]
    if s.top_k is not None:
        k = s.top_k.long()
        on = (k > 0) & (k < V)
        kth = z.sort(-1, descending=True).values.gather(-1, (k.clamp(1, V) - 1)[:, None])
        z = torch.where(on[:, None] & (z < kth), torch.full_like(z, float("-inf")), z)
    p = torch.softmax(z, -1)
    if s.top_p is not None:
        tp = s.top_p.float()
        on = (tp > 0) & (tp < 1)
        sp, order = p.sort(-1, descending=True)
        before = sp.cumsum(-1) - sp  # mass strictly before each sorted token
        drop_sorted = before >= tp[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        p = torch.where(on[:, None] & drop, torch.zeros_like(p), p)
        p = p / p.sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(x.argmax(-1), V).to(p.dtype)
    return torch.where(greedy[:, None], onehot, p)


# --------------------------------------------------------------------------------------------
# Drafters


class Drafter:
    """What the generator needs from a drafter. All tensors cover the active rows of the batch.

    ``history`` [B, C] holds each row's text so far (prompt and accepted tokens, right-padded),
    ``lengths`` [B] its length; the last token of a row is the one the target has not yet seen.

    * :meth:`start` is called once after the target's prefill (the first new token is already in
      the history).
    * :meth:`propose` returns ``(draft_tokens [B, K], num_draft [B], draft_probs [B, K, V] or
      None)`` with ``num_draft <= max_draft`` per row and K = ``max_draft.max()``. ``draft_probs``
      is None for deterministic drafts (one-hot q); a drafter that samples returns its q.
    * :meth:`accept` gets the accepted counts [B] of the last proposal (only after a proposal).
    * :meth:`select` keeps the given rows (finished rows leave the batch).
    """

    def start(self, history: torch.Tensor, lengths: torch.Tensor, sampling: Sampling) -> None:
        pass

    def propose(
        self,
        history: torch.Tensor,
        lengths: torch.Tensor,
        max_draft: torch.Tensor,
        sampling: Sampling,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def accept(self, num_accepted: torch.Tensor) -> None:
        pass

    def select(self, rows: torch.Tensor) -> None:
        pass

    def stats(self) -> dict[str, object]:
        return {}


class ModelDrafter(Drafter):
    """A small causal LM with the target's vocabulary drafts K tokens autoregressively (K
    forward passes of the draft per step, one per token, for the whole batch).

    Its cache holds a prefix of each row's history: the tokens not yet in it (1 normally, 2 when
    the target accepted every draft: the last draft and the bonus token) go in as a left-padded
    chunk in the first pass. Greedy rows draft the draft's argmax; sampling rows draw from the
    draft's own distribution with the target's temperature/top-k/top-p and return it as q.

    ``confidence``: stop drafting for a row after a token whose draft probability is below it
    (transformers' ``assistant_confidence_threshold``); the step ends early when every row
    stopped. None: always ``max_draft`` tokens.
    """

    def __init__(self, model: nn.Module, confidence: float | None = None):
        self.model = model
        self.confidence = confidence
        self.slots = SlotCache(model)
        self._chunk = 0
        self._k = 0

    def start(self, history, lengths, sampling):
        # Prefill with the whole history but the last token (it goes in with the first draft pass,
        # like every later pending token); no logits are needed.
        B, C = history.shape
        self.slots.reset(B, history.device)
        n = lengths - 1
        tok_valid = torch.arange(C, device=history.device)[None, :] < n[:, None]
        width = int(n.max())
        if width > 0:
            # Right-padded history -> left-padded prefill (the cache is left-padded).
            idx = torch.arange(width, device=history.device)[None, :] - (width - n)[:, None]
            ok = idx >= 0
            toks = history.gather(1, idx.clamp_min(0)).masked_fill(~ok, 0)
            self.slots.forward(toks, ok, last_only=True)
        del tok_valid

    def propose(self, history, lengths, max_draft, sampling):
        dev = history.device
        K = int(max_draft.max())
        have = self.slots.lengths
        w = lengths - have  # pending tokens per row (>= 1)
        P = int(w.max())
        j = torch.arange(P, device=dev)[None, :]
        idx = have[:, None] + j - (P - w)[:, None]
        ok = j >= (P - w)[:, None]
        toks = history.gather(1, idx.clamp(0, history.shape[1] - 1)).masked_fill(~ok, 0)
        logits = self.slots.forward(toks, ok)[:, -1]
        drafts, probs = [], []
        num = max_draft.clone()
        for i in range(K):
            if i:
                one = torch.ones_like(drafts[-1][:, None], dtype=torch.bool)
                logits = self.slots.forward(drafts[-1][:, None], one)[:, -1]
            if sampling.greedy:
                drafts.append(logits.argmax(-1))
                conf = torch.softmax(logits.float(), -1).max(-1).values if self.confidence else None
            else:
                q = filtered_probs(logits, sampling)
                drafts.append(torch.multinomial(q, 1, generator=sampling.generator)[:, 0])
                probs.append(q)
                conf = q.gather(-1, drafts[-1][:, None])[:, 0]
            if self.confidence is not None:
                # Stop a row after a draft the draft itself doubts (its probability below the
                # threshold): it would likely be rejected, and later drafts cost forward passes
                # of both models. Depends on the draft alone, so the output stays exact.
                num = torch.where((conf < self.confidence) & (num > i + 1), i + 1, num)
                if bool((num <= i + 1).all()):
                    break
        K = len(drafts)
        self._chunk, self._k = P, K
        d = torch.stack(drafts, 1)
        q = torch.stack(probs, 1) if probs else None
        return d, num.clamp(max=K), q

    def accept(self, num_accepted):
        # The last proposal appended the pending chunk (P slots, already valid or dead) and the
        # drafts d1..d_{K-1}; d_j stays iff the target accepted it (j <= a).
        K = self._k
        keep_pending = torch.ones(
            num_accepted.shape[0], self._chunk, dtype=torch.bool, device=num_accepted.device
        )
        keep_drafts = (
            torch.arange(K - 1, device=num_accepted.device)[None, :] < num_accepted[:, None]
        )
        self.slots.commit(torch.cat([keep_pending, keep_drafts], 1))
        self.slots.maybe_compact()

    def select(self, rows):
        self.slots.select(rows)

    def stats(self):
        return {"draft_cache_compactions": self.slots.compactions}


class PromptLookupDrafter(Drafter):
    """Prompt lookup decoding (Saxena 2023): find the most recent earlier occurrence of the
    row's last n tokens (n from ``max_ngram`` down to ``min_ngram``) in its prompt and generated
    text, and propose the tokens that followed it. No model; deterministic (q one-hot)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"PromptLookupDrafter: need 1 <= min_ngram <= max_ngram, got {min_ngram}, "
                f"{max_ngram}"
            )
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, history, lengths, max_draft, sampling):
        B, C = history.shape
        dev = history.device
        K = int(max_draft.max())
        cont = torch.full((B,), -1, dtype=torch.long, device=dev)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if C < n + 1:
                continue
            tail_idx = (lengths[:, None] - n + torch.arange(n, device=dev)[None, :]).clamp_min(0)
            tail = history.gather(1, tail_idx)  # [B, n]
            windows = history.unfold(1, n, 1)  # [B, C - n + 1, n]
            starts = torch.arange(windows.shape[1], device=dev)[None, :]
            # Earlier occurrences only (not the tail itself), with at least one token after them.
            hit = (windows == tail[:, None, :]).all(-1) & (starts + n < lengths[:, None])
            hit &= (lengths >= n + 1)[:, None]
            last = torch.where(hit, starts, -1).max(1).values
            cont = torch.where((cont < 0) & (last >= 0), last + n, cont)
        avail = torch.where(cont >= 0, lengths - cont, 0)
        num = torch.minimum(max_draft, avail).clamp_min(0)
        idx = (cont.clamp_min(0)[:, None] + torch.arange(K, device=dev)[None, :]).clamp(max=C - 1)
        d = history.gather(1, idx)
        d = torch.where(torch.arange(K, device=dev)[None, :] < num[:, None], d, 0)
        return d, num, None


class Int4SelfDrafter(ModelDrafter):
    """The target itself with its Linear layers quantized to INT4 by bitpress (RTN; ``config``:
    any :class:`bitpress.Int4Config`), sharing the target's embeddings and head (the
    quantizer's default filter keeps ``lm_head``)."""

    def __init__(self, target: nn.Module, config: Int4Config | None = None):
        shared = list(target.get_input_embeddings().parameters())
        head = target.get_output_embeddings()
        if head is not None:
            shared += list(head.parameters())
        # deepcopy with the shared parameters pre-seeded in the memo: they are not copied.
        draft = copy.deepcopy(target, memo={id(p): p for p in shared})
        if config is None:
            hidden = target.get_input_embeddings().weight.shape[1]
            gs = next((g for g in (128, 64, 32) if hidden % g == 0), -1)
            config = Int4Config(group_size=gs, sym=True)
        quantize_int4(draft, config)
        super().__init__(draft.eval())


def decoder_layers_path(model: nn.Module) -> str:
    """The dotted name of the ModuleList of decoder layers (``model.layers``, ``transformer.h``)."""
    n = model.config.num_hidden_layers
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and name:
            return name
    raise ValueError(f"no ModuleList of {n} decoder layers found in {type(model).__name__}")


def truncated_view(model: nn.Module, num_layers: int) -> nn.Module:
    """A model object that runs ``model``'s first ``num_layers`` decoder layers, then its final
    norm and head. Shares every weight with ``model`` (shallow copies of the modules on the path
    to the layer list, and a config copy with ``num_hidden_layers = num_layers``)."""
    total = model.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must lie in [1, {total}], got {num_layers}")
    path = decoder_layers_path(model).split(".")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = num_layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:num_layers]

    def shallow(m):
        c = copy.copy(m)
        c._modules = dict(m._modules)
        if hasattr(c, "config"):
            c.config = cfg
        return c

    root = shallow(model)
    parent = root
    for name in path[:-1]:
        child = shallow(parent._modules[name])
        parent._modules[name] = child
        parent = child
    parent._modules[path[-1]] = nn.ModuleList(list(parent._modules[path[-1]])[:num_layers])
    return root


class LayerSkipDrafter(ModelDrafter):
    """Early exit (LayerSkip, Elhoushi et al. 2024): the target's first ``num_layers`` layers,
    then its final norm and head; no extra weights. Best with a target trained for early exit;
    any target works (exactness does not depend on the draft)."""

    def __init__(self, target: nn.Module, num_layers: int):
        super().__init__(truncated_view(target, num_layers))
