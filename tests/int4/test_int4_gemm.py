"""int4_gemm: the kernel layout (exact round trip), every CPU path against a float64 reference on
odd shapes and every dtype, opcheck, torch.compile, and bad input."""

from __future__ import annotations

import pytest
import torch
from int4_data import make_quantized

from bitpress import _ext, ops, reference
from bitpress.formats import int4_layout
from bitpress.testing import rel_err

# Relative-error bounds against float64: the output rounding (fp16 2^-11, bf16 2^-8 per element)
# plus float32 accumulation over K with the group offsets (128 + q, then - (128 + z) * sum x)
# cancelling: bounded by 2^-24 * K-ish * (sum |terms| / |y|) -- 2e-5 covers K = 4096.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = ["scalar", "avx2", "avx512"]


def _isa_ok(isa):
    return ISAS.index(isa) <= ISAS.index(_ext.C.best_cpu_isa())


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    if not _isa_ok(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} path")
    _ext.C.set_cpu_isa(request.param)
    yield request.param
    _ext.C.set_cpu_isa(None)


def ref64(x, packed, bias=None):
    """The float64 result before rounding to x.dtype."""
    return reference.int4_gemm(
        x.double(), *packed.tensors(), None if bias is None else bias.double()
    )


# ------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------


# (K, N, group_size, sym, act_order) of the exact round trips of both layouts.
LAYOUT_CASES = [
    (64, 64, 32, True, False),
    (136, 7, 8, False, True),
    (256, 130, 64, False, False),
    (128, 1, -1, True, False),
    (4096, 65, 128, False, True),
]


