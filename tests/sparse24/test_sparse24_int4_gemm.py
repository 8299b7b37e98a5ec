"""sparse24_int4_gemm: the qvalues packing (exact), every backend and CPU path against a float64
reference (symmetric and asymmetric, every group size rule, odd shapes, every dtype of x, scales
and zeros), the direct path and the dense fallback, non-contiguous x, bad inputs, opcheck and
torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

from bitpress import ops
from bitpress._core import ext as _ext
from bitpress.sparse24 import layout
from bitpress.sparse24 import reference as sparse24_reference
from bitpress.sparse24.cases import random_int4_24
from bitpress.testing import rel_err

OP = "sparse24_int4_gemm"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = ["scalar", "avx2", "avx512", "amx"]


def _isa_ok(isa):
    return ISAS.index(isa) <= ISAS.index(_ext.C.best_cpu_isa())


def _weight(N, K, gs, sym, scale_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return random_int4_24(N, K, gs, sym, scale_dtype, gen)


def ref64(x, qvalues, meta, scales, zeros, gs, bias=None):
    w = sparse24_reference.int4_dense(qvalues, meta, scales, zeros, gs)
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


def test_qvalues_packing_round_trip():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (9, 64), generator=gen)
    packed = layout.pack_qvalues(q)
    assert packed.dtype == torch.int32 and packed.shape == (9, 8)
    assert torch.equal(layout.unpack_qvalues(packed), q)
    assert int(packed[0, 0]) & 0xF == int(q[0, 0])  # lowest nibble = lowest K


def test_dense_definition():
    """One group of 4 by hand: q at the kept positions, (q - z) * s."""
    meta = torch.tensor([[0x9 | (0xC << 4), 0x4 | (0x4 << 4)]], dtype=torch.uint8)  # K = 16
    q = torch.tensor([[3, 15, 0, 8, 1, 2, 4, 5]])
    scales = torch.tensor([[0.5], [2.0]])  # group size 8
    zeros = torch.tensor([[1.0], [4.5]])
    w = sparse24_reference.int4_dense(layout.pack_qvalues(q), meta, scales, zeros, 8)
    want = torch.zeros(1, 16, dtype=torch.float64)
    want[0, 1], want[0, 2] = (3 - 1) * 0.5, (15 - 1) * 0.5
    want[0, 4], want[0, 7] = (0 - 1) * 0.5, (8 - 1) * 0.5
    want[0, 8], want[0, 9] = (1 - 4.5) * 2, (2 - 4.5) * 2
    want[0, 12], want[0, 13] = (4 - 4.5) * 2, (5 - 4.5) * 2
    assert torch.equal(w, want)


CASES = [  # M, K, N, group_size, sym
    (1, 64, 16, 32, True),
    (1, 4096, 33, 128, False),
    (7, 144, 61, 8, False),
    (3, 272, 29, 16, True),
    (5, 320, 40, 40, False),  # groups straddle the 32-column steps
    (16, 512, 129, -1, False),
    (17, 256, 33, 64, True),  # the dense fallback
    (33, 128, 7, 128, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,gs,sym", CASES)
def test_matches_reference(backend_device, dtype, M, K, N, gs, sym):
    backend, device = backend_device
    qv, meta, scales, zeros = _weight(N, K, gs, sym, dtype, M * K + N)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    args = [t if t is None else t.to(device) for t in (x, qv, meta, scales, zeros)]
    out = ops.sparse24_int4_gemm(*args, group_size=gs, bias=bias.to(device), backend=backend)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out.cpu(), ref64(x, qv, meta, scales, zeros, gs, bias)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 8, 9, 16, 17])
def test_every_cpu_path(isa, scale_dtype, M):
    if not _isa_ok(isa):
        pytest.skip(f"this CPU cannot run the {isa} path")
    for K, N, gs, sym in [(96, 19, 32, False), (160, 8, 8, True), (1024, 37, 128, False)]:
        qv, meta, scales, zeros = _weight(N, K, gs, sym, scale_dtype, K + M)
        x = torch.randn(M, K)
        _ext.C.set_cpu_isa(isa)
        try:
            out = ops.sparse24_int4_gemm(x, qv, meta, scales, zeros, group_size=gs, backend="cpu")
        finally:
            _ext.C.set_cpu_isa(None)
        assert rel_err(out, ref64(x, qv, meta, scales, zeros, gs)) <= TOLERANCE[torch.float32]


def test_non_contiguous_x_and_leading_dims():
    qv, meta, scales, zeros = _weight(21, 128, 64, False, torch.float32, 4)
    big = torch.randn(2, 3, 256)
    x = big[..., 1::2]
    out = ops.sparse24_int4_gemm(x, qv, meta, scales, zeros, group_size=64)
    assert out.shape == (2, 3, 21)
    want = ref64(x.reshape(-1, 128), qv, meta, scales, zeros, 64)
    assert rel_err(out.reshape(-1, 21), want) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs_name_the_argument(backend):
    qv, meta, scales, zeros = _weight(16, 64, 32, False, torch.float32, 0)
    good = dict(x=torch.randn(2, 64), qvalues=qv, meta=meta, scales=scales, zeros=zeros,
                group_size=32, bias=None, layout=0)  # fmt: skip
    bad_meta = meta.clone()
    bad_meta[3, 1] = 0x11
    cases = [
        ("x", TypeError, dict(x=torch.randn(2, 64).double())),
        ("x", RuntimeError, dict(x=torch.randn(2, 56))),
        ("qvalues", TypeError, dict(qvalues=qv.long())),
        ("qvalues", RuntimeError, dict(qvalues=qv[:, :2])),
        ("meta", RuntimeError, dict(meta=meta[:8])),
        ("meta", RuntimeError, dict(meta=bad_meta)),
        ("scales", RuntimeError, dict(scales=scales[:1])),
        ("scales", TypeError, dict(scales=scales.double())),
        ("zeros", RuntimeError, dict(zeros=zeros[:, :3])),
        ("group_size", RuntimeError, dict(group_size=12)),
        ("group_size", RuntimeError, dict(group_size=0)),
        ("bias", RuntimeError, dict(bias=torch.randn(3))),
        ("layout", RuntimeError, dict(layout=7)),
    ]
    for name, exc, change in cases:
        a = {**good, **change}
        with pytest.raises(exc, match=rf"^sparse24_int4_gemm: {name}"):
            ops.sparse24_int4_gemm(
                a["x"], a["qvalues"], a["meta"], a["scales"], a["zeros"],
                group_size=a["group_size"], bias=a["bias"], layout=a["layout"], backend=backend,
            )  # fmt: skip


def test_opcheck():
    op = torch.ops.bitpress.sparse24_int4_gemm.default
    for M, sym in [(1, True), (4, False), (20, False)]:
        qv, meta, scales, zeros = _weight(24, 128, 32, sym, torch.bfloat16, M)
        x = torch.randn(M, 128).bfloat16()
        torch.library.opcheck(op, (x, qv, meta, scales, zeros, 32, 0))
        torch.library.opcheck(op, (x, qv, meta, scales, zeros, 32, 0, torch.randn(24).bfloat16()))


def test_torch_compile_fullgraph():
    qv, meta, scales, zeros = _weight(40, 256, 128, False, torch.float16, 3)

    @torch.compile(fullgraph=True)
    def f(x):
        return ops.sparse24_int4_gemm(x, qv, meta, scales, zeros, group_size=128) + 1

    for M in (1, 6, 18):
        x = torch.randn(M, 256).half()
        want = ops.sparse24_int4_gemm(x, qv, meta, scales, zeros, group_size=128) + 1
        assert torch.equal(f(x), want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
def test_bf16_paths(isa, M):
    """bf16 x: the vdpbf16ps path on (128 + q) pairs, or (q - 8) pairs when symmetric
    (group_size % 64 == 0, row tails of 16, 32 and 48 columns) and the float32 paths, against the
    float64 reference."""
    if not _isa_ok(isa):
        pytest.skip(f"this CPU cannot run the {isa} path")
    for K, N, gs, sym in [(208, 29, 64, False), (1024, 40, 128, True), (192, 5, -1, False),
                          (352, 17, 32, False), (208, 29, 64, True),
                          (176, 7, -1, True)]:  # fmt: skip
        qv, meta, scales, zeros = _weight(N, K, gs, sym, torch.bfloat16, K + M)
        x = torch.randn(M, K).bfloat16()
        _ext.C.set_cpu_isa(isa)
        try:
            out = ops.sparse24_int4_gemm(x, qv, meta, scales, zeros, group_size=gs, backend="cpu")
        finally:
            _ext.C.set_cpu_isa(None)
        want = ref64(x, qv, meta, scales, zeros, gs)
        assert rel_err(out, want) <= TOLERANCE[torch.bfloat16], (K, gs)
        # Tighter than the output rounding: the float32 sums are close to exact.
        assert rel_err(out.double(), want.bfloat16().double()) <= 5e-3, (K, gs)


@pytest.mark.parametrize("isa", ["avx512", "amx"])
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_bf16_decode_rows(isa, M, sym):
    """bf16 x, M <= 8 on AVX512-BF16: the task-wide row loop with its permuted step order, group
    128 (straight-line groups) and other multiples of 64 (an odd number of steps per group, a
    partial last group, partial last steps of 16 / 48 columns); an unordered nibble in the
    64-byte body or the tail of a metadata row is rejected."""
    if not _isa_ok(isa):
        pytest.skip(f"this CPU cannot run the {isa} path")
    for K, N, gs in [(4144, 9, 128), (1088, 13, 192), (320, 6, 64), (4096, 5, 128)]:
        qv, meta, scales, zeros = _weight(N, K, gs, sym, torch.bfloat16, K + M + sym)
        x = torch.randn(M, K).bfloat16()
        _ext.C.set_cpu_isa(isa)
        try:
            out = ops.sparse24_int4_gemm(x, qv, meta, scales, zeros, group_size=gs, backend="cpu")
            want = ref64(x, qv, meta, scales, zeros, gs)
            assert rel_err(out.double(), want.bfloat16().double()) <= 5e-3, (K, gs)
            for col in (5, K // 8 - 1):  # body, last byte
                bad = meta.clone()
                bad[N - 1, col] = 0x11
                with pytest.raises(RuntimeError, match=r"^sparse24_int4_gemm: meta"):
                    ops.sparse24_int4_gemm(x, qv, bad, scales, zeros, group_size=gs, backend="cpu")
        finally:
            _ext.C.set_cpu_isa(None)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("M", [5, 16, 17])
def test_bf16_values_blocks(sym, M):
    """bf16 x at 5 <= M <= 16: the kept values dequantized a block of 256 rows at a time, each
    block multiplied on its own (three blocks, the last partial: bias and output offsets); M = 17:
    the whole-weight workspace. An unordered nibble in the last block is rejected."""
    K, N, gs = 256, 600, 128
    qv, meta, scales, zeros = _weight(N, K, gs, sym, torch.bfloat16, M + sym)
    x = torch.randn(M, K).bfloat16()
    bias = torch.randn(N).bfloat16()
    out = ops.sparse24_int4_gemm(x, qv, meta, scales, zeros, group_size=gs, bias=bias)
    want = ref64(x, qv, meta, scales, zeros, gs, bias)
    assert rel_err(out, want) <= TOLERANCE[torch.bfloat16]
    bad = meta.clone()
    bad[N - 3, 7] = 0x11
    with pytest.raises(RuntimeError, match=r"^sparse24_int4_gemm: meta"):
        ops.sparse24_int4_gemm(x, qv, bad, scales, zeros, group_size=gs, bias=bias)
