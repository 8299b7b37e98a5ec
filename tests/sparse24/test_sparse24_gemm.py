"""sparse24_gemm: every backend and every CPU path (direct read stream, panels on each microkernel
variant the CPU has, via the ISA switch) against a float64 reference on odd shapes and every
dtype, non-contiguous x, leading dims, bias, bad inputs and unordered metadata, opcheck and
torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

from bitpress import ops, reference
from bitpress._core import backends
from bitpress._core import ext as _ext
from bitpress.sparse24 import layout
from bitpress.sparse24 import reference as sparse24_reference
from bitpress.sparse24.cases import random_24
from bitpress.sparse24.layout import Sparse24Layout
from bitpress.testing import rel_err

OP = "sparse24_gemm"
# float32 accumulation over K (2^-24 K-ish relative for fp32) plus one rounding to the dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = ["scalar", "avx2", "avx512", "amx"]
# M around the direct / panel threshold (16) and the AMX blocks (16, 32); K with tails of the
# 64-column (bf16) and 16-column (fp32) steps; N not a multiple of 16 or 32.
SHAPES = [
    (1, 64, 16),
    (3, 232, 19),
    (7, 136, 61),
    (16, 264, 33),
    (17, 512, 129),
    (33, 1024, 40),
    (130, 72, 7),
]


def _isa_ok(isa):
    return ISAS.index(isa) <= ISAS.index(_ext.C.best_cpu_isa())


def _weight(N, K, dtype, seed, fill=1.0):
    gen = torch.Generator().manual_seed(seed)
    return layout.compress(random_24(N, K, dtype, gen, fill))


def _to_backend(values, meta, backend, device):
    """The weight in the layout the backend reads (MMA on the cuda backend)."""
    values, meta = values.to(device), meta.to(device)
    if backend == "cuda":
        mma = pytest.importorskip("bitpress.sparse24.layout_mma")
        return (*mma.to_mma(values, meta), Sparse24Layout.MMA)
    return values, meta, Sparse24Layout.ROW


def ref64(x, values, meta, bias=None):
    w = layout.decompress(values.cpu(), meta.cpu(), torch.float64)
    y = x.cpu().double() @ w.t()
    return y + bias.cpu().double() if bias is not None else y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_matches_reference(backend_device, dtype, M, K, N):
    backend, device = backend_device
    values, meta = _weight(N, K, dtype, M + K + N, fill=0.8)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    v, m, lay = _to_backend(values, meta, backend, device)
    out = ops.sparse24_gemm(x.to(device), v, m, bias.to(device), layout=lay, backend=backend)
    assert out.shape == (M, N) and out.dtype == dtype and out.device.type == device.type
    assert rel_err(out.cpu(), ref64(x, values, meta, bias)) <= TOLERANCE[dtype]


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    if not _isa_ok(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} path")
    _ext.C.set_cpu_isa(request.param)
    yield request.param
    _ext.C.set_cpu_isa(None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 5, 7, 16, 17, 31, 33, 64, 97])
@pytest.mark.parametrize("K,N", [(64, 17), (200, 37), (1024, 64)])
def test_every_cpu_path(cpu_isa, dtype, M, K, N):
    """Each ISA path (direct: vdpbf16ps / AVX2 FMA / scalar; panels on AMX / AVX512-BF16 / AVX2
    microkernels for bf16 at M > 16; the dense fallback for fp16/fp32 at M > 16)."""
    values, meta = _weight(N, K, dtype, 7 * M + K)
    x = torch.randn(M, K).to(dtype)
    out = ops.sparse24_gemm(x, values, meta, backend="cpu")
    assert rel_err(out, ref64(x, values, meta)) <= TOLERANCE[dtype], cpu_isa


def test_paths_agree_exactly_where_the_sums_are_exact():
    """Small integers: every path's float32 sums are exact, so all paths give the same bits."""
    N, K = 45, 256
    gen = torch.Generator().manual_seed(5)
    w = random_24(N, K, torch.float32, gen)
    w = torch.where(w != 0, torch.randint(-8, 8, (N, K), generator=gen).float(), w)
    values, meta = layout.compress(w.bfloat16())
    for M in (1, 9, 40):
        x = torch.randint(-8, 8, (M, K), generator=gen).bfloat16()
        want = (x.double() @ w.double().t()).bfloat16()
        for isa in ISAS:
            if _isa_ok(isa):
                _ext.C.set_cpu_isa(isa)
                try:
                    assert torch.equal(ops.sparse24_gemm(x, values, meta), want), (isa, M)
                finally:
                    _ext.C.set_cpu_isa(None)


