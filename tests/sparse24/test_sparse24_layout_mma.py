"""The mma.sp layout of 2:4 weights (bitpress.sparse24.layout_mma): exact round trips with the
interchange format, every group pattern, padding, the PTX fragment maps, bad input, and the
agreement of the Python maps with the C++ ones (csrc/include/bitpress/sparse24/
sparse24_mma_layout.h) through tests/cpp/sparse24_mma_fixture.h, which the C++ test
(tests/cpp/test_sparse24_mma.cpp) checks against the header. Regenerate the fixture with
``BITPRESS_REGEN_FIXTURES=1 pytest tests/sparse24/test_sparse24_layout_mma.py``."""

from __future__ import annotations

import itertools
import os
import re

import pytest
import torch

from bitpress.sparse24 import layout_mma as L

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "cpp", "sparse24_mma_fixture.h")
FIXTURE_N, FIXTURE_K = 32, 96  # two tile rows; 3 k-tiles: the last pair half padding

# The six valid patterns of a group (idx0 < idx1) and their nibbles.
PAIRS = [(a, b) for a in range(4) for b in range(a + 1, 4)]
NIBBLES = [a | b << 2 for a, b in PAIRS]


def random_interchange(n, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 6, (n, k // 4), generator=g)
    nib = torch.tensor(NIBBLES, dtype=torch.uint8)[idx]
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    values = torch.randn(n, k // 2, generator=g).to(dtype)
    return values, meta


def densify(values, meta):
    """Dense [N, K] from the interchange format (plain loops of the definition)."""
    n, half = values.shape
    k = 2 * half
    w = torch.zeros(n, k, dtype=values.dtype)
    for r in range(n):
        for j in range(k // 4):
            nib = (int(meta[r, j // 2]) >> (4 * (j % 2))) & 0xF
            w[r, 4 * j + (nib & 3)] = values[r, 2 * j]
            w[r, 4 * j + (nib >> 2)] = values[r, 2 * j + 1]
    return w


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "n,k", [(16, 32), (16, 64), (32, 96), (48, 224), (16, 1024), (0, 64), (16, 0)]
)
def test_round_trip_bit_exact(n, k, dtype):
    values, meta = random_interchange(n, k, dtype, seed=n * 1000 + k)
    # NaN payloads and signed zeros survive: the layout moves bits, never values.
    if values.numel() > 2:
        values.view(-1)[0] = float("nan")
        values.view(-1)[1] = -0.0
    vm, mm = L.to_mma(values, meta)
    assert vm.shape == values.shape and vm.dtype == dtype
    assert mm.shape == (n // 16, (k + 63) // 64, 32) and mm.dtype == torch.int32
    v2, m2 = L.from_mma(vm, mm)
    assert torch.equal(bits(v2), bits(values)) and torch.equal(m2, meta)
    # and back again: the mma tensors are reproduced bit for bit
    vm2, mm2 = L.to_mma(v2, m2)
    assert torch.equal(bits(vm2), bits(vm)) and torch.equal(mm2, mm)


def test_every_pattern_of_a_row_pair():
    """All 6^2 patterns of two groups, on each row of a tile and in both halves of a pair."""
    for (p0, p1), row, group in itertools.product(
        itertools.product(range(6), repeat=2), (0, 7, 8, 15), (0, 2, 4, 6, 8, 14)
    ):
        n, k = 16, 64
        values, meta = random_interchange(n, k, seed=row * 31 + group)
        nib = L._nibbles(meta)
        nib[row, group], nib[row, group + 1] = NIBBLES[p0], NIBBLES[p1]
        meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
        vm, mm = L.to_mma(values, meta)
        v2, m2 = L.from_mma(vm, mm)
        assert torch.equal(m2, meta) and torch.equal(bits(v2), bits(values))


def test_fragments_follow_ptx():
    """Each lane's 8 values and metadata word, read back through the PTX ISA fragment rules of
    mma.sp.m16n8k32 (.f16/.bf16), give the dense weight of the tile."""
    n, k = 32, 160  # 5 k-tiles: the last pair has one
    values, meta = random_interchange(n, k, torch.float32, seed=5)
    dense = densify(values, meta)
    vm, mm = L.to_mma(values, meta)
    vm = vm.view(n // 16, k // 32, 256)
    for nt, kt in itertools.product(range(n // 16), range(k // 32)):
        comp = torch.empty(16, 16)
        for lane, i in itertools.product(range(32), range(8)):
            g, t = lane // 4, lane % 4
            row = g if i in (0, 1, 4, 5) else g + 8
            col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
            comp[row, col] = vm[nt, kt, 8 * lane + i]
        sel = kt % 2
        for r, j in itertools.product(range(16), range(8)):
            lane = 4 * (r % 8) + 2 * sel + j // 4
            word = int(mm[nt, kt // 2, lane]) & 0xFFFFFFFF
            nib = (word >> (16 * (r // 8) + 4 * (j % 4))) & 0xF
            grp = torch.zeros(4)
            grp[nib & 3], grp[nib >> 2] = comp[r, 2 * j], comp[r, 2 * j + 1]
            want = dense[16 * nt + r, 32 * kt + 4 * j : 32 * kt + 4 * j + 4]
            assert torch.equal(grp, want), (nt, kt, r, j)


def test_padding_is_valid_and_ordered():
    values, meta = random_interchange(16, 96)  # 3 k-tiles: selector-1 half of pair 1 is padding
    _, mm = L.to_mma(values, meta)
    msrc = L.mma_meta_source(16, 96)
    assert int((msrc < 0).sum()) == 16 * 8  # 16 rows x 8 groups of the missing k-tile
    words = mm.to(torch.int64) & 0xFFFFFFFF
    nibs = (words.unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    assert bool((nibs[msrc < 0] == L.PAD_NIBBLE).all())
    assert bool((msrc[:, 1, 2:4] < 0).all()) and bool((msrc[:, 1, 0:2] >= 0).all())


def test_supports():
    assert L.supports(4096, 14336) and L.supports(16, 32) and L.supports(0, 0)
    assert not L.supports(4104, 4096) and not L.supports(4096, 4104) and not L.supports(16, 8)


def test_sources_are_permutations():
    for n, k in [(16, 64), (32, 96), (48, 416)]:
        v = L.mma_value_source(n, k).flatten()
        assert torch.equal(v.sort().values, torch.arange(n * k // 2))
        m = L.mma_meta_source(n, k).flatten()
        m = m[m >= 0]
        assert torch.equal(m.sort().values, torch.arange(n * k // 4))


@pytest.mark.parametrize(
    "args,msg",
    [
        (
            (torch.zeros(17, 16), torch.zeros(17, 4, dtype=torch.uint8)),
            "to_mma: values must have a multiple of 16",
        ),
        (
            (torch.zeros(16, 20), torch.zeros(16, 5, dtype=torch.uint8)),
            "to_mma: K = 2 * values.size(1) must be a multiple of 32",
        ),
        ((torch.zeros(16, 16), torch.zeros(16, 4, dtype=torch.int8)), "to_mma: meta must be uint8"),
        (
            (torch.zeros(16, 16), torch.zeros(16, 2, dtype=torch.uint8)),
            "to_mma: meta must have shape",
        ),
        (
            (torch.zeros(16, 3), torch.zeros(16, 0, dtype=torch.uint8)),
            "to_mma: meta must have shape",
        ),
        ((torch.zeros(16), torch.zeros(16, 1, dtype=torch.uint8)), "to_mma: values must be 2-D"),
    ],
)
def test_to_mma_bad_input(args, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        L.to_mma(*args)


@pytest.mark.parametrize("nib", [0x0, 0x5, 0xA, 0xF, 0x1, 0x6, 0xB])  # idx0 >= idx1
def test_to_mma_rejects_unordered_metadata(nib):
    values, meta = random_interchange(32, 64)
    meta[19, 5] = (meta[19, 5] & 0x0F) | (nib << 4)  # row 19, group 11
    with pytest.raises(ValueError, match=r"to_mma: meta row 19, group 11 \(columns 44\.\.47\)"):
        L.to_mma(values, meta)


def test_from_mma_bad_input():
    values, meta = random_interchange(32, 64)
    vm, mm = L.to_mma(values, meta)
    with pytest.raises(ValueError, match="from_mma: values_mma must be 2-D"):
        L.from_mma(vm.view(2, 16, -1), mm)
    with pytest.raises(ValueError, match=re.escape("from_mma: meta_mma must be int32 [2, 1, 32]")):
        L.from_mma(vm, mm.to(torch.int64))
    with pytest.raises(ValueError, match=re.escape("from_mma: meta_mma must be int32 [2, 2, 32]")):
        L.from_mma(torch.cat([vm, vm], 1), mm)
    with pytest.raises(
        ValueError, match="from_mma: K = 2 \\* values.size\\(1\\) must be a multiple"
    ):
        L.from_mma(vm[:, :8], mm)


# ---------------------------------------------------------------------------------------------
# The fixture shared with the C++ test
# ---------------------------------------------------------------------------------------------


def fixture_text() -> str:
    vs = L.mma_value_source(FIXTURE_N, FIXTURE_K).flatten().tolist()
    ms = L.mma_meta_source(FIXTURE_N, FIXTURE_K).flatten().tolist()

    def arr(name, xs):
        lines = [", ".join(str(x) for x in xs[i : i + 16]) + "," for i in range(0, len(xs), 16)]
        return (
            f"constexpr int16_t {name}[{len(xs)}] = {{\n"
            + "\n".join("    " + s for s in lines)
            + "\n};\n"
        )

    return (
        "// Generated by tests/sparse24/test_sparse24_layout_mma.py (BITPRESS_REGEN_FIXTURES=1)\n"
        "// from bitpress.sparse24.layout_mma.mma_value_source / mma_meta_source: for every\n"
        "// element of values_mma and every nibble of meta_mma of an N x K weight, the flat index\n"
        "// of its source in the interchange values [N, K/2] / groups [N, K/4] (-1: padding).\n"
        "// tests/cpp/test_sparse24_mma.cpp checks the C++ index maps against it.\n"
        "#pragma once\n\n#include <stdint.h>\n\n"
        f"constexpr int kFixtureN = {FIXTURE_N};\nconstexpr int kFixtureK = {FIXTURE_K};\n"
        + arr("kFixtureValueSource", vs)
        + arr("kFixtureMetaSource", ms)
    )


def parse_fixture(text: str) -> dict[str, list[int]]:
    out = {}
    for name in ("kFixtureN", "kFixtureK"):
        out[name] = [int(re.search(rf"{name} = (-?\d+);", text).group(1))]
    for name in ("kFixtureValueSource", "kFixtureMetaSource"):
        body = re.search(rf"{name}\[\d+\] = \{{([^}}]*)\}};", text).group(1)
        out[name] = [int(x) for x in re.findall(r"-?\d+", body)]
    return out


def test_cpp_fixture_matches_python_maps():
    if os.environ.get("BITPRESS_REGEN_FIXTURES") == "1":
        with open(FIXTURE, "w") as f:
            f.write(fixture_text())
    with open(FIXTURE) as f:
        have = parse_fixture(f.read())
    assert have == parse_fixture(fixture_text()), (
        "tests/cpp/sparse24_mma_fixture.h is stale: regenerate it (BITPRESS_REGEN_FIXTURES=1)"
    )
