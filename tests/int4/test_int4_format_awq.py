"""AWQ tensors <-> QuantizedWeight: hand-built words pin the 0,2,4,6,1,3,5,7 nibble order and
the un-offset zeros; exact round trips; conversion to the GPTQ layout."""

from __future__ import annotations

import pytest
import torch

from bitpress.int4.format_awq import AWQ_ORDER, awq_to_quantized, pack_awq
from bitpress.int4.format_gptq import gptq_to_quantized, quantized_to_gptq
from bitpress.int4.rtn import rtn_quantize


def _to_int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def test_hand_built_word_pins_nibble_order():
    # q[k, n] = n: AutoAWQ's pack() puts column order_map[i] in nibble i: 0x75316420.
    K, N = 8, 8
    qweight = torch.full((K, 1), 0x75316420, dtype=torch.int32)
    qzeros = torch.tensor([[_to_int32(0xF0000001)]], dtype=torch.int32)  # nibble 0, nibble 7
    scales = torch.ones(1, N, dtype=torch.float16)
    qw = awq_to_quantized(qweight, qzeros, scales, group_size=-1)
    assert qw.q.tolist() == [list(range(8))] * K
    # Nibble 0 is column 0, nibble 7 is column AWQ_ORDER[7] = 7; zeros are real (no +1).
    assert qw.zeros.tolist() == [[1, 0, 0, 0, 0, 0, 0, 15]]
    assert qw.sym is False and qw.g_idx.tolist() == [0] * K
    w = qw.dequantize()
    assert w[:, 0].tolist() == [n - z for n, z in zip(range(8), qw.zeros[0].tolist(), strict=True)]


def test_each_nibble_position():
    for i, col in enumerate(AWQ_ORDER):
        word = _to_int32(0x9 << (4 * i))
        qw = awq_to_quantized(
            torch.tensor([[word]] * 8, dtype=torch.int32),
            torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, 8, dtype=torch.float16),
            group_size=-1,
        )
        expect = [0] * 8
        expect[col] = 9
        assert qw.q[0].tolist() == expect, (i, col)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_round_trips_exact(group_size):
    gen = torch.Generator().manual_seed(0)
    K, N = 256, 48
    G = 1 if group_size == -1 else K // group_size
    words = {
        "qweight": torch.randint(-(2**31), 2**31, (K, N // 8), generator=gen, dtype=torch.int64),
        "qzeros": torch.randint(-(2**31), 2**31, (G, N // 8), generator=gen, dtype=torch.int64),
    }
    words = {k: v.to(torch.int32) for k, v in words.items()}
    scales = torch.rand(G, N, generator=gen).half()
    qw = awq_to_quantized(words["qweight"], words["qzeros"], scales, group_size)
    out = pack_awq(qw)
    assert torch.equal(out["qweight"], words["qweight"])
    assert torch.equal(out["qzeros"], words["qzeros"])
    assert torch.equal(out["scales"], scales)
    # And the other direction, through an RTN weight; then into GPTQ v1 tensors and back.
    ref = rtn_quantize(torch.randn(N, K, generator=gen), group_size, sym=False)
    t = pack_awq(ref)
    back = awq_to_quantized(t["qweight"], t["qzeros"], t["scales"], group_size)
    assert torch.equal(back.q, ref.q) and torch.equal(back.zeros, ref.zeros)
    g = quantized_to_gptq(back, "gptq")
    via_gptq = gptq_to_quantized(
        g["qweight"], g["qzeros"], g["scales"], g["g_idx"], group_size=group_size, sym=False
    )
    assert torch.equal(via_gptq.dequantize(), ref.dequantize())


def test_errors():
    ok = dict(
        qweight=torch.zeros(64, 2, dtype=torch.int32),
        qzeros=torch.zeros(2, 2, dtype=torch.int32),
        scales=torch.ones(2, 16, dtype=torch.float16),
    )
    with pytest.raises(TypeError, match="qweight must be an int32"):
        awq_to_quantized(ok["qweight"].long(), ok["qzeros"], ok["scales"], 32)
    with pytest.raises(ValueError, match=r"qzeros must have shape \[G, N/8\] = \[2, 2\]"):
        awq_to_quantized(ok["qweight"], ok["qzeros"][:1], ok["scales"], 32)
    with pytest.raises(ValueError, match=r"scales must have shape \[G, N\] = \[2, 16\]"):
        awq_to_quantized(ok["qweight"], ok["qzeros"], ok["scales"][:, :8], 32)
    with pytest.raises(TypeError, match="qzeros must be an int32"):
        awq_to_quantized(ok["qweight"], ok["qzeros"].float(), ok["scales"], 32)
    qw = rtn_quantize(torch.randn(16, 64), 32, sym=False)
    qw.g_idx = qw.g_idx.flip(0)
    with pytest.raises(ValueError, match="act-order"):
        pack_awq(qw)
