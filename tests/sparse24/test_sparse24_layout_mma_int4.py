"""The mma layout of 2:4 + INT4 weights (bitpress.sparse24.layout_mma_int4): exact round trips,
the word layout against its definition, and the errors of the converters."""

from __future__ import annotations

import pytest
import torch

from bitpress.sparse24 import layout_mma, layout_mma_int4
from bitpress.sparse24.layout import pack_qvalues, unpack_qvalues

NIBBLES = [a | b << 2 for a in range(4) for b in range(a + 1, 4)]


def _pair(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    nib = torch.tensor(NIBBLES, dtype=torch.uint8)[torch.randint(0, 6, (n, k // 4), generator=g)]
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    codes = torch.randint(0, 16, (n, k // 2), generator=g)
    return pack_qvalues(codes), meta, codes


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (32, 224), (80, 1024), (0, 64), (16, 0)])
def test_round_trip_exact(n, k):
    qv, meta, _ = _pair(n, k, n + k)
    qm, mm = layout_mma_int4.to_mma_int4(qv, meta)
    assert qm.dtype == torch.int32 and qm.shape == (n, k // 16)
    assert mm.dtype == torch.int32 and mm.shape == (n // 16, layout_mma.padded_k(k) // 64, 32)
    q2, m2 = layout_mma_int4.from_mma_int4(qm, mm)
    assert torch.equal(q2, qv) and torch.equal(m2, meta)
    # The metadata is exactly the bf16 layout's.
    assert torch.equal(mm, layout_mma.to_mma(torch.zeros(n, k // 2), meta)[1])


def test_words_follow_the_value_layout():
    """Code v of lane l of tile (nt, kt) is the value to_mma puts at element 8 l + v of that tile,
    in nibble (v >> 1) + 4 (v & 1): the pair of A register p is (word >> 4p) & 0x000F000F."""
    n, k = 32, 160
    qv, meta, codes = _pair(n, k, 9)
    qm, _ = layout_mma_int4.to_mma_int4(qv, meta)
    vm, _ = layout_mma.to_mma(codes.to(torch.int32), meta)  # codes as the "values" of the layout
    lanes = vm.reshape(-1, 8)  # [tiles * 32, 8]: the 8 values of one lane
    words = unpack_qvalues(qm).reshape(-1, 8)  # [tiles * 32, 8]: the 8 nibbles of one word
    for v in range(8):
        assert torch.equal(words[:, (v >> 1) + 4 * (v & 1)], lanes[:, v].long()), v
    w = qm.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    for p in range(4):
        pair = (w >> (4 * p)) & 0x000F000F
        assert torch.equal(pair & 0xF, lanes[:, 2 * p].long())
        assert torch.equal(pair >> 16, lanes[:, 2 * p + 1].long())


def test_supports():
    assert layout_mma_int4.supports(4096, 14336, 128)
    assert layout_mma_int4.supports(64, 96, -1) and layout_mma_int4.supports(64, 96, 96)
    assert not layout_mma_int4.supports(64, 96, 16)  # a 32-K tile would straddle two groups
    assert not layout_mma_int4.supports(40, 96, 32) and not layout_mma_int4.supports(64, 80, 32)


def test_errors():
    qv, meta, _ = _pair(32, 64, 1)
    with pytest.raises(ValueError, match="to_mma_int4: qvalues must be int32"):
        layout_mma_int4.to_mma_int4(qv.float(), meta)
    with pytest.raises(ValueError, match="to_mma_int4: values must have a multiple of 16 rows"):
        layout_mma_int4.to_mma_int4(qv[:24], meta[:24])
    with pytest.raises(ValueError, match="to_mma: meta must have shape"):
        layout_mma_int4.to_mma_int4(qv, meta[:, :4])
    bad = meta.clone()
    bad[3, 1] = 0x11  # idx0 == idx1
    with pytest.raises(ValueError, match="meta row 3, group 2"):
        layout_mma_int4.to_mma_int4(qv, bad)
    qm, mm = layout_mma_int4.to_mma_int4(qv, meta)
    with pytest.raises(ValueError, match="from_mma: meta_mma must be int32"):
        layout_mma_int4.from_mma_int4(qm, mm[:, :0])
