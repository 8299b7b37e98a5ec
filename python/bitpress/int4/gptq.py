"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), INT4, on the CPU in float32.

For one Linear ``y = x Wᵀ`` (W [N, K]) and calibration inputs X, GPTQ quantizes the columns of W
one at a time and spreads each column's rounding error over the not-yet-quantized columns with
the inverse Hessian of the layer-wise loss ``‖XWᵀ − XŴᵀ‖²``, ``H = 2 XᵀX / n``. The steps follow
the reference implementation (IST-DASLab/gptq, AutoGPTQ, GPTQModel):

* dead inputs (``H[k, k] = 0``: column k never sees a non-zero input) get ``H[k, k] = 1`` and
  ``W[:, k] = 0``: they cannot influence the output, so they quantize to 0 exactly;
* dampening: ``H += damp · mean(diag H) · I`` keeps the Cholesky factorisation well posed;
* ``Hinv = cholesky(H⁻¹, upper=True)``: row i of this factor holds the error-propagation
  coefficients of column i onto columns i.. (the paper's Cholesky reformulation);
* lazy batches of ``block_size`` columns: updates inside a block are applied column by column,
  the block's accumulated error is applied to the rest of W with one matmul.

Groups and act-order (``desc_act``), with GPTQModel's semantics:

* ``act_order``: columns are processed in order of decreasing ``diag(H)`` (the inputs with the
  most energy first, while there is the most freedom left to compensate them).
* without ``static_groups``, group parameters are computed when the quantizer reaches the
  first column of a group *in processing order*: with act-order a group is a run of
  ``group_size`` consecutive permuted columns, so ``g_idx[k] = position of k in the permuted
  order // group_size`` (not monotonic in k); the parameters see the error-updated weights.
  One deliberate difference from the reference: a group that starts inside a lazy batch
  takes its parameters from the current (fully updated) weights, where the reference reads the
  copy made at the start of the batch, so ``block_size`` changes only the float32
  summation order.
* with ``static_groups``, every group's parameters are computed up front from the original
  (un-updated) W over the original column ranges, and ``g_idx[k] = k // group_size`` even with
  act-order (a layout that kernels without g_idx support can run).
* ``group_size = -1``: one group, parameters from the whole (dead-zeroed) W up front.

Group parameters and the rounding follow :mod:`bitpress.int4.rtn` (scales rounded to
``scale_dtype`` before use, so the returned tensors represent exactly the weight GPTQ
compensated for).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from bitpress.calibration import (  # noqa: F401  (HessianAccumulator, run_calibration: API)
    HessianAccumulator,
    calibrate_layerwise,
    replace_module,
    run_calibration,
)
from bitpress.int4.modules import Int4Linear
from bitpress.int4.quantized import QuantizedWeight, check_group_size
from bitpress.int4.rtn import find_params, quantize_values


def _group_aware_order(diag: torch.Tensor, gs: int) -> torch.Tensor:
    """Columns ordered group by group (groups by decreasing max diag(H)), each group's columns by
    decreasing diag(H): a permutation that keeps every group contiguous."""
    K = diag.numel()
    groups = [torch.arange(g, min(g + gs, K)) for g in range(0, K, gs)]
    local = [c[torch.argsort(diag[c], descending=True, stable=True)] for c in groups]
    importance = torch.stack([diag[c].max() for c in groups])
    order = torch.argsort(importance, descending=True, stable=True)
    return torch.cat([local[int(g)] for g in order])


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    static_groups: bool = False,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float16,
    act_group_aware: bool = False,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight [N, K]`` given the Hessian ``H [K, K]`` of its inputs.

    Parameters
    ----------
    weight : Tensor, float, shape [N, K] (nn.Linear orientation)
    H : Tensor, float, shape [K, K]
        ``2 XᵀX / n`` (:class:`HessianAccumulator`); not modified.
    group_size : int
        -1 or a positive multiple of 8.
    sym : bool
        Symmetric (zero 8) or asymmetric groups, formulas of :mod:`bitpress.int4.rtn`.
    act_order : bool
        Process columns by decreasing ``diag(H)`` (``desc_act``).
    damp : float
        Relative dampening: ``H += damp · mean(diag H) · I``; must be > 0 unless H is positive
        definite.
    static_groups : bool
        Group parameters from the original W over original column ranges (see module docstring).
    block_size : int
        Columns per lazy batch.
    scale_dtype : torch.dtype
        dtype of the returned scales.
    act_group_aware : bool
        Without ``act_order``: process the groups by decreasing importance (largest ``diag(H)``
        of their columns) and, inside each group, the columns by decreasing ``diag(H)``
        (GPTQModel's group-aware reordering). Each group's columns stay together, so every
        group's parameters come from its own columns and ``g_idx`` stays ``k // group_size``:
        the kernel needs no row permutation.

    Returns
    -------
    QuantizedWeight; ``g_idx`` is not monotonic with ``act_order`` and no ``static_groups``.
    """
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(
            f"weight must be a floating-point [N, K] tensor, "
            f"got {weight.dtype} {list(weight.shape)}"
        )
    N, K = weight.shape
    if list(H.shape) != [K, K]:
        raise ValueError(f"H must have shape [K, K] = [{K}, {K}], got {list(H.shape)}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    gs = check_group_size(K, group_size)
    G = -(-K // gs)

    W = weight.detach().float().cpu().clone()
    H = H.detach().float().cpu().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales: list[torch.Tensor | None] = [None] * G
    zeros: list[torch.Tensor | None] = [None] * G
    if static_groups or group_size == -1:
        for g in range(G):
            scales[g], zeros[g] = find_params(W[:, g * gs : (g + 1) * gs], sym, scale_dtype)

    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    elif act_group_aware and group_size != -1:
        perm = _group_aware_order(torch.diag(H), gs)
    else:
        perm = torch.arange(K)
    if act_order or act_group_aware:
        W = W[:, perm]
        H = H[perm][:, perm]

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"H + damp·mean(diag H)·I is not positive definite (damp={damp}); increase damp"
        ) from e

    Q = torch.zeros_like(W)
    # Group (in 0..G) of each processed position i, i.e. of original column perm[i].
    if static_groups or (act_group_aware and not act_order):
        group_of_pos = perm // gs
    else:
        group_of_pos = torch.arange(K) // gs

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of_pos[col])
            if scales[g] is None:
                # First column of a dynamic group: parameters from the error-updated weights
                # of the group's columns (those in this block are current in W1, the rest in W).
                cols = torch.cat([W1[:, i:], W[:, i2 : i2 + gs]], dim=1)[:, :gs]
                scales[g], zeros[g] = find_params(cols, sym, scale_dtype)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize_values(w, scales[g], zeros[g])
            Q1[:, i] = q
            err = (w - (q - zeros[g]) * scales[g]) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    Q = Q[:, invperm]
    g_idx = group_of_pos[invperm].to(torch.int32)
    return QuantizedWeight(
        q=Q.t().contiguous().to(torch.uint8),
        scales=torch.stack(scales).to(scale_dtype),
        zeros=torch.stack(zeros).to(torch.uint8),
        g_idx=g_idx,
        group_size=group_size,
        sym=sym,
    )


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------


def _default_filter(name: str, module: nn.Module) -> bool:
    return name.split(".")[-1] != "lm_head"


def _quantize_linears(
    root: nn.Module, linears: dict[str, nn.Linear], hessians: dict, qkw: dict
) -> None:
    for name, lin in linears.items():
        acc = hessians[name]
        if acc.nsamples == 0:
            raise RuntimeError(f"{name}: no calibration input reached this Linear")
        dtype = lin.weight.dtype
        # Scales in the module's dtype when it is a 16-bit one, so that Int4Linear stores exactly
        # the scales GPTQ compensated for; float16 (the checkpoint dtype) otherwise.
        scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        qw = gptq_quantize(lin.weight, acc.H, scale_dtype=scale_dtype, **qkw)
        bias = None if lin.bias is None else lin.bias.detach()
        new = Int4Linear.from_quantized(qw, bias=bias, dtype=dtype)
        replace_module(root, name, new)
        del acc.H


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    *,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    static_groups: bool = False,
    block_size: int = 128,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    act_group_aware: bool = False,
) -> nn.Module:
    """GPTQ-quantize the Linear layers of ``model`` in place, replacing them with ``Int4Linear``.

    Parameters
    ----------
    model : nn.Module
        A transformers causal LM, or any other module (a plain ``nn.Sequential`` of Linear
        layers included).
    calibration : sequence of Tensor (or tuples / dicts of arguments)
        Batches of token ids [B, T] for a transformers model (no padding: every token is counted
        in the Hessians); input tensors for any other module (see :func:`run_calibration`).
    filter_fn : callable(name, module) -> bool, optional
        Which Linear layers to quantize; default: every Linear except ``lm_head``.
    Other arguments are those of :func:`gptq_quantize`.

    Returns
    -------
    The same model.

    For a model with a decoder-layer list (``model.model.layers`` ...), the layers are
    quantized one at a time, sequentially: the inputs of the first layer (hidden states and
    every keyword argument: attention mask, position embeddings, ...) are captured by stopping
    the forward there; then for each layer its Linear inputs are recorded, its Linear layers
    are GPTQ-quantized and replaced, and the layer is run again, now quantized, to produce the
    next layer's inputs, so every layer compensates the error of the layers before it. Without
    such a list, every Linear is hooked, one calibration pass records all Hessians at once, and
    all are quantized.
    """
    filter_fn = filter_fn or _default_filter
    qkw = dict(
        group_size=group_size,
        sym=sym,
        act_order=act_order,
        damp=damp,
        static_groups=static_groups,
        block_size=block_size,
        act_group_aware=act_group_aware,
    )
    return calibrate_layerwise(
        model,
        calibration,
        filter_fn,
        lambda root, linears, hessians: _quantize_linears(root, linears, hessians, qkw),
        desc="GPTQ",
    )
