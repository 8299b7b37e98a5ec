"""Draft distillation: train a small draft on the target's soft targets to raise acceptance.

Knowledge distillation (Hinton et al. 2015): the draft's distribution at temperature T is pulled
toward the target's, ``T^2 * KL(p_target^T || p_draft^T)`` (the T^2 keeps the gradient scale of
the soft term independent of T), optionally mixed with the hard-label cross-entropy on the data:
``loss = alpha * soft + (1 - alpha) * hard``. Speculative acceptance is ``sum_v min(p, q)`` =
1 - total variation, which a smaller KL bounds (Pinsker), so the soft term is what raises it
(DistillSpec, Zhou et al. 2024).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bitpress._core.progress import progress


def distill_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t / T) || softmax(d / T)) + (1 - alpha) * CE(d, labels)``,
    averaged over tokens. Logits [..., V]; labels [...] (-100: ignored), needed when alpha < 1."""
    V = draft_logits.shape[-1]
    d = draft_logits.reshape(-1, V).float()
    t = target_logits.reshape(-1, V).float()
    soft = F.kl_div(
        F.log_softmax(d / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    ) * (temperature**2)
    if alpha >= 1.0:
        return soft
    if labels is None:
        raise ValueError("distill_loss: labels are needed when alpha < 1 (the hard-label term)")
    hard = F.cross_entropy(d, labels.reshape(-1), ignore_index=-100)
    return alpha * soft + (1.0 - alpha) * hard


def distill_draft(
    draft: nn.Module,
    target: nn.Module,
    batches: Iterable[torch.Tensor],
    steps: int,
    temperature: float = 2.0,
    alpha: float = 0.9,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    desc: str = "distill",
) -> list[float]:
    """Train ``draft`` (in place) on ``target``'s soft targets; returns the loss per step.

    Parameters
    ----------
    draft, target : transformers causal LMs with the same vocabulary (the target is frozen).
    batches : token ids [B, T], cycled for ``steps`` AdamW steps (cosine learning rate).
    temperature : T of the soft targets (the KL term is scaled by T^2).
    alpha : weight of the soft term; ``1 - alpha`` weights the hard-label cross-entropy on the
        next token of the data.
    log : called with a line every ``log_every`` steps and at the last one; a progress bar over
        the steps (loss as postfix) is shown on stderr as well, unless quiet
        (:mod:`bitpress._core.progress`), labelled ``desc``.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("distill_draft: batches is empty")
    target.eval()
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    losses = []
    with progress(total=steps, desc=desc, unit="step") as bar:
        for step, ids in enumerate(itertools.islice(itertools.cycle(batches), steps)):
            with torch.no_grad():
                t_logits = target(input_ids=ids).logits[:, :-1]
            d_logits = draft(input_ids=ids).logits[:, :-1]
            loss = distill_loss(d_logits, t_logits, ids[:, 1:], temperature, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(loss=losses[-1])
            if log is not None and (step % log_every == 0 or step == steps - 1):
                bar.clear()  # on a terminal, the log line must not land inside the bar
                log(f"  distill step {step:4d}  loss {losses[-1]:.4f}")
    draft.eval()
    return losses
