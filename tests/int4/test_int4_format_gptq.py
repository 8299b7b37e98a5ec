"""GPTQ checkpoint tensors <-> QuantizedWeight: exact round trips, both zero-point conventions,
every group size, act-order, hand-built words that pin the layout, and the error messages."""

from __future__ import annotations

import pytest
import torch

from bitpress import reference
from bitpress.int4.format_gptq import gptq_to_quantized, quantized_to_gptq
from bitpress.int4.quantized import QuantizedWeight

GROUP_SIZES = [32, 64, 128, -1]


def _to_int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _random_qw(K, N, group_size, sym, act_order, gen, scale_dtype=torch.float16):
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    q = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.uint8)
    if sym:
        zeros = torch.full((G, N), 8, dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 16, (G, N), generator=gen, dtype=torch.uint8)
        zeros[0, :4] = torch.tensor([0, 15, 8, 1], dtype=torch.uint8)  # the edge values
    scales = (torch.rand(G, N, generator=gen) * 0.05 + 1e-3).to(scale_dtype)
    if act_order:
        g_idx = (torch.randperm(K, generator=gen) // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(K, dtype=torch.int32) // gs).to(torch.int32)
    return QuantizedWeight(q, scales, zeros, g_idx, group_size, sym)


def _assert_qw_equal(a: QuantizedWeight, b: QuantizedWeight):
    assert torch.equal(a.q, b.q)
    assert a.scales.dtype == b.scales.dtype and torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert a.g_idx.dtype == b.g_idx.dtype == torch.int32 and torch.equal(a.g_idx, b.g_idx)
    assert (a.group_size, a.sym) == (b.group_size, b.sym)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_round_trip_quantized_to_gptq_and_back(fmt, group_size, sym, act_order):
    gen = torch.Generator().manual_seed(1)
    qw = _random_qw(256, 40, group_size, sym, act_order, gen)
    t = quantized_to_gptq(qw, fmt)
    assert t["qweight"].dtype == t["qzeros"].dtype == t["g_idx"].dtype == torch.int32
    assert list(t["qweight"].shape) == [32, 40]
    assert list(t["qzeros"].shape) == [qw.scales.shape[0], 5]
    back = gptq_to_quantized(
        t["qweight"],
        t["qzeros"],
        t["scales"],
        t["g_idx"],
        group_size=group_size,
        sym=sym,
        checkpoint_format=fmt,
    )
    _assert_qw_equal(back, qw)
    # The represented weight is what the reference kernel computes from the v2 tensors.
    v2 = qw.to_gptq()
    ref = reference.int4_dequantize(
        v2["qweight"], v2["scales"], v2["qzeros"], v2["g_idx"], group_size, torch.float32
    )
    assert torch.equal(back.dequantize(), ref.t())


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("act_order", [False, True])
def test_round_trip_checkpoint_words_exact(fmt, group_size, act_order):
    # Arbitrary int32 words (every bit pattern, sign bit included) survive read + write.
    gen = torch.Generator().manual_seed(2)
    K, N = 384, 24
    G = 1 if group_size == -1 else K // group_size
    words = dict(
        qweight=torch.randint(-(2**31), 2**31, (K // 8, N), generator=gen, dtype=torch.int64),
        qzeros=torch.randint(-(2**31), 2**31, (G, N // 8), generator=gen, dtype=torch.int64),
    )
    words = {k: v.to(torch.int32) for k, v in words.items()}
    scales = torch.randn(G, N, generator=gen).to(torch.float16)
    g_idx = torch.arange(K, dtype=torch.int32) // (K if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    qw = gptq_to_quantized(
        words["qweight"],
        words["qzeros"],
        scales,
        g_idx,
        group_size=group_size,
        sym=False,
        checkpoint_format=fmt,
    )
    out = quantized_to_gptq(qw, fmt)
    assert torch.equal(out["qweight"], words["qweight"])
    assert torch.equal(out["qzeros"], words["qzeros"])
    assert torch.equal(out["scales"], scales)
    assert torch.equal(out["g_idx"], g_idx)


def test_hand_built_words_pin_layout():
    # K = 16, N = 8: q[k, n] = (k + n) % 16, written word by word as AutoGPTQ's pack() does.
    K, N = 16, 8
    qweight = torch.zeros(K // 8, N, dtype=torch.int32)
    for r in range(K // 8):
        for n in range(N):
            v = 0
            for j in range(8):
                v |= ((8 * r + j + n) % 16) << (4 * j)
            qweight[r, n] = _to_int32(v)
    real_z = [0, 1, 2, 7, 8, 9, 14, 15]
    qz_v1 = _to_int32(sum(((z - 1) & 0xF) << (4 * j) for j, z in enumerate(real_z)))
    qz_v2 = _to_int32(sum(z << (4 * j) for j, z in enumerate(real_z)))
    scales = torch.arange(1, N + 1, dtype=torch.float16).view(1, N) / 64
    for fmt, word in (("gptq", qz_v1), ("gptq_v2", qz_v2)):
        qw = gptq_to_quantized(
            qweight,
            torch.tensor([[word]], dtype=torch.int32),
            scales,
            group_size=-1,
            sym=False,
            checkpoint_format=fmt,
        )
        assert qw.zeros.tolist() == [real_z]
        w = qw.dequantize(torch.float64)
        for n in range(N):
            for k in range(K):
                expect = (((k + n) % 16) - real_z[n]) * (n + 1) / 64
                assert w[n, k].item() == expect
        assert torch.equal(quantized_to_gptq(qw, fmt)["qzeros"], torch.tensor([[word]]).int())


def test_v1_symmetric_stores_0x77777777_and_reads_8():
    qw = _random_qw(64, 16, 32, True, False, torch.Generator().manual_seed(3))
    t = quantized_to_gptq(qw, "gptq")
    assert (t["qzeros"] == 0x77777777).all()
    assert (quantized_to_gptq(qw, "gptq_v2")["qzeros"] == _to_int32(0x88888888)).all()
    back = gptq_to_quantized(
        t["qweight"], t["qzeros"], t["scales"], group_size=32, sym=True, checkpoint_format="gptq"
    )
    assert (back.zeros == 8).all()


def test_v1_zero_of_zero_stored_as_15_reads_back_0():
    # Real zero 0 in column 0: v1 stores (0 - 1) & 0xF = 15; read as (15 + 1) & 0xF = 0, not 16.
    word = _to_int32(0xF | (0x7 << 4))
    qw = gptq_to_quantized(
        torch.zeros(1, 2, dtype=torch.int32),
        torch.tensor([[word]], dtype=torch.int32),
        torch.ones(1, 2, dtype=torch.float16),
        group_size=-1,
        sym=False,
    )
    assert qw.zeros.tolist() == [[0, 8]]
    # q = 0 everywhere: output 0 sees (0 - 0) * 1, output 1 sees (0 - 8) * 1.
    assert torch.equal(qw.dequantize()[0], torch.zeros(8))
    assert torch.equal(qw.dequantize()[1], torch.full((8,), -8.0))


def test_v1_sign_extended_qzeros_read_nibble_by_nibble():
    # A writer that packs the v1 zero -1 without masking it sets every higher nibble to 15.
    real_z = [3, 0, 5, 9, 2, 1, 4, 6]
    acc = 0
    for j, z in enumerate(real_z):
        acc |= (z - 1) << (4 * j)  # Python ints sign-extend like int32 arithmetic does
    word = _to_int32(acc)
    assert word == _to_int32(0xFFFFFFF2)
    qw = gptq_to_quantized(
        torch.zeros(1, 8, dtype=torch.int32),
        torch.tensor([[word]], dtype=torch.int32),
        torch.ones(1, 8, dtype=torch.float16),
        group_size=-1,
        sym=False,
        checkpoint_format="gptq",
    )
    # Nibble 0 reads 3; the -1 and everything it overwrote read (15 + 1) & 0xF = 0.
    assert qw.zeros.tolist() == [[3, 0, 0, 0, 0, 0, 0, 0]]
    assert int(qw.zeros.max()) <= 15


def test_g_idx_none_means_k_div_group_size_and_minus_one_one_group():
    qw = _random_qw(96, 8, 32, False, False, torch.Generator().manual_seed(4))
    t = quantized_to_gptq(qw)
    back = gptq_to_quantized(t["qweight"], t["qzeros"], t["scales"], group_size=32, sym=False)
    assert back.g_idx.tolist() == [k // 32 for k in range(96)]
    qw1 = _random_qw(96, 8, -1, True, False, torch.Generator().manual_seed(4))
    t1 = quantized_to_gptq(qw1)
    back1 = gptq_to_quantized(t1["qweight"], t1["qzeros"], t1["scales"], group_size=-1)
    assert back1.g_idx.tolist() == [0] * 96 and back1.scales.shape == (1, 8)


def test_qzeros_none_symmetric():
    qw = _random_qw(64, 8, 32, True, False, torch.Generator().manual_seed(5))
    t = quantized_to_gptq(qw)
    back = gptq_to_quantized(t["qweight"], None, t["scales"], group_size=32, sym=True)
    _assert_qw_equal(back, qw)


def test_act_order_group_may_be_empty():
    # desc_act: g_idx in [0, G), not monotonic; a group without rows is legal.
    K, N = 64, 8
    g_idx = torch.tensor([1, 0] * 32, dtype=torch.int32)  # group 2 and 3 (of G = 4) empty
    qw = gptq_to_quantized(
        torch.zeros(K // 8, N, dtype=torch.int32),
        torch.full((4, 1), 0x77777777, dtype=torch.int32),
        torch.ones(4, N, dtype=torch.float16),
        g_idx,
        group_size=16,
    )
    assert torch.equal(qw.g_idx, g_idx)


def _valid(K=64, N=16, G=2):
    return dict(
        qweight=torch.zeros(K // 8, N, dtype=torch.int32),
        qzeros=torch.full((G, N // 8), 0x77777777, dtype=torch.int32),
        scales=torch.ones(G, N, dtype=torch.float16),
        g_idx=torch.arange(K, dtype=torch.int32) // 32,
    )


@pytest.mark.parametrize(
    "change, kwargs, exc, match",
    [
        (dict(qweight=torch.zeros(8, 16, dtype=torch.int64)), {}, TypeError, "qweight must be"),
        (dict(qweight=torch.zeros(8, dtype=torch.int32)), {}, ValueError, r"qweight must be 2-D"),
        (dict(scales=torch.ones(2, 16, dtype=torch.int32)), {}, TypeError, "scales must be"),
        (
            dict(scales=torch.ones(3, 16).half()),
            {},
            ValueError,
            r"scales must have shape .*\[2, 16\]",
        ),
        (dict(qzeros=torch.zeros(2, 16, dtype=torch.int32)), {}, ValueError, r"qzeros .*\[2, 2\]"),
        (dict(qzeros=torch.zeros(2, 2)), {}, TypeError, "qzeros must be an int32"),
        (dict(g_idx=torch.zeros(63, dtype=torch.int32)), {}, ValueError, r"g_idx .*\[64\]"),
        (dict(g_idx=torch.full((64,), 2, dtype=torch.int32)), {}, ValueError, r"\[0, 2\)"),
        (dict(g_idx=torch.full((64,), -1, dtype=torch.int32)), {}, ValueError, r"\[0, 2\)"),
        (dict(g_idx=torch.zeros(64)), {}, TypeError, "g_idx must be an integer"),
        ({}, dict(bits=8), ValueError, "bits must be 4"),
        ({}, dict(checkpoint_format="awq"), ValueError, "checkpoint_format"),
        ({}, dict(checkpoint_format="gptq_v2"), ValueError, "sym=True needs .* got 7"),
        ({}, dict(group_size=0), ValueError, "group_size"),
        (dict(qzeros=None), dict(sym=False), ValueError, "qzeros is required"),
    ],
)
def test_errors_name_the_tensor(change, kwargs, exc, match):
    t = {**_valid(), **change}
    kw = dict(group_size=32, sym=True, checkpoint_format="gptq")
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        gptq_to_quantized(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], **kw)


def test_quantized_to_gptq_rejects_bad_format():
    qw = _random_qw(64, 8, 32, True, False, torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="checkpoint_format"):
        quantized_to_gptq(qw, "v1")
