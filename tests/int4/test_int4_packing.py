"""INT4 packing: exact round trips and the documented bit positions."""

from __future__ import annotations

import pytest
import torch

from bitpress.int4.packing import (
    pack_int4_along_k,
    pack_int4_along_n,
    unpack_int4_along_k,
    unpack_int4_along_n,
)


def test_bit_positions_along_k():
    q = torch.arange(16).reshape(16, 1) % 16  # rows 0..15 of one column
    qw = pack_int4_along_k(q)
    assert qw.shape == (2, 1)
    assert qw[0, 0].item() == 0x76543210
    assert qw[1, 0].item() == 0xFEDCBA98 - 2**32  # bit 31 set: a negative int32


def test_bit_positions_along_n():
    z = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    qz = pack_int4_along_n(z)
    assert qz.shape == (1, 2)
    assert qz[0, 0].item() == 0x87654321 - 2**32 and qz[0, 1].item() == 0xA9


@pytest.mark.parametrize("K,N", [(8, 1), (16, 7), (136, 33), (4096, 127)])
def test_round_trip_k(K, N):
    q = torch.randint(0, 16, (K, N))
    qw = pack_int4_along_k(q)
    assert qw.dtype == torch.int32 and qw.shape == (K // 8, N)
    assert torch.equal(unpack_int4_along_k(qw), q.to(torch.uint8))
    assert torch.equal(pack_int4_along_k(unpack_int4_along_k(qw)), qw)


@pytest.mark.parametrize("G,N", [(1, 1), (3, 7), (5, 8), (2, 33)])
def test_round_trip_n(G, N):
    z = torch.randint(0, 16, (G, N))
    qz = pack_int4_along_n(z)
    assert qz.shape == (G, -(-N // 8))
    assert torch.equal(unpack_int4_along_n(qz, N), z.to(torch.uint8))


def test_all_words_round_trip():
    """Every bit pattern of a word survives unpack -> pack (sampled across the int32 range)."""
    words = torch.randint(-(2**31), 2**31 - 1, (1, 100_000), dtype=torch.int64).to(torch.int32)
    words[0, :4] = torch.tensor([0, -1, -(2**31), 2**31 - 1], dtype=torch.int32)
    assert torch.equal(pack_int4_along_k(unpack_int4_along_k(words)), words)


def test_bad_values():
    with pytest.raises(ValueError, match="values must lie in 0..15"):
        pack_int4_along_k(torch.full((8, 2), 16))
    with pytest.raises(ValueError, match="K a multiple of 8"):
        pack_int4_along_k(torch.zeros(7, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer tensor"):
        pack_int4_along_n(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="ceil\\(N/8\\)"):
        unpack_int4_along_n(torch.zeros(1, 3, dtype=torch.int32), 8)
