"""fp8_weight_gemm: every backend and every CPU path (dot-product path, microkernel variants)
against a float64 reference on odd shapes, every x dtype and scale layout, the exactness of the
products, non-contiguous inputs, NaN weights, opcheck, torch.compile, and bad input."""

from __future__ import annotations

import pytest
import torch
from fp8_data import DTYPES, TOLERANCE, all_codes, cpu_isa, e4m3, scale  # noqa: F401

from bitpress import ops
from bitpress.fp8 import reference
from bitpress.fp8.reference import E4M3
from bitpress.testing import rel_err

OP = "fp8_weight_gemm"
LAYOUTS = ["tensor", "tensor1", "row", "block"]
# (M, K, N): M = 1..4 take the dot-product path on CPUs without AMX, more the microkernel.
SHAPES = [(1, 256, 64), (1, 300, 17), (3, 1000, 129), (7, 40, 1), (33, 520, 130), (16, 128, 256)]


def ref64(x, w, ws, bias=None):
    y = x.double().reshape(-1, x.shape[-1]) @ reference.dequantize_weight(w, ws).t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_matches_reference(backend_device, M, K, N, dtype, layout):
    be, dev = backend_device
    x = torch.randn(M, K).to(dtype)
    w = e4m3((N, K))
    ws = scale(layout, N, K, weight=True)
    bias = torch.randn(N).to(dtype) if N % 2 else None
    y = ops.fp8_weight_gemm(x.to(dev), w.to(dev), ws.to(dev), None if bias is None else
                            bias.to(dev), backend=be)  # fmt: skip
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y.cpu(), ref64(x, w, ws, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("M", [1, 2, 4, 5, 17, 40])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row", "block"])
def test_cpu_paths(cpu_isa, M, dtype, layout):  # noqa: F811
    """Every CPU path (scalar: emulated microkernel and scalar dot products; avx2; avx512;
    amx) on both regimes of M, with K and N not multiples of the tiles."""
    K, N = 300, 77
    x = torch.randn(M, K).to(dtype)
    w = e4m3((N, K))
    ws = scale(layout, N, K, weight=True)
    y = ops.fp8_weight_gemm(x, w, ws, backend="cpu")
    assert rel_err(y, ref64(x, w, ws)) < TOLERANCE[dtype]


@pytest.mark.parametrize("M", [5, 16, 17, 40])
@pytest.mark.parametrize("K", [301, 64, 36])
def test_cpu_bf16_xt_blocks(cpu_isa, M, K):  # noqa: F811
    """bf16 x reaches the engine as xᵀ pairs built by 16 x 16 register transposes (AVX-512):
    odd K (the last pair half empty), K below one block of pairs, M not a multiple of 16, and x
    with a row stride (a column slice of a wider tensor)."""
    N = 45
    xw = torch.randn(M, K + 7).bfloat16()
    x = xw[:, 3 : 3 + K]
    w = e4m3((N, K))
    ws = scale("row", N, K, weight=True)
    y = ops.fp8_weight_gemm(x, w, ws, backend="cpu")
    assert rel_err(y, ref64(x, w, ws)) < TOLERANCE[torch.bfloat16], cpu_isa


@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 6, 7, 9, 65, 66, 67, 68, 70])
@pytest.mark.parametrize("layout", ["row", "block"])
def test_cpu_m1_row_streams(cpu_isa, N, layout):  # noqa: F811
    """M = 1 on the AVX2 / AVX-512 dot-product path reads 4 runs of weight rows at once: every
    remainder of 4 rows in a task (N < 64: one ragged task; 64 + r: a full task, then r rows),
    K = 203 with a ragged tail after the 32- and 8-code steps, and a NaN code in one row that
    must reach that row's output only."""
    K = 203
    x = torch.randn(1, K).to(torch.bfloat16)
    w = e4m3((N, K))
    ws = scale(layout, N, K, weight=True)
    y = ops.fp8_weight_gemm(x, w, ws, backend="cpu")
    assert rel_err(y, ref64(x, w, ws)) < TOLERANCE[torch.bfloat16]
    if N > 2:
        w.view(torch.uint8)[N - 2, K // 2] = 0x7F  # NaN
        y = ops.fp8_weight_gemm(x, w, ws, backend="cpu")
        assert y[0, N - 2].isnan()
        assert not y[0, : N - 2].isnan().any() and not y[0, N - 1 :].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row", "block"])
def test_cpu_large_tasks(dtype, layout):
    """M > 192 on the CPU: tasks of up to 256 weight rows with AMX (the last one ragged), and K
    past one 4096-long panel (two panels, the second ragged)."""
    M, K, N = 200, 4224, 2100
    x = torch.randn(M, K).to(dtype)
    w = e4m3((N, K))
    ws = scale(layout, N, K, weight=True)
    bias = torch.randn(N).to(dtype)
    y = ops.fp8_weight_gemm(x, w, ws, bias, backend="cpu")
    assert rel_err(y, ref64(x, w, ws, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 9, 40])
def test_products_are_exact(dtype, M):
    """With one nonzero weight per row, y is x[m, k] * w[n, k] * s rounded once to float32 (then
    to x's dtype): no rounding of x (fp16 / float32 x split exactly into bf16 parts) nor of w.
    float32 x on the microkernel path adds its three parts' exact products in float32: up to two
    roundings (a relative 2^-23)."""
    K, N = 256, 32
    x = torch.randn(M, K, dtype=torch.float64).to(dtype)
    w = torch.zeros(N, K)
    ks = torch.randint(0, K, (N,))
    w[torch.arange(N), ks] = torch.randn(N) * 50
    w = w.to(E4M3)
    ws = torch.full((N, 1), 2.0**-3)
    exact = x.double()[:, ks] * w.double()[torch.arange(N), ks] * 2.0**-3
    y = ops.fp8_weight_gemm(x, w, ws, backend="cpu")
    if dtype == torch.float32:
        assert ((y.double() - exact).abs() <= exact.abs() * 2.0**-23).all()
    else:
        assert torch.equal(y, exact.to(dtype))
        assert torch.equal(ops.fp8_weight_gemm(x.float(), w, ws, backend="cpu"), exact.float())


def test_every_code(backend_device):
    """Each of the 256 codes as a weight (NaN codes: NaN outputs, as the reference)."""
    be, dev = backend_device
    codes = all_codes()  # 256 rows of one code each, at every K position mod 32
    K = 64
    w = codes.view(torch.uint8).repeat_interleave(K).reshape(256, K)
    w = w.view(E4M3)
    for M in (1, 8):
        x = torch.ones(M, K)
        y = ops.fp8_weight_gemm(x.to(dev), w.to(dev), torch.ones(()).to(dev), backend=be).cpu()
        expect = codes.float() * K
        assert torch.equal(y[0].isnan(), expect.isnan())
        assert torch.equal(y[0][~expect.isnan()], expect[~expect.isnan()])


@pytest.mark.parametrize("M", [1, 6])
def test_nan_weight_in_one_column(backend_device, M):
    be, dev = backend_device
    x = torch.randn(M, 300)
    w = e4m3((40, 300))
    w.view(torch.uint8)[5, 123] = 0xFF  # -NaN
    y = ops.fp8_weight_gemm(x.to(dev), w.to(dev), torch.rand(40, 1).to(dev), backend=be).cpu()
    assert y[:, 5].isnan().all() and not y[:, torch.arange(40) != 5].isnan().any()


def test_non_contiguous_and_lead_dims(backend_device):
    be, dev = backend_device
    xb = torch.randn(4, 6, 600)
    wb = e4m3((300, 600))
    ws = scale("block", 150, 300, weight=True)
    x, w = xb[:, ::2, ::2], wb[::2, ::2]
    y = ops.fp8_weight_gemm(x.to(dev), w.to(dev), ws.to(dev), backend=be).cpu()
    assert y.shape == (4, 3, 150)
    assert rel_err(y, ref64(x, w, ws)) < TOLERANCE[torch.float32]
    x1 = torch.randn(300)
    y1 = ops.fp8_weight_gemm(x1.to(dev), w.to(dev), ws.to(dev), backend=be).cpu()
    assert y1.shape == (150,) and rel_err(y1, ref64(x1, w, ws)) < 2e-5


def test_empty(backend_device):
    be, dev = backend_device
    for M, K, N in ((0, 16, 8), (3, 0, 8), (3, 16, 0)):
        w = e4m3((N, K))
        bias = torch.randn(N)
        y = ops.fp8_weight_gemm(torch.randn(M, K).to(dev), w.to(dev), torch.ones(1).to(dev),
                                bias.to(dev), backend=be).cpu()  # fmt: skip
        assert y.shape == (M, N) and torch.equal(y, bias.expand(M, N))


# opcheck's test_schema compares the inputs before and after the call with arithmetic that torch
# does not implement for float8 tensors ("mul_cpu_reduced_float" not implemented): the other
# utilities run, and the inputs are compared bit for bit here instead.
OPCHECK_UTILS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _opcheck(args):
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(
        torch.ops.bitpress.fp8_weight_gemm.default, args, test_utils=OPCHECK_UTILS
    )
    torch.ops.bitpress.fp8_weight_gemm(*args)
    for a, b in zip(args, before, strict=True):
        if isinstance(a, torch.Tensor):
            assert (
                torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                if a.element_size() == 1
                else torch.equal(a, b)
            )


def test_opcheck():
    x = torch.randn(5, 300, dtype=torch.bfloat16)
    w = e4m3((130, 300))
    for ws in (scale("tensor", 130, 300, True), scale("row", 130, 300, True),
               scale("block", 130, 300, True)):  # fmt: skip
        _opcheck((x, w, ws, None))
    _opcheck((x.float()[:1], w, scale("row", 130, 300, True), torch.randn(130)))


def test_compile_fullgraph():
    w = e4m3((64, 256))
    ws = scale("row", 64, 256, True)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return ops.fp8_weight_gemm(x, w, ws).relu()

    x = torch.randn(3, 256)
    assert torch.equal(f(x), ops.fp8_weight_gemm(x, w, ws).relu())


def _bad_cases():
    x, w, ws = torch.randn(3, 256), e4m3((130, 256)), torch.ones(130, 1)
    return [
        ("x dtype", (x.double(), w, ws, None), TypeError, "x"),
        ("x 0-D", (torch.tensor(1.0), w, ws, None), RuntimeError, "x"),
        ("w dtype", (x, w.float(), ws, None), TypeError, "w"),
        ("w e5m2", (x, w.float().to(torch.float8_e5m2), ws, None), TypeError, "w"),
        ("w rank", (x, w[None], ws, None), RuntimeError, "w"),
        ("w K", (x, e4m3((130, 255)), ws, None), RuntimeError, "w"),
        ("w_scale dtype", (x, w, ws.half(), None), TypeError, "w_scale"),
        ("w_scale shape", (x, w, torch.ones(130), None), RuntimeError, "w_scale"),
        ("w_scale block", (x, w, torch.ones(2, 3), None), RuntimeError, "w_scale"),
        ("w_scale 3-D", (x, w, torch.ones(1, 1, 1), None), RuntimeError, "w_scale"),
        ("bias size", (x, w, ws, torch.ones(129)), RuntimeError, "bias"),
        ("bias dtype", (x, w, ws, torch.ones(130, dtype=torch.int32)), TypeError, "bias"),
        ("w device", (x, w.to("meta"), ws, None), RuntimeError, "w"),
        ("w_scale device", (x, w, ws.to("meta"), None), RuntimeError, "w_scale"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs(backend_device, i):
    be, dev = backend_device
    _, args, exc, arg = _bad_cases()[i]
    with pytest.raises(exc, match=rf"^fp8_weight_gemm: {arg}\b"):
        ops.fp8_weight_gemm(*args, backend=be)