@pytest.mark.parametrize("K,N,gs,sym,act", LAYOUT_CASES)
def test_layout_round_trip_exact(K, N, gs, sym, act):
    qw = make_quantized(K, N, gs, sym, act)
    p = int4_layout.pack(qw)
    back = int4_layout.unpack(p, gs, sym)
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    assert p.qweight.shape[0] == -(-N // 64) and p.qweight.shape[2] == 64
    assert (p.perm is None) == (not act and (gs == -1 or gs % 8 == 0))
    assert (p.zeros is None) == sym


def test_layout_pads_uneven_groups():
    """Groups whose sizes are not multiples of 8 are padded with rows x never reaches."""
    qw = make_quantized(24, 5, 8, sym=False)
    qw.g_idx = torch.tensor([0] * 5 + [1] * 11 + [2] * 8, dtype=torch.int32)
    p = int4_layout.pack(qw)
    assert p.group_starts.tolist() == [0, 1, 3, 4] and p.perm.numel() == 32
    assert (p.perm == -1).sum() == 8
    x = torch.randn(3, 24)
    torch.testing.assert_close(ops.int4_gemm(x, p), ref64(x, p).float(), rtol=1e-5, atol=1e-6)


def test_layout_nibble_order_pairs_rows():
    """(word >> 4p) & 0x000F000F must hold rows (2p, 2p+1) of the octet: the bf16 pair."""
    from bitpress.quantize.common import QuantizedWeight

    q = torch.arange(8, dtype=torch.uint8).reshape(8, 1) + 1  # rows 0..7 hold 1..8
    qw = QuantizedWeight(
        q,
        torch.ones(1, 1),
        torch.full((1, 1), 8, dtype=torch.uint8),
        torch.zeros(8, dtype=torch.int32),
        8,
        True,
    )
    word = int(int4_layout.pack(qw).qweight[0, 0, 0]) & 0xFFFFFFFF
    for p in range(4):
        pair = (word >> (4 * p)) & 0x000F000F
        assert (pair & 0xF, pair >> 16) == (2 * p + 1, 2 * p + 2)


@pytest.mark.parametrize("K,N,gs,sym,act", LAYOUT_CASES)
def test_mma_layout_round_trip_exact(K, N, gs, sym, act):
    qw = make_quantized(K, N, gs, sym, act)
    p = int4_layout.pack(qw, layout="mma")
    back = int4_layout.unpack(p, gs, sym)
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    Kp, Nt = p.qweight.shape[0] * 16, -(-N // 64)
    assert p.layout == "mma" and p.qweight.shape[1] == 128 * Nt
    assert p.scales.shape == (qw.scales.shape[0], 64 * Nt) and (p.zeros is None) == sym
    G = qw.scales.shape[0]
    assert Kp % G == 0 and p.group_starts.tolist() == [g * Kp // G // 16 for g in range(G + 1)]
    # Conversions between the layouts are exact too.
    cpu = p.to("cpu", layout="cpu")
    assert cpu.layout == "cpu" and torch.equal(cpu.qweight, int4_layout.pack(qw).qweight)
    assert torch.equal(cpu.to("cpu", layout="mma").qweight, p.qweight)


def test_mma_layout_words_are_mma_fragments():
    """Straight from the PTX ISA's m16n8k16 B fragment (b0,b1: rows 2t, 2t+1; b2,b3: rows
    2t+8, 2t+9; column groupID = lane/4): (word >> 4p) & 0x000F000F of lane l's word w holds
    the two rows of register p % 2 of n8-block 2w + p // 2."""
    qw = make_quantized(32, 130, 16, sym=False)
    p = int4_layout.pack(qw, layout="mma")
    q = qw.q.long()
    words = p.qweight.long() & 0xFFFFFFFF
    for kt in range(2):
        for nt in range(3):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for w in range(4):
                    word = int(words[kt, nt * 128 + 4 * lane + w])
                    for pr in range(4):
                        pair = (word >> (4 * pr)) & 0x000F000F
                        k0 = 16 * kt + 2 * t + 8 * (pr % 2)
                        n = 64 * nt + 8 * (2 * w + pr // 2) + g
                        want = (int(q[k0, n]), int(q[k0 + 1, n])) if n < 130 else (0, 0)
                        assert (pair & 0xF, pair >> 16) == want, (kt, nt, lane, w, pr)


def test_mma_layout_pads_groups_uniformly():
    """Uneven groups are padded to one length, a multiple of 16: the group of a k-tile is
    kt // tiles_per_group in every GPU kernel."""
    qw = make_quantized(48, 5, 16, sym=False)  # G = 3
    qw.g_idx = torch.tensor([0] * 5 + [1] * 19 + [2] * 24, dtype=torch.int32)
    p = int4_layout.pack(qw, layout="mma")
    assert p.qweight.shape[0] == 3 * 2 and p.group_starts.tolist() == [0, 2, 4, 6]
    assert (p.perm == -1).sum() == 3 * 32 - 48
    x = torch.randn(3, 48, dtype=torch.float64)
    want = x @ qw.dequantize(torch.float64).t()
    torch.testing.assert_close(ops.int4_gemm(x.float(), p, backend="reference").double(), want)


def test_layouts_give_the_same_reference():
    qw = make_quantized(256, 130, 64, sym=False, act_order=True)
    x = torch.randn(5, 256)
    a = ref64(x, int4_layout.pack(qw))
    b = ref64(x, int4_layout.pack(qw, layout="mma"))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cpu_backend_rejects_the_mma_layout():
    p = int4_layout.pack(make_quantized(64, 70, 32), layout="mma")
    with pytest.raises(RuntimeError, match="GPU mma layout.*layout='cpu'"):
        ops.int4_gemm(torch.randn(2, 64), p, backend="cpu")
    with pytest.raises(RuntimeError, match="CPU tile layout.*layout='mma'"):
        ops._int4_gemm_triton(
            torch.randn(2, 64), *int4_layout.pack(make_quantized(64, 70, 32)).tensors()
        )


def test_mma_layout_bad_shapes():
    p = int4_layout.pack(make_quantized(64, 70, 32, sym=False, act_order=True), layout="mma")
    qw, sc, zr, gs, pm, n = p.tensors()
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"qweight.size\(1\) must be 256"):
        ops._int4_gemm_reference(x, qw[:, :128], sc, zr, gs, pm, n, None)
    with pytest.raises(RuntimeError, match="split evenly into G = 3 groups"):
        ops._int4_gemm_reference(x, qw, torch.cat([sc, sc[:1]]), None, gs, pm, n, None)
    with pytest.raises(RuntimeError, match=r"scales must be 2-D \[G, Np\]"):
        ops._int4_gemm_reference(x, qw, sc[None], zr, gs, pm, n, None)


# ------------------------------------------------------------------------------------------
# The op against the reference
# ------------------------------------------------------------------------------------------

SHAPES = [(1, 64, 1), (1, 4096, 300), (2, 136, 7), (5, 256, 65), (17, 128, 127), (33, 512, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize(
    "gs,sym,act",
    [(32, True, False), (64, False, False), (128, False, True), (-1, True, False)],
    ids=["g32-sym", "g64-asym", "g128-asym-actorder", "g-1-sym"],
)
def test_matches_reference(cpu_isa, dtype, M, K, N, gs, sym, act):
    gs = gs if gs == -1 or K % gs == 0 else -1
    qw = make_quantized(K, N, gs, sym, act)
    p = int4_layout.pack(qw)
    x = torch.randn(M, K).to(dtype)
    out = ops.int4_gemm(x, p)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, ref64(x, p)) <= TOLERANCE[dtype], (cpu_isa, rel_err(out, ref64(x, p)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_leading_dims_and_non_contiguous(cpu_isa, dtype):
    qw = make_quantized(128, 70, 64, sym=False, act_order=True)
    p = int4_layout.pack(qw)
    x = torch.randn(3, 4, 256).to(dtype)[:, :, ::2]  # [3, 4, 128], stride 2 along K
    assert not x.is_contiguous()
    for bias_dtype in DTYPES:
        bias = torch.randn(70).to(bias_dtype)
        out = ops.int4_gemm(x, p, bias)
        assert out.shape == (3, 4, 70)
        assert rel_err(out, ref64(x, p, bias)) <= TOLERANCE[dtype]


def test_m_zero_and_reference_backend():
    p = int4_layout.pack(make_quantized(64, 10, 32))
    assert ops.int4_gemm(torch.randn(0, 64), p).shape == (0, 10)
    x = torch.randn(2, 64)
    torch.testing.assert_close(ops.int4_gemm(x, p, backend="reference"), ref64(x, p).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_for_exact_inputs(dtype):
    """Small-integer x and power-of-two scales make every product and partial sum exact in
    float32 (|sums| < 2^24), on every path (bf16 pairs, fp16 hi/lo split, fp32 FMA): the kernel
    must equal the float64 result rounded once to the dtype, bit for bit."""
    qw = make_quantized(256, 64, 128, sym=False, act_order=True)
    qw.scales = torch.full_like(qw.scales, 0.25)
    p = int4_layout.pack(qw)
    x = torch.randint(-8, 8, (3, 256)).to(dtype)
    for isa in [i for i in ISAS if _isa_ok(i)]:
        _ext.C.set_cpu_isa(isa)
        try:
            out = ops.int4_gemm(x, p)
            assert torch.equal(out, ref64(x, p).to(dtype)), isa
        finally:
            _ext.C.set_cpu_isa(None)


def test_opcheck():
    for sym, act in [(True, False), (False, True)]:
        p = int4_layout.pack(make_quantized(64, 70, 32, sym, act))
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        torch.library.opcheck(torch.ops.bitpress.int4_gemm.default, (x, *p.tensors()))
        torch.library.opcheck(
            torch.ops.bitpress.int4_gemm.default,
            (x, *p.tensors(), torch.randn(70, dtype=torch.bfloat16)),
        )


@pytest.mark.slow
def test_torch_compile_fullgraph():
    p = int4_layout.pack(make_quantized(128, 64, 64, sym=False))

    @torch.compile(fullgraph=True)
    def f(x):
        return torch.relu(ops.int4_gemm(x, p)) + 1

    x = torch.randn(4, 128)
    torch.testing.assert_close(f(x), torch.relu(ref64(x, p).float()) + 1, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def _bad_cases():
    p = int4_layout.pack(make_quantized(64, 70, 32, sym=False, act_order=True))
    qw, sc, zr, gs, pm, n = p.tensors()
    x = torch.randn(2, 64)
    return [
        ("x int", (x.int(), qw, sc, zr, gs, pm, n, None), TypeError, "x must be float32"),
        (
            "qweight dtype",
            (x, qw.float(), sc, zr, gs, pm, n, None),
            TypeError,
            "qweight must be int32",
        ),
        (
            "qweight 1-D",
            (x, qw[0, 0], sc, zr, gs, pm, n, None),
            RuntimeError,
            "qweight must be 3-D",
        ),
        (
            "out_features",
            (x, qw, sc, zr, gs, pm, 300, None),
            RuntimeError,
            "qweight.size(0) must be 5",
        ),
        (
            "scales dtype",
            (x, qw, sc.half(), zr, gs, pm, n, None),
            TypeError,
            "scales must be float32",
        ),
        ("zeros dtype", (x, qw, sc, zr.int(), gs, pm, n, None), TypeError, "zeros must be uint8"),
        (
            "group_starts len",
            (x, qw, sc, zr, gs[:-1], pm, n, None),
            RuntimeError,
            "group_starts.size(0) must be 3",
        ),
        (
            "perm len",
            (x, qw, sc, zr, gs, pm[:-1], n, None),
            RuntimeError,
            "perm.size(0) must be 64",
        ),
        (
            "K mismatch",
            (torch.randn(2, 63), qw, sc, None, gs, None, n, None),
            RuntimeError,
            "x.size(-1) must be K = 64",
        ),
        (
            "bias len",
            (x, qw, sc, zr, gs, pm, n, torch.zeros(69)),
            RuntimeError,
            "bias.size(0) must be 70",
        ),
        (
            "device",
            (x, qw, sc.to("meta"), zr, gs, pm, n, None),
            RuntimeError,
            "scales must be on the same device as x",
        ),
    ]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(backend, case):
    import re

    name, args, exc, msg = case
    impl = {"cpu": ops._int4_gemm_compiled, "reference": ops._int4_gemm_reference}[backend]
    with pytest.raises(exc, match="int4_gemm: .*" + re.escape(msg)):
        impl(*args)


def test_bad_layout_values():
    p = int4_layout.pack(make_quantized(64, 70, 32, sym=False, act_order=True))
    qw, sc, zr, gs, pm, n = p.tensors()
    x = torch.randn(2, 64)
    bad_perm = pm.clone()
    bad_perm[3] = 64
    with pytest.raises(RuntimeError, match=r"perm values must lie in \[-1, 64\)"):
        torch.ops.bitpress.int4_gemm(x, qw, sc, zr, gs, bad_perm, n)
    bad_gs = gs.clone()
    bad_gs[-1] = 3
    with pytest.raises(RuntimeError, match="group_starts must run from 0 to Kp/8 = 8"):
        torch.ops.bitpress.int4_gemm(x, qw, sc, zr, bad_gs, pm, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs,sym,act", [(64, False, True), (32, True, False)])
def test_large_m(dtype, gs, sym, act):
    """Row counts past one row block (8) and odd remainders."""
    qw = make_quantized(256, 130, gs, sym, act)
    p = int4_layout.pack(qw)
    bias = torch.randn(130).to(dtype)
    for M in (64, 131):
        x = torch.randn(M, 256).to(dtype)
        out = ops.int4_gemm(x, p, bias)
        assert out.shape == (M, 130) and out.dtype == dtype
        assert rel_err(out, ref64(x, p, bias)) <= TOLERANCE[dtype]
