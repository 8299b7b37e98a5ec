"""int4_gemm: the kernel layout (exact round trip), every CPU path against a float64 reference on
odd shapes and every dtype, opcheck, torch.compile, and bad input."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from int4_data import make_quantized

from bitpress import ops, reference
from bitpress._core import backends
from bitpress._core import ext as _ext
from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import Int4CpuTiles, Int4Layout, Int4MmaTiles
from bitpress.testing import rel_err

# Relative-error bounds against float64: the output rounding (fp16 2^-11, bf16 2^-8 per element)
# plus float32 accumulation over K with the group offsets (128 + q, then - (128 + z) * sum x)
# cancelling: bounded by 2^-24 * K-ish * (sum |terms| / |y|) -- 2e-5 covers K = 4096.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = ["scalar", "avx2", "avx512", "amx"]


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
    return reference.int4_gemm(x.double(), packed, None if bias is None else bias.double())


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
    assert type(p) is Int4CpuTiles and p.layout == Int4Layout.CPU_TILES
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
    from bitpress.int4.quantized import QuantizedWeight

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
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    back = int4_layout.unpack(p, gs, sym)
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    Kp, Nt = p.qweight.shape[0] * 16, -(-N // 64)
    assert type(p) is Int4MmaTiles and p.layout == Int4Layout.MMA_TILES == 1
    assert p.qweight.shape[1] == 128 * Nt
    assert p.scales.shape == (qw.scales.shape[0], 64 * Nt) and (p.zeros is None) == sym
    G = qw.scales.shape[0]
    assert Kp % G == 0 and p.group_starts.tolist() == [g * Kp // G // 16 for g in range(G + 1)]
    # Conversions between the layouts are exact too.
    cpu = p.to("cpu", layout=Int4CpuTiles)
    assert type(cpu) is Int4CpuTiles and cpu.layout == Int4Layout.CPU_TILES == 0
    assert torch.equal(cpu.qweight, int4_layout.pack(qw).qweight)
    assert torch.equal(cpu.to("cpu", layout=Int4MmaTiles).qweight, p.qweight)


def test_mma_layout_words_are_mma_fragments():
    """Straight from the PTX ISA's m16n8k16 B fragment (b0,b1: rows 2t, 2t+1; b2,b3: rows
    2t+8, 2t+9; column groupID = lane/4): (word >> 4p) & 0x000F000F of lane l's word w holds
    the two rows of register p % 2 of n8-block 2w + p // 2."""
    qw = make_quantized(32, 130, 16, sym=False)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
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
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    assert p.qweight.shape[0] == 3 * 2 and p.group_starts.tolist() == [0, 2, 4, 6]
    assert (p.perm == -1).sum() == 3 * 32 - 48
    x = torch.randn(3, 48, dtype=torch.float64)
    want = x @ qw.dequantize(torch.float64).t()
    torch.testing.assert_close(ops.int4_gemm(x.float(), p, backend="reference").double(), want)


def test_layouts_give_the_same_reference():
    qw = make_quantized(256, 130, 64, sym=False, act_order=True)
    x = torch.randn(5, 256)
    a = ref64(x, int4_layout.pack(qw))
    b = ref64(x, int4_layout.pack(qw, layout=Int4MmaTiles))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _impl(backend):
    """The backend's implementation of int4_gemm: (x, weight, bias)."""
    return backends.implementations("int4_gemm")[backend]


def test_cpu_backend_rejects_the_mma_layout():
    mma = int4_layout.pack(make_quantized(64, 70, 32), layout=Int4MmaTiles)
    cpu = int4_layout.pack(make_quantized(64, 70, 32))
    x = torch.randn(2, 64)
    want_cpu = (
        "int4_gemm: this backend reads Int4CpuTiles weights, got Int4MmaTiles: convert the "
        "weight with weight.to(device, layout=Int4CpuTiles)"
    )
    with pytest.raises(RuntimeError, match=re.escape(want_cpu)):
        ops.int4_gemm(x, mma, backend="cpu")
    with pytest.raises(RuntimeError, match=re.escape(want_cpu)):
        torch.ops.bitpress.int4_gemm(x, **mma.op_kwargs())
    want_mma = (
        "int4_gemm: this backend reads Int4MmaTiles weights, got Int4CpuTiles: convert the "
        "weight with weight.to(device, layout=Int4MmaTiles)"
    )
    with pytest.raises(RuntimeError, match=re.escape(want_mma)):
        torch.ops.bitpress.int4_gemm_triton(x, **cpu.op_kwargs())
    # The reference reads both layouts.
    torch.testing.assert_close(
        ops.int4_gemm(x, mma, backend="reference"), ops.int4_gemm(x, cpu, backend="reference")
    )


@pytest.mark.parametrize("op", ["int4_gemm", "int4_gemm_triton"])
@pytest.mark.parametrize("code", [-1, 2, 7])
def test_unknown_layout_code(op, code):
    kw = int4_layout.pack(make_quantized(64, 70, 32)).op_kwargs()
    kw["layout"] = code
    with pytest.raises(
        RuntimeError, match=r"layout must be 0 \(Int4CpuTiles\) or 1 \(Int4MmaTiles\)"
    ):
        getattr(torch.ops.bitpress, op)(torch.randn(2, 64), **kw)


