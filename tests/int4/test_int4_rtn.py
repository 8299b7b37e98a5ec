"""Round-to-nearest INT4: the formulas (checked elementwise), error bounds, SQNR on Gaussian
weights, edge groups, argument checks."""

from __future__ import annotations

import pytest
import torch

from bitpress.int4.format_gptq import gptq_to_quantized, quantized_to_gptq
from bitpress.int4.rtn import rtn_quantize
from bitpress.testing import sqnr_db

# SQNR (dB) of RTN INT4 on N(0, 1) weights [256, 512], measured: 20.5 / 19.8 / 19.1 / 17.9
# (sym, g32 / g64 / g128 / -1) and 21.8 / 20.8 / 19.9 / 18.6 (asym). Bounds ~0.5 dB below.
SQNR_MIN = {
    (32, True): 20.0,
    (64, True): 19.3,
    (128, True): 18.6,
    (-1, True): 17.4,
    (32, False): 21.3,
    (64, False): 20.3,
    (128, False): 19.4,
    (-1, False): 18.0,
}


def _reference_rtn(w: torch.Tensor, gs: int, sym: bool):
    """The module docstring's formulas, column group by column group, written out directly."""
    N, K = w.shape
    gs = K if gs == -1 else gs
    w_hat = torch.empty(N, K, dtype=torch.float64)
    for c0 in range(0, K, gs):
        blk = w[:, c0 : c0 + gs].float()
        if sym:
            amax = blk.abs().amax(dim=1)
            amax = torch.where(amax == 0, torch.ones_like(amax), amax)
            scale = (2 * amax / 15).half().float()
            zero = torch.full_like(scale, 8.0)
        else:
            lo = blk.amin(dim=1).clamp(max=0)
            hi = blk.amax(dim=1).clamp(min=0)
            both0 = (lo == 0) & (hi == 0)
            lo, hi = torch.where(both0, -1.0, lo), torch.where(both0, 1.0, hi)
            scale = ((hi - lo) / 15).half().float()
            zero = torch.round(-lo / scale).clamp(0, 15)
        q = torch.clamp(torch.round(blk / scale[:, None]) + zero[:, None], 0, 15)
        w_hat[:, c0 : c0 + gs] = ((q - zero[:, None]) * scale[:, None]).double()
    return w_hat


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_formulas_and_sqnr(group_size, sym):
    w = torch.randn(256, 512)
    qw = rtn_quantize(w, group_size, sym)
    G = 1 if group_size == -1 else 512 // group_size
    assert qw.q.shape == (512, 256) and qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    assert qw.scales.shape == (G, 256) and qw.scales.dtype == torch.float16
    assert qw.zeros.shape == (G, 256) and qw.zeros.dtype == torch.uint8
    assert qw.g_idx.dtype == torch.int32
    assert qw.g_idx.tolist() == [k // (512 if group_size == -1 else group_size) for k in range(512)]
    if sym:
        assert (qw.zeros == 8).all()
    w_hat = qw.dequantize(torch.float64)
    assert torch.equal(w_hat, _reference_rtn(w, group_size, sym))
    # Rounding error at most half a step (asym: the rounded zero shifts the grid by at most half
    # a step, which is what an end of the range loses), plus the float16 rounding of the scale
    # accumulated over up to 15 steps (15 · 2^-11 < 2^-7).
    step = qw.scales.double()[qw.g_idx.long()].t()
    assert ((w.double() - w_hat).abs() <= step * (0.5 + 2**-7)).all()
    s = sqnr_db(w, w_hat)
    assert s >= SQNR_MIN[(group_size, sym)], s


def test_sqnr_grows_with_smaller_groups():
    w = torch.randn(128, 512)
    s = [sqnr_db(w, rtn_quantize(w, g).dequantize()) for g in (-1, 128, 64, 32)]
    assert s == sorted(s), s


def test_edge_groups():
    K = 64
    w = torch.zeros(4, K)
    w[1] = torch.linspace(0.1, 2.0, K)  # all positive: asym zero 0
    w[2] = -torch.linspace(0.1, 2.0, K)  # all negative: asym zero 15
    w[3, 5] = 1e-9  # fp16 scale underflows
    for sym in (True, False):
        qw = rtn_quantize(w, 32, sym)
        w_hat = qw.dequantize()
        assert torch.isfinite(w_hat).all() and (qw.scales > 0).all()
        assert torch.equal(w_hat[0], torch.zeros(K))  # all-zero row reproduced exactly
        assert sqnr_db(w[1:3], w_hat[1:3]) > 15
        if not sym:
            assert (qw.zeros[:, 1] == 0).all() and (qw.zeros[:, 2] == 15).all()
    # Symmetric groups of positive values use the full 2·max|w|/15 range (no clipping at 7·s).
    qw = rtn_quantize(w, 32, True)
    assert (qw.dequantize()[1] - w[1]).abs().max() <= qw.scales[:, 1].float().max() * (0.5 + 2**-7)


def test_round_trips_through_gptq_tensors():
    qw = rtn_quantize(torch.randn(48, 256), 64, sym=False)
    t = quantized_to_gptq(qw, "gptq")
    back = gptq_to_quantized(
        t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size=64, sym=False
    )
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_dtypes_and_devices_of_input():
    w = torch.randn(32, 128)
    ref = rtn_quantize(w, 32).dequantize()
    assert torch.equal(rtn_quantize(w.double(), 32).dequantize(), ref)
    assert rtn_quantize(w, 32, scale_dtype=torch.bfloat16).scales.dtype == torch.bfloat16
    wb = w.bfloat16()
    assert sqnr_db(wb.float(), rtn_quantize(wb, 32).dequantize()) > 19


@pytest.mark.parametrize(
    "shape, group_size, match",
    [
        ((16, 60), 32, "multiple of 8"),
        ((16, 64), 12, "group_size"),
        ((16, 64), 0, "group_size"),
        ((64,), 32, r"\[N, K\]"),
    ],
)
def test_errors(shape, group_size, match):
    with pytest.raises(ValueError, match=match):
        rtn_quantize(torch.randn(*shape), group_size)