def _check_bf16_with_bias_and_exact_sums(cpu_isa, M, K, N, seed):
    """bf16 x with bias against the float64 reference, then small integers (every float32 sum
    exact) against the exact product bit for bit. Returns (x, values, meta)."""
    values, meta = _weight(N, K, torch.bfloat16, seed)
    x = torch.randn(M, K).bfloat16()
    bias = torch.randn(N).bfloat16()
    out = ops.sparse24_gemm(x, values, meta, bias, backend="cpu")
    assert rel_err(out, ref64(x, values, meta, bias)) <= TOLERANCE[torch.bfloat16], cpu_isa
    gen = torch.Generator().manual_seed(M)
    w = layout.decompress(values, meta, torch.float32)
    w = torch.where(w != 0, torch.randint(-8, 8, (N, K), generator=gen).float(), w)
    vi, mi = layout.compress(w.bfloat16())
    xi = torch.randint(-8, 8, (M, K), generator=gen).bfloat16()
    want = (xi.double() @ w.double().t()).bfloat16()
    assert torch.equal(ops.sparse24_gemm(xi, vi, mi, backend="cpu"), want), cpu_isa
    return x, values, meta


@pytest.mark.parametrize("block", ["64,1", "128,2", "192,3"])
@pytest.mark.parametrize("M,K,N", [(17, 200, 37), (40, 456, 100), (97, 1000, 161)])
def test_panel_k_chunks_and_panel_groups(cpu_isa, monkeypatch, block, M, K, N):
    """The panel path cuts K into chunks (x^T slice in L2) run over groups of panels whose C
    accumulates across the chunks; forced small here (BITPRESS_SPARSE24_PANEL_BLOCK), with ragged
    last chunks (K not a multiple of the chunk or of 64) and last groups, bias, and bit-exact
    against the direct path where the sums are exact."""
    monkeypatch.setenv("BITPRESS_SPARSE24_PANEL_BLOCK", block)
    monkeypatch.setenv("BITPRESS_SPARSE24_DIRECT_ROWS", "1")
    _check_bf16_with_bias_and_exact_sums(cpu_isa, M, K, N, M + K + N)