def test_mma_layout_bad_shapes():
    p = int4_layout.pack(make_quantized(64, 70, 32, sym=False, act_order=True), layout=Int4MmaTiles)
    x = torch.randn(2, 64)
    ref = _impl("reference")
    with pytest.raises(RuntimeError, match=r"qweight.size\(1\) must be 256"):
        ref(x, dataclasses.replace(p, qweight=p.qweight[:, :128]), None)
    with pytest.raises(RuntimeError, match="split evenly into G = 3 groups"):
        ref(x, dataclasses.replace(p, scales=torch.cat([p.scales, p.scales[:1]]), zeros=None), None)
    with pytest.raises(RuntimeError, match=r"scales must be 2-D \[G, Np\]"):
        ref(x, dataclasses.replace(p, scales=p.scales[None]), None)


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


OP = "int4_gemm"  # the op of the backend_device fixture (tests/conftest.py)

# (M, K, N, group_size, sym, act_order): small enough for the Triton interpreter.
BACKEND_CASES = [
    (1, 128, 70, 32, True, False),
    (5, 136, 65, 8, False, True),
    (33, 256, 64, 64, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BACKEND_CASES, ids=lambda c: "-".join(map(str, c)))
def test_every_backend_matches_reference(backend_device, case, dtype):
    """Every backend on every device it runs on, with the layout its device reads
    (``default_layout``: Int4MmaTiles on CUDA and for the Triton kernel), against float64."""
    backend, device = backend_device
    M, K, N, gs, sym, act = case
    qw = make_quantized(K, N, gs, sym, act)
    layout = Int4MmaTiles if backend in ("cuda", "triton") else int4_layout.default_layout(device)
    p = int4_layout.pack(qw, layout=layout)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = ops.int4_gemm(x.to(device), p.to(device), bias.to(device), backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert out.shape == (M, N) and out.dtype == dtype and out.device == device
    want = ref64(x, p, bias)
    tol = TOLERANCE[dtype]
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        tol = max(tol, 2.0**-7)  # the interpreter truncates fp32 -> bf16 (DESIGN.md)
    assert rel_err(out.cpu(), want) <= tol, rel_err(out.cpu(), want)


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
        op = torch.ops.bitpress.int4_gemm.default
        torch.library.opcheck(op, (x,), p.op_kwargs())
        torch.library.opcheck(op, (x,), {**p.op_kwargs(), "bias": torch.randn(70).bfloat16()})
        # Positional, with the layout code.
        kw = p.op_kwargs()
        args = (x, *(kw[k] for k in ("qweight", "scales", "zeros", "group_starts", "perm")))
        torch.library.opcheck(op, (*args, kw["out_features"], int(Int4Layout.CPU_TILES)))


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
    """(name, x, weight fields to replace, bias, exception, message)."""
    p = int4_layout.pack(make_quantized(64, 70, 32, sym=False, act_order=True))
    x = torch.randn(2, 64)
    qw, sc, zr, gs, pm = p.qweight, p.scales, p.zeros, p.group_starts, p.perm
    return p, [
        ("x int", x.int(), {}, None, TypeError, "x must be float32"),
        ("qweight dtype", x, dict(qweight=qw.float()), None, TypeError, "qweight must be int32"),
        ("qweight 1-D", x, dict(qweight=qw[0, 0]), None, RuntimeError, "qweight must be 3-D"),
        (
            "out_features",
            x,
            dict(out_features=300),
            None,
            RuntimeError,
            "qweight.size(0) must be 5",
        ),
        ("scales dtype", x, dict(scales=sc.half()), None, TypeError, "scales must be float32"),
        ("zeros dtype", x, dict(zeros=zr.int()), None, TypeError, "zeros must be uint8"),
        (
            "group_starts len",
            x,
            dict(group_starts=gs[:-1]),
            None,
            RuntimeError,
            "group_starts.size(0) must be 3",
        ),
        ("perm len", x, dict(perm=pm[:-1]), None, RuntimeError, "perm.size(0) must be 64"),
        (
            "K mismatch",
            torch.randn(2, 63),
            dict(zeros=None, perm=None),
            None,
            RuntimeError,
            "x.size(-1) must be K = 64",
        ),
        ("bias len", x, {}, torch.zeros(69), RuntimeError, "bias.size(0) must be 70"),
        (
            "device",
            x,
            dict(scales=sc.to("meta")),
            None,
            RuntimeError,
            "scales must be on the same device as x",
        ),
    ]


_BAD_WEIGHT, _BAD_CASES = _bad_cases()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", _BAD_CASES, ids=lambda c: c[0])
def test_bad_input(backend, case):
    name, x, changes, bias, exc, msg = case
    w = dataclasses.replace(_BAD_WEIGHT, **changes)
    with pytest.raises(exc, match="int4_gemm: .*" + re.escape(msg)):
        _impl(backend)(x, w, bias)


def test_bad_layout_values():
    p = int4_layout.pack(make_quantized(64, 70, 32, sym=False, act_order=True))
    x = torch.randn(2, 64)
    bad_perm = p.perm.clone()
    bad_perm[3] = 64
    with pytest.raises(RuntimeError, match=r"perm values must lie in \[-1, 64\)"):
        torch.ops.bitpress.int4_gemm(x, **{**p.op_kwargs(), "perm": bad_perm})
    bad_gs = p.group_starts.clone()
    bad_gs[-1] = 3
    with pytest.raises(RuntimeError, match="group_starts must run from 0 to Kp/8 = 8"):
        torch.ops.bitpress.int4_gemm(x, **{**p.op_kwargs(), "group_starts": bad_gs})


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
