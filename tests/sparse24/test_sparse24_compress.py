"""sparse24_compress and the 2:4 interchange format: the exact round trips (dense -> compressed ->
dense bit for bit, canonical compressed -> dense -> compressed), the kept-zero rule, the pattern
error naming the first broken row and group, every backend against the reference, the metadata
helpers' definition, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

from bitpress import ops
from bitpress.sparse24 import layout
from bitpress.sparse24.cases import random_24

OP = "sparse24_compress"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
SHAPES = [(1, 8), (7, 16), (33, 136), (61, 264), (128, 4096), (5, 0), (0, 64)]
INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(t):
    return t.contiguous().view(INT[t.element_size()])


def _rand(N, K, dtype, fill, gen):
    w = random_24(N, K, torch.float32, gen, fill)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("fill", [1.0, 0.5, 0.0])
def test_round_trip_exact(backend_device, dtype, N, K, fill):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(N * 1000 + K)
    w = _rand(N, K, dtype, fill, gen).to(device)
    values, meta = ops.sparse24_compress(w, backend=backend)
    assert values.shape == (N, K // 2) and values.dtype == dtype
    assert meta.shape == (N, K // 8) and meta.dtype == torch.uint8
    ref_v, ref_m = layout.compress(w.cpu())
    assert torch.equal(bits(values.cpu()), bits(ref_v)) and torch.equal(meta.cpu(), ref_m)
    # Every nibble is ordered, and the dense weight comes back bit for bit, but for a -0.0 at a
    # position that is not kept (float8 and low-precision casts of tiny weights make them).
    assert layout.invalid_nibble(meta.cpu()) is None
    kept = torch.zeros(N, K, dtype=torch.bool).scatter_(1, layout.dense_columns(ref_m), True)
    assert not (layout.nonzero_mask(w.cpu()) & ~kept).any()
    want = torch.where(kept, bits(w.cpu()), torch.zeros((), dtype=bits(w).dtype))
    assert torch.equal(bits(layout.decompress(values.cpu(), meta.cpu())), want)
    # Canonical compressed -> dense -> compressed.
    v2, m2 = layout.compress(layout.decompress(ref_v, ref_m))
    assert torch.equal(bits(v2), bits(ref_v)) and torch.equal(m2, ref_m)


def test_kept_zeros_at_lowest_free_positions(backend_device):
    backend, _ = backend_device
    w = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0],  # no nonzero; one at position 2
            [0.0, 0.0, 0.0, 5.0, 1.0, 0.0, 0.0, 2.0],  # one at 3; two at 0 and 3
        ]
    )
    values, meta = ops.sparse24_compress(w, backend=backend)
    # group 0 of row 0 keeps (0, 1); group 1 keeps (0, 2); row 1: (0, 3) and (0, 3).
    assert meta.tolist() == [[0x4 | (0x8 << 4)], [0xC | (0xC << 4)]]
    assert values.tolist() == [[0.0, 0.0, 0.0, 3.0], [0.0, 5.0, 1.0, 2.0]]


def test_negative_zero_and_nan():
    """-0.0 is a zero (a dropped one comes back as +0.0), NaN is a nonzero kept bit for bit."""
    w = torch.tensor([[-0.0, float("nan"), -0.0, -0.0, 1.0, -0.0, 0.0, 2.0]])
    values, meta = ops.sparse24_compress(w)
    assert meta.tolist() == [[(0x4) | (0xC << 4)]]
    assert torch.equal(bits(values), bits(torch.tensor([[-0.0, float("nan"), 1.0, 2.0]])))
    back = layout.decompress(values, meta)
    assert torch.equal(
        bits(back), bits(torch.tensor([[-0.0, float("nan"), 0.0, 0.0, 1.0, 0.0, 0.0, 2.0]]))
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pattern_error_names_first_row_and_group(backend_device, dtype):
    backend, _ = backend_device
    gen = torch.Generator().manual_seed(1)
    w = _rand(40, 64, torch.float32, 1.0, gen)
    w[17, 20:24] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # row 17, group 5: 3 nonzeros
    w[30, 0:4] = 1.0  # a later one
    with pytest.raises(
        RuntimeError,
        match=r"sparse24_compress: w values must have the 2:4 pattern .*: "
        r"row 17, group 5 \(columns 20\.\.23\) has 3 nonzeros",
    ):
        ops.sparse24_compress(w.to(dtype), backend=backend)


@pytest.mark.parametrize(
    "w,exc,msg",
    [
        (
            torch.zeros(4, 12),
            RuntimeError,
            r"sparse24_compress: w\.size\(1\) must be a multiple of 8",
        ),
        (torch.zeros(4, 8, 2), RuntimeError, r"sparse24_compress: w must be 2-D"),
        (torch.zeros(4, 8, dtype=torch.int32), TypeError, r"sparse24_compress: w must be"),
        (torch.zeros(4, 8, dtype=torch.float64), TypeError, r"sparse24_compress: w must be"),
    ],
)
def test_bad_inputs(backend_device, w, exc, msg):
    backend, _ = backend_device
    with pytest.raises(exc, match=msg):
        ops.sparse24_compress(w, backend=backend)


def test_non_contiguous_w():
    gen = torch.Generator().manual_seed(2)
    w = _rand(64, 32, torch.float32, 1.0, gen)
    wt = w.t().contiguous().t()  # same values, column-major storage
    v1, m1 = ops.sparse24_compress(w)
    v2, m2 = ops.sparse24_compress(wt)
    assert torch.equal(v1, v2) and torch.equal(m1, m2)


def test_positions_definition():
    """Bits 2j..2j+1 of a row's metadata (little-endian) are the position of value j."""
    gen = torch.Generator().manual_seed(3)
    _, meta = layout.compress(_rand(3, 64, torch.float32, 1.0, gen))
    pos = layout.positions(meta)
    for n in range(3):
        word = int.from_bytes(bytes(meta[n].tolist()), "little")
        assert pos[n].tolist() == [(word >> (2 * j)) & 3 for j in range(32)]


def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(4)
    w = _rand(33, 136, torch.bfloat16, 0.7, gen)
    torch.library.opcheck(torch.ops.bitpress.sparse24_compress.default, (w,))

    @torch.compile(fullgraph=True)
    def f(w):
        return ops.sparse24_compress(w)

    v, m = f(w)
    rv, rm = layout.compress(w)
    assert torch.equal(v, rv) and torch.equal(m, rm)