@pytest.mark.parametrize("M,K,N", [(200, 5000, 70)])
def test_panel_default_blocking_many_chunks(M, K, N):
    """The default blocking at a shape that takes several K chunks (M = 200: 2496 columns)."""
    values, meta = _weight(N, K, torch.bfloat16, 3)
    x = torch.randn(M, K).bfloat16()
    out = ops.sparse24_gemm(x, values, meta, backend="cpu")
    assert rel_err(out, ref64(x, values, meta)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("M,K,N", [(1, 64, 16), (3, 232, 19), (5, 72, 7), (256, 136, 33)])
def test_bf16_dense_fallback(cpu_isa, monkeypatch, M, K, N):
    """bf16 x from BITPRESS_SPARSE24_DENSE_ROWS rows on (default 256): the weight expanded into
    a reused workspace (vpexpandw on AVX512-VBMI2, C++ below) and the dense GEMM; with bias, and
    bit-exact against the direct path where the sums are exact."""
    monkeypatch.setenv("BITPRESS_SPARSE24_DENSE_ROWS", "1" if M < 256 else "256")
    x, values, meta = _check_bf16_with_bias_and_exact_sums(cpu_isa, M, K, N, M + K)
    bad = meta.clone()
    bad[N // 2, 0] = 0x00  # idx0 == idx1: unordered
    with pytest.raises(
        RuntimeError, match=rf"{OP}: meta values .* got 0x0 at row {N // 2}, group 0"
    ):
        ops.sparse24_gemm(x, values, bad, backend="cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_leading_dims(backend_device, dtype):
    backend, device = backend_device
    N, K = 29, 96
    values, meta = _weight(N, K, dtype, 11)
    v, m, lay = _to_backend(values, meta, backend, device)
    big = torch.randn(3, 5, 2 * K).to(dtype)
    x = big[..., ::2]  # stride 2 along K
    out = ops.sparse24_gemm(x.to(device), v, m, layout=lay, backend=backend)
    assert out.shape == (3, 5, N)
    assert (
        rel_err(out.cpu().reshape(-1, N), ref64(x.reshape(-1, K), values, meta)) <= TOLERANCE[dtype]
    )
    xt = torch.randn(K, 4).to(dtype).t()  # transposed rows
    out = ops.sparse24_gemm(xt.to(device), v, m, layout=lay, backend=backend)
    assert rel_err(out.cpu(), ref64(xt, values, meta)) <= TOLERANCE[dtype]


def test_empty_shapes(backend_device):
    backend, device = backend_device
    for M, K, N in [(0, 64, 8), (3, 0, 8), (3, 64, 0)]:
        values, meta = _weight(N, K, torch.float32, 1)
        bias = torch.randn(N)
        v, m, lay = _to_backend(values, meta, backend, device)
        out = ops.sparse24_gemm(
            torch.randn(M, K).to(device), v, m, bias.to(device), layout=lay, backend=backend
        )
        assert out.shape == (M, N)
        assert torch.equal(out.cpu(), bias.expand(M, N))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_unordered_meta_is_named(backend):
    values, meta = _weight(20, 64, torch.float32, 3)
    meta = meta.clone()
    meta[13, 2] = (meta[13, 2] & 0x0F) | (0x5 << 4)  # group 5 of row 13: idx0 = idx1 = 1
    meta[15, 0] = 0x00
    for M in (1, 40):
        with pytest.raises(
            RuntimeError,
            match=r"sparse24_gemm: meta values must be nibbles .* got 0x5 "
            r"at row 13, group 5",
        ):
            ops.sparse24_gemm(torch.randn(M, 64), values, meta, backend=backend)


def _bad_cases():
    values, meta = _weight(16, 64, torch.bfloat16, 0)
    x = torch.randn(3, 64).bfloat16()
    return [
        ("x", TypeError, dict(x=x.double())),
        ("x", RuntimeError, dict(x=torch.randn(3, 60).bfloat16())),
        ("values", TypeError, dict(values=values.float())),
        ("values", RuntimeError, dict(values=values[:, :16])),
        ("values", RuntimeError, dict(values=values.reshape(-1))),
        ("meta", TypeError, dict(meta=meta.int())),
        ("meta", RuntimeError, dict(meta=meta[:15])),
        ("meta", RuntimeError, dict(meta=meta[:, :4])),
        ("bias", RuntimeError, dict(bias=torch.randn(15).bfloat16())),
        ("bias", TypeError, dict(bias=torch.randn(16).double())),
        ("layout", RuntimeError, dict(layout=7)),
    ], dict(x=x, values=values, meta=meta, bias=None, layout=0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs_name_the_argument(backend):
    cases, good = _bad_cases()
    for name, exc, change in cases:
        a = {**good, **change}
        with pytest.raises(exc, match=rf"^sparse24_gemm: {name}"):
            ops.sparse24_gemm(
                a["x"], a["values"], a["meta"], a["bias"], layout=a["layout"], backend=backend
            )
        if backend == "cpu":  # the fake says the same
            with pytest.raises(exc, match=rf"^sparse24_gemm: {name}"):
                torch.ops.bitpress.sparse24_gemm(
                    a["x"].to("meta"), a["values"].to("meta"), a["meta"].to("meta"),
                    a["layout"], None if a["bias"] is None else a["bias"].to("meta"),
                )  # fmt: skip


def test_cpu_backend_rejects_mma_layout():
    values, meta = _weight(16, 64, torch.float32, 0)
    with pytest.raises(RuntimeError, match=r"sparse24_gemm: layout must be ROW \(0\) on this"):
        ops.sparse24_gemm(
            torch.randn(1, 64), values, meta, layout=Sparse24Layout.MMA, backend="cpu"
        )


def test_no_cuda_backend_without_a_cuda_kernel():
    caps = backends.capabilities("sparse24_gemm")
    has = torch._C._dispatch_has_kernel_for_dispatch_key("bitpress::sparse24_gemm", "CUDA")
    assert ("cuda" in caps) == has
    assert "cuda" not in backends.capabilities(
        "sparse24_int4_gemm"
    ) or torch._C._dispatch_has_kernel_for_dispatch_key("bitpress::sparse24_int4_gemm", "CUDA")


def test_opcheck():
    for dtype, M in [
        (torch.bfloat16, 1),
        (torch.bfloat16, 20),
        (torch.float16, 3),
        (torch.float32, 18),
    ]:
        values, meta = _weight(24, 64, dtype, M)
        x = torch.randn(M, 64).to(dtype)
        op = torch.ops.bitpress.sparse24_gemm.default
        torch.library.opcheck(op, (x, values, meta, 0))
        torch.library.opcheck(op, (x, values, meta, 0, torch.randn(24).to(dtype)))


def test_torch_compile_fullgraph():
    values, meta = _weight(40, 128, torch.bfloat16, 9)
    bias = torch.randn(40).bfloat16()

    @torch.compile(fullgraph=True)
    def f(x):
        return torch.relu(ops.sparse24_gemm(x, values, meta, bias)) * 2

    for M in (1, 5, 33):
        x = torch.randn(M, 128).bfloat16()
        want = torch.relu(ops.sparse24_gemm(x, values, meta, bias)) * 2
        assert torch.equal(f(x), want)


def test_registry_reference_is_the_plain_torch_one():
    assert reference.sparse24_gemm is sparse24_reference.sparse24_gemm
