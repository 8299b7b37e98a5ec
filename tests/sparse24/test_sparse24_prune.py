"""2:4 pruning (bitpress.sparse24.prune): the pattern, each method against its definition, and
the quality order SparseGPT < Wanda < magnitude on correlated inputs."""

from __future__ import annotations

import pytest
import torch
from sparse24_data import assert_24, correlated_inputs, tiny_llama
from torch import nn

from bitpress.calibration import HessianAccumulator
from bitpress.int4.rtn import rtn_quantize
from bitpress.sparse24.prune import (
    check_24,
    find_24_violation,
    magnitude_prune,
    mask_24,
    prune_model,
    sparsegpt_int4,
    sparsegpt_prune,
    wanda_prune,
)


def hessian(x):
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.H


def rel_err(x, w, w_hat):
    ref = x.double() @ w.double().t()
    return float((ref - x.double() @ w_hat.double().t()).norm() / ref.norm())


# --------------------------------------------------------------------------------------------
# The pattern
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 8), (7, 16), (33, 64)])
def test_mask_24_keeps_the_two_largest_of_each_group(shape):
    s = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    m = mask_24(s)
    g = m.reshape(shape[0], -1, 4)
    assert (g.sum(-1) == 2).all()
    sg = s.reshape(shape[0], -1, 4)
    kept_min = torch.where(g, sg, torch.inf).min(-1).values
    dropped_max = torch.where(g, -torch.inf, sg).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_mask_24_ties_go_to_the_lower_positions():
    m = mask_24(torch.zeros(2, 8))
    assert m.tolist() == [[True, True, False, False] * 2] * 2


def test_mask_24_is_a_stable_descending_sort_with_ties():
    # Few distinct values: many ties inside groups, -inf and +inf included.
    s = torch.randint(0, 3, (37, 64), generator=torch.Generator().manual_seed(1)).float()
    s[0, :4] = torch.tensor([float("-inf")] * 4)
    s[1, :4] = torch.tensor([1.0, float("inf"), float("-inf"), float("inf")])
    g = s.reshape(37, 16, 4)
    order = torch.argsort(g, dim=-1, descending=True, stable=True)[..., :2]
    expect = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    assert torch.equal(mask_24(s), expect.reshape(37, 64))


