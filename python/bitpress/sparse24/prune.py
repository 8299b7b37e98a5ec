"""Pruning to the 2:4 pattern: in every group of 4 consecutive weights along K (the input
dimension) of a Linear weight ``W [N, K]``, 2 are kept and 2 are set to zero.

Three methods, from the cheapest to the most accurate:

* **magnitude**: keep the 2 largest ``|W|`` of each group.
* **Wanda** (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language
  Models"): keep the 2 largest ``|W[n, k]| · ‖X[:, k]‖₂`` of each group, where ``X`` [tokens, K]
  are the layer's calibration inputs: a weight on an input channel with large activations
  matters more. No weight update. ``‖X[:, k]‖₂² ∝ H[k, k]``, so the Hessian accumulator of
  :mod:`bitpress.calibration` provides the norms.
* **SparseGPT** (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot"): the Optimal Brain Surgeon update with the inverse Hessian
  ``H = 2 XᵀX / n`` of the layer-wise loss ``‖XWᵀ − XŴᵀ‖²``, column by column, as GPTQ does for
  quantization: when the sweep reaches the first column of a group of 4, it chooses the group's
  mask by the OBS saliency ``w² / [H⁻¹]_kk²`` of the *current* (already updated) weights,
  prunes the 2 least salient, and spreads each removed weight's error ``w / [H⁻¹]_kk`` over
  the columns not yet reached (``W[:, k:] −= err · H⁻¹[k, k:]``, Cholesky form). The other
  steps follow the reference implementation (IST-DASLab/sparsegpt): dead inputs (``H[k, k] =
  0``) get ``H[k, k] = 1`` and ``W[:, k] = 0``; dampening ``H += damp · mean(diag H) · I``; lazy
  batches of ``block_size`` columns (a multiple of 4) whose accumulated error is applied to
  the rest of W with one matmul.

:func:`sparsegpt_int4` is the same sweep with every kept weight also rounded to INT4 (groups of
:mod:`bitpress.int4.rtn`) and its rounding error compensated too (the paper's joint
sparsification and quantization, i.e. GPTQ with a 2:4 mask), for 2:4 + INT4 layers; given a
mask (an already 2:4 weight), it keeps that mask.

:func:`prune_model` applies a method to the Linear layers of a whole model, layer by layer with
calibration batches (:func:`bitpress.calibration.calibrate_layerwise`, shared with GPTQ).

All computation runs on the CPU in float32; the pruned weight comes back in the weight's dtype
(zeros stay zeros, so the pattern survives the cast).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from bitpress.calibration import HessianAccumulator, calibrate_layerwise, replace_module
from bitpress.int4.quantized import QuantizedWeight, check_group_size
from bitpress.int4.rtn import find_params, quantize_values

METHODS = ("magnitude", "wanda", "sparsegpt")


def _check_weight(weight: torch.Tensor, what: str = "weight") -> tuple[int, int]:
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(
            f"{what} must be a floating-point [N, K] tensor, got {weight.dtype} "
            f"{list(weight.shape)}"
        )
    N, K = weight.shape
    if K % 4:
        raise ValueError(f"{what}: in_features K must be a multiple of 4 for 2:4, got {K}")
    return N, K


def _check_hessian(H: torch.Tensor, K: int) -> None:
    if list(H.shape) != [K, K]:
        raise ValueError(f"H must have shape [K, K] = [{K}, {K}], got {list(H.shape)}")


def mask_24(scores: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask (bool, True = kept) that keeps the 2 largest ``scores`` of each group of 4
    along the last dimension; ties go to the lower position (a stable sort)."""
    N, K = scores.shape
    g = scores.float().reshape(N, K // 4, 4)
    # rank_i = #{j : s_j > s_i, or s_j == s_i and j < i}: the position in a stable descending
    # sort; keep rank < 2. Twelve comparisons of [N, K/4] slices cost about half of an argsort
    # over groups of 4 on a Llama-sized layer.
    cols = g.unbind(-1)
    rank = []
    for i, si in enumerate(cols):
        r = torch.zeros_like(si, dtype=torch.uint8)
        for j, sj in enumerate(cols):
            if j != i:
                r += (sj >= si) if j < i else (sj > si)
        rank.append(r)
    return (torch.stack(rank, -1) < 2).reshape(N, K)


def find_24_violation(weight: torch.Tensor) -> tuple[int, int] | None:
    """The first ``(row, group)`` of ``weight [N, K]`` whose group of 4 along K holds more than 2
    nonzeros (row-major order), or None when the whole weight is 2:4."""
    N, K = weight.shape
    if K % 4:
        raise ValueError(f"K must be a multiple of 4 for 2:4, got {K}")
    bad = ((weight != 0).reshape(N, K // 4, 4).sum(-1) > 2).reshape(-1)
    idx = torch.nonzero(bad)
    if idx.numel() == 0:
        return None
    i = int(idx[0])
    return i // (K // 4), i % (K // 4)


def check_24(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ValueError naming ``name`` and the first row and group of 4 that break 2:4."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, K] weight, got shape {list(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(
            f"{name}: in_features K must be a multiple of 4 for 2:4, got {weight.shape[1]}"
        )
    where = find_24_violation(weight)
    if where is not None:
        r, g = where
        vals = weight[r, 4 * g : 4 * g + 4].tolist()
        raise ValueError(
            f"{name}: not 2:4 sparse: row {r}, group {g} (columns {4 * g}..{4 * g + 3}) has "
            f"more than 2 nonzeros: {vals}"
        )


@torch.no_grad()
def magnitude_prune(weight: torch.Tensor) -> torch.Tensor:
    """2:4 by magnitude: ``weight [N, K]`` with the 2 smallest ``|w|`` of each group zeroed."""
    _check_weight(weight)
    return weight * mask_24(weight.abs())


def _column_norms(H_or_norms: torch.Tensor, K: int) -> torch.Tensor:
    t = H_or_norms.detach().float().cpu()
    if t.dim() == 1:
        if t.numel() != K:
            raise ValueError(f"norms must have shape [K] = [{K}], got {list(t.shape)}")
        return t
    _check_hessian(t, K)
    return torch.sqrt(torch.clamp(torch.diag(t), min=0))


@torch.no_grad()
def wanda_prune(weight: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """2:4 by Wanda's score ``|W[n, k]| · ‖X[:, k]‖₂``.

    Parameters
    ----------
    weight : Tensor [N, K], float
    H : Tensor [K, K] (the layer's Hessian ``2 XᵀX / n``: its diagonal gives the input norms up
        to a common factor, which does not change the ranking) or [K] (the norms themselves).
    """
    N, K = _check_weight(weight)
    norms = _column_norms(H, K)
    scores = weight.detach().float().cpu().abs() * norms
    return weight * mask_24(scores).to(weight.device)


def _inverse_hessian_factor(H: torch.Tensor, W: torch.Tensor, damp: float) -> torch.Tensor:
    """Dead inputs zeroed in ``W`` (in place), dampening, ``cholesky(H⁻¹, upper=True)``."""
    H = H.detach().float().cpu().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"H + damp·mean(diag H)·I is not positive definite (damp={damp}); increase damp"
        ) from e


def _check_sweep_args(damp: float, block_size: int) -> None:
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if block_size <= 0 or block_size % 4:
        raise ValueError(f"block_size must be a positive multiple of 4, got {block_size}")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor, H: torch.Tensor, *, damp: float = 0.01, block_size: int = 128
) -> torch.Tensor:
    """SparseGPT 2:4 pruning of ``weight [N, K]`` given the Hessian ``H [K, K]`` of its inputs
    (module docstring). Returns the pruned and updated weight, [N, K], in ``weight.dtype``."""
    N, K = _check_weight(weight)
    _check_hessian(H, K)
    _check_sweep_args(damp, block_size)
    W = weight.detach().float().cpu().clone()
    Hinv = _inverse_hessian_factor(H, W, damp)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        keep = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % 4 == 0:
                # The mask of this group of 4, from the weights as updated so far.
                saliency = W1[:, i : i + 4] ** 2 / d1[i : i + 4] ** 2
                keep[:, i : i + 4] = mask_24(saliency)
            w = W1[:, i]
            q = torch.where(keep[:, i], w, 0.0)
            err = (w - q) / d1[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype).to(weight.device)


@torch.no_grad()
def sparsegpt_int4(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    group_size: int = 128,
    sym: bool = True,
    mask: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[QuantizedWeight, torch.Tensor]:
    """2:4 + INT4 with error compensation: the SparseGPT sweep where every kept weight is also
    rounded to INT4 (GPTQ with a 2:4 mask).

    Parameters
    ----------
    weight : Tensor [N, K], float
    H : Tensor [K, K], the Hessian of the layer's inputs.
    group_size, sym, scale_dtype : INT4 groups of DENSE K positions, formulas of
        :mod:`bitpress.int4.rtn`; a group's parameters are computed when the sweep reaches its
        first column, from the kept (and so far updated) weights of the group.
    mask : bool [N, K], optional
        A fixed 2:4 mask (True = kept), e.g. ``weight != 0`` of an already pruned weight;
        default: chosen per group of 4 by the OBS saliency, as :func:`sparsegpt_prune` does.
    damp, block_size : as :func:`sparsegpt_prune`.

    Returns
    -------
    (QuantizedWeight with ``q [K, N]`` where every pruned weight holds its group's zero point
    (it dequantizes to exactly 0), the 2:4 mask [N, K] bool).
    """
    N, K = _check_weight(weight)
    _check_hessian(H, K)
    _check_sweep_args(damp, block_size)
    gs = check_group_size(K, group_size)
    if mask is not None:
        if mask.shape != weight.shape:
            raise ValueError(f"mask must have shape {list(weight.shape)}, got {list(mask.shape)}")
        mask = mask.detach().cpu().bool()
        if ((mask.reshape(N, K // 4, 4).sum(-1)) > 2).any():
            raise ValueError("mask: more than 2 kept positions in some group of 4")
    W = weight.detach().float().cpu().clone()
    Hinv = _inverse_hessian_factor(H, W, damp)
    G = -(-K // gs)
    scales: list[torch.Tensor | None] = [None] * G
    zeros: list[torch.Tensor | None] = [None] * G
    keep = torch.ones(N, K, dtype=torch.bool) if mask is None else mask.clone()
    Q = torch.zeros(N, K)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        for i in range(i2 - i1):
            col = i1 + i
            if mask is None and i % 4 == 0:
                saliency = W1[:, i : i + 4] ** 2 / d1[i : i + 4] ** 2
                keep[:, col : col + 4] = mask_24(saliency)
            g = col // gs
            if scales[g] is None:
                # Parameters of the group from its kept weights as updated so far (those in this
                # block are current in W1, the rest in W); masks beyond the current group of 4
                # are not chosen yet: those weights all count.
                cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                known = keep[:, col : col + cols.shape[1]]
                if mask is None:
                    known = known.clone()
                    known[:, 4:] = True
                scales[g], zeros[g] = find_params(cols * known, sym, scale_dtype)
            w = W1[:, i]
            q = quantize_values(w, scales[g], zeros[g])
            q = torch.where(keep[:, col], q, zeros[g])
            Q[:, col] = q
            err = (w - (q - zeros[g]) * scales[g]) / d1[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    qw = QuantizedWeight(
        q=Q.t().contiguous().to(torch.uint8),
        scales=torch.stack(scales).to(scale_dtype),
        zeros=torch.stack(zeros).to(torch.uint8),
        g_idx=torch.arange(K, dtype=torch.int32) // gs,
        group_size=group_size,
        sym=sym,
    )
    return qw, keep


def prune_weight(
    weight: torch.Tensor,
    method: str,
    H: torch.Tensor | None = None,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """One layer, by method name: ``"magnitude"`` (no H), ``"wanda"`` or ``"sparsegpt"``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "magnitude":
        return magnitude_prune(weight)
    if H is None:
        raise ValueError(f"method {method!r} needs the Hessian H of the layer's inputs")
    if method == "wanda":
        return wanda_prune(weight, H)
    return sparsegpt_prune(weight, H, damp=damp, block_size=block_size)


def default_filter(name: str, module: nn.Module) -> bool:
    """Every Linear except ``lm_head`` (whose K is rarely pruned) and those whose in_features is
    not a multiple of 8 (the 2:4 metadata packs two groups of 4 per byte)."""
    return name.split(".")[-1] != "lm_head" and module.in_features % 8 == 0


def _in_place(linear: nn.Linear, pruned: torch.Tensor) -> nn.Module:
    linear.weight.data.copy_(pruned)
    return linear


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: str,
    calibration: Sequence | None = None,
    *,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    wrap: Callable[[nn.Linear, torch.Tensor], nn.Module] = _in_place,
) -> nn.Module:
    """Prune the Linear layers of ``model`` to 2:4, in place; returns the model.

    Parameters
    ----------
    model : a transformers causal LM or any other module (a plain ``nn.Sequential`` of Linear
        layers included).
    method : "magnitude" | "wanda" | "sparsegpt".
    calibration : batches (token ids [B, T] for a transformers model, input tensors for any
        other module); needed by wanda and sparsegpt. Layers are pruned one decoder layer at a
        time, each seeing the inputs produced by the already pruned layers before it
        (:func:`bitpress.calibration.calibrate_layerwise`).
    filter_fn : (name, module) -> bool; default :func:`default_filter`.
    wrap : (linear, pruned weight) -> module that replaces the Linear; default: the pruned
        weight is written into the Linear itself.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    keep = filter_fn or default_filter

    def compress(root: nn.Module, linears: dict, hessians: dict | None) -> None:
        for name, lin in linears.items():
            H = None
            if hessians is not None:
                acc: HessianAccumulator = hessians[name]
                if acc.nsamples == 0:
                    raise RuntimeError(f"{name}: no calibration input reached this Linear")
                H = acc.H
            pruned = prune_weight(lin.weight, method, H, damp=damp, block_size=block_size)
            replace_module(root, name, wrap(lin, pruned))
            if hessians is not None:
                del hessians[name].H

    if method == "magnitude":
        linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and keep(n, m)}
        compress(model, linears, None)
        return model
    if not calibration:
        raise ValueError(
            f"method {method!r} needs calibration: a list of token-id batches [B, T] "
            "(transformers models) or of input tensors (any other module)"
        )
    return calibrate_layerwise(
        model,
        calibration,
        lambda n, m: type(m) is nn.Linear and keep(n, m),
        compress,
        desc=f"2:4 {method}",
    )