def test_check_24_names_tensor_row_and_group():
    w = magnitude_prune(torch.randn(5, 16))
    check_24(w, "layers.0.q_proj.weight")
    assert find_24_violation(w) is None
    w[3, 9] = 1.0 if w[3, 9] == 0 else w[3, 9]
    w[3, 10] = 1.0 if w[3, 10] == 0 else w[3, 10]
    w[3, 11] = 1.0 if w[3, 11] == 0 else w[3, 11]
    assert find_24_violation(w) == (3, 2)
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.weight: not 2:4.*row 3, group 2"):
        check_24(w, "layers.0.q_proj.weight")
    with pytest.raises(ValueError, match=r"^w: in_features K must be a multiple of 4"):
        check_24(torch.zeros(2, 6), "w")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_magnitude_keeps_largest_abs_and_dtype(dtype):
    w = torch.randn(9, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    p = magnitude_prune(w)
    assert p.dtype == dtype
    assert_24(p)
    keep = p != 0
    assert torch.equal(p[keep], w[keep])
    assert torch.equal(keep, mask_24(w.abs()))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of 4"):
        magnitude_prune(torch.randn(3, 10))
    with pytest.raises(ValueError, match=r"H must have shape \[K, K\] = \[16, 16\]"):
        sparsegpt_prune(torch.randn(3, 16), torch.eye(8))
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 4"):
        sparsegpt_prune(torch.randn(3, 16), torch.eye(16), block_size=6)
    with pytest.raises(ValueError, match="method must be one of"):
        prune_model(nn.Linear(8, 8), "random")


# --------------------------------------------------------------------------------------------
# Each method against its definition
# --------------------------------------------------------------------------------------------


def test_wanda_is_abs_w_times_input_norm():
    x = correlated_inputs(256, 64, seed=3)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    expect = w * mask_24(w.abs() * x.norm(dim=0))
    assert torch.equal(wanda_prune(w, hessian(x)), expect)
    assert torch.equal(wanda_prune(w, x.norm(dim=0)), expect)
    # Equal input norms: Wanda is magnitude pruning.
    assert torch.equal(wanda_prune(w, torch.ones(64)), magnitude_prune(w))


def test_sparsegpt_with_diagonal_hessian_is_wanda():
    """With uncorrelated inputs (H diagonal) the OBS update moves nothing onto other columns
    and the saliency w²/[H⁻¹]ₖₖ² ∝ (w·‖x_k‖)² ranks as Wanda does (no dampening)."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    d = torch.rand(32, generator=torch.Generator().manual_seed(6)) + 0.1
    out = sparsegpt_prune(w, torch.diag(d), damp=0.0)
    assert_24(out)
    torch.testing.assert_close(out, wanda_prune(w, d.sqrt()), rtol=1e-6, atol=1e-6)


def test_sparsegpt_block_size_changes_only_rounding():
    x = correlated_inputs(512, 64, seed=7)
    w = torch.randn(20, 64, generator=torch.Generator().manual_seed(8))
    H = hessian(x)
    a = sparsegpt_prune(w, H, block_size=4)
    b = sparsegpt_prune(w, H, block_size=128)
    assert torch.equal(a != 0, b != 0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sparsegpt_dead_inputs_are_zeroed():
    x = correlated_inputs(256, 32, seed=9)
    x[:, 5] = 0
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(10))
    out = sparsegpt_prune(w, hessian(x))
    assert_24(out)
    assert (out[:, 5] == 0).all()


# --------------------------------------------------------------------------------------------
# Quality: SparseGPT < Wanda < magnitude
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_error_order_on_correlated_inputs(seed):
    K, N = 128, 96
    x = correlated_inputs(2048, K, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    x, held_out = x[:1536], x[1536:]
    w = torch.randn(N, K, generator=g) / K**0.5
    H = hessian(x)
    errs = {
        "magnitude": rel_err(x, w, magnitude_prune(w)),
        "wanda": rel_err(x, w, wanda_prune(w, H)),
        "sparsegpt": rel_err(x, w, sparsegpt_prune(w, H)),
    }
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs
    assert rel_err(held_out, w, sparsegpt_prune(w, H)) < rel_err(held_out, w, wanda_prune(w, H))


# --------------------------------------------------------------------------------------------
# 2:4 + INT4
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
def test_sparsegpt_int4_beats_prune_then_round(sym):
    K, N, gs = 128, 64, 32
    x = correlated_inputs(2048, K, seed=11)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(12)) / K**0.5
    H = hessian(x)
    qw, mask = sparsegpt_int4(w, H, group_size=gs, sym=sym)
    deq = qw.dequantize()
    assert_24(mask.float())
    assert (mask.reshape(N, -1, 4).sum(-1) == 2).all()
    assert (deq[~mask] == 0).all()
    # Pruned weights hold the zero point exactly.
    zero_of = qw.zeros.t().repeat_interleave(gs, 1)
    assert torch.equal(qw.q.t()[~mask], zero_of[~mask])
    # Against SparseGPT pruning then round-to-nearest of the result, and magnitude then RTN.
    rtn_after = rtn_quantize(sparsegpt_prune(w, H), group_size=gs, sym=sym).dequantize()
    rtn_mag = rtn_quantize(magnitude_prune(w), group_size=gs, sym=sym).dequantize()
    e = rel_err(x, w, deq)
    assert e < rel_err(x, w, rtn_after) < rel_err(x, w, rtn_mag), e


def test_sparsegpt_int4_keeps_a_given_mask():
    K, N = 64, 16
    x = correlated_inputs(512, K, seed=13)
    w = magnitude_prune(torch.randn(N, K, generator=torch.Generator().manual_seed(14)))
    qw, mask = sparsegpt_int4(w, hessian(x), group_size=32, mask=w != 0)
    assert torch.equal(mask, w != 0)
    assert (qw.dequantize()[~mask] == 0).all()
    with pytest.raises(ValueError, match="mask: more than 2"):
        sparsegpt_int4(w, hessian(x), group_size=32, mask=torch.ones(N, K, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)
    ).eval()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_sequential(method):
    model = _mlp()
    x = correlated_inputs(512, 64, seed=15)
    calib = [x[:256], x[256:]]
    prune_model(model, method, None if method == "magnitude" else calib)
    for m in model:
        if isinstance(m, nn.Linear):
            assert_24(m.weight)
            assert (m.weight.reshape(m.out_features, -1, 4) != 0).sum(-1).float().mean() > 1.9


def test_prune_model_sequential_error_order():
    x = correlated_inputs(1024, 64, seed=16)
    with torch.no_grad():
        ref = _mlp()(x)
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = prune_model(_mlp(), method, [x[:512], x[512:]])
        with torch.no_grad():
            errs[method] = float((model(x) - ref).norm() / ref.norm())
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_prune_model_needs_calibration():
    with pytest.raises(ValueError, match="'sparsegpt' needs calibration"):
        prune_model(_mlp(), "sparsegpt")


def test_prune_model_tiny_llama_layer_by_layer():
    pytest.importorskip("transformers")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        ref = tiny_llama(correlated=True)(ids).logits
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        model = tiny_llama(correlated=True)
        prune_model(model, method, [ids[:2], ids[2:]])
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                if name == "lm_head":
                    assert (m.weight != 0).all()
                else:
                    assert_24(m.weight)
        with torch.no_grad():
            errs[method] = float((model(ids).logits - ref).norm() / ref.norm())
    assert errs["sparsegpt"] < errs["magnitude"], errs
