"""fp8_gemm (W8A8): every backend and CPU path against a float64 reference and against
torch._scaled_mm (tensorwise and rowwise, on the CPU), every scale layout and output dtype, odd
shapes, non-contiguous inputs, opcheck, torch.compile, and bad input."""

from __future__ import annotations

import pytest
import torch
from fp8_data import TOLERANCE, cpu_isa, e4m3, scale  # noqa: F401

from bitpress import ops
from bitpress.fp8 import reference
from bitpress.testing import rel_err

OP = "fp8_gemm"
OUT = [torch.bfloat16, torch.float16, torch.float32]
# (scale_a layout, scale_b layout)
SCALES = [
    ("tensor", "tensor"),
    ("tensor1", "tensor"),
    ("row", "row"),
    ("row", "tensor1"),
    ("tensor", "row"),
    ("block", "block"),
]
SHAPES = [(1, 256, 64), (1, 300, 17), (7, 1000, 129), (33, 520, 130), (16, 128, 1), (40, 40, 40)]


def ref64(a, b, sa, sb, bias=None):
    y = reference.dequantize_act(a, sa) @ reference.dequantize_weight(b, sb).t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("out_dtype", OUT)
@pytest.mark.parametrize("layouts", SCALES, ids=["-".join(s) for s in SCALES])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_matches_reference(backend_device, M, K, N, layouts, out_dtype):
    be, dev = backend_device
    a, b = e4m3((M, K)), e4m3((N, K))
    sa, sb = scale(layouts[0], M, K, False), scale(layouts[1], N, K, True)
    bias = torch.randn(N) if N % 2 else None
    args = [t if t is None else t.to(dev) for t in (a, b, sa, sb, bias)]
    y = ops.fp8_gemm(*args, out_dtype=out_dtype, backend=be)
    assert y.dtype == out_dtype and y.shape == (M, N)
    assert rel_err(y.cpu(), ref64(a, b, sa, sb, bias)) < TOLERANCE[out_dtype]


@pytest.mark.parametrize("M", [1, 5, 17, 40])
@pytest.mark.parametrize("layouts", [("row", "row"), ("block", "block")], ids=["row", "block"])
def test_cpu_paths(cpu_isa, M, layouts):  # noqa: F811
    K, N = 300, 77
    a, b = e4m3((M, K)), e4m3((N, K))
    sa, sb = scale(layouts[0], M, K, False), scale(layouts[1], N, K, True)
    y = ops.fp8_gemm(a, b, sa, sb, out_dtype=torch.float32, backend="cpu")
    assert rel_err(y, ref64(a, b, sa, sb)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("M,K,N", [(1, 256, 64), (16, 512, 48), (33, 1024, 160)])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_matches_torch_scaled_mm(M, K, N, recipe, out_dtype):
    """torch._scaled_mm on the CPU (b column-major [K, N], rowwise scale_b [1, N]): the same
    result within float32 summation order (and one rounding to out_dtype)."""
    a, b = e4m3((M, K)), e4m3((N, K))
    if recipe == "tensorwise":
        sa, sb = scale("tensor", M, K, False), scale("tensor", N, K, True)
        tsa, tsb = sa, sb
    else:
        sa, sb = scale("row", M, K, False), scale("row", N, K, True)
        tsa, tsb = sa, sb.t()
    bias = torch.randn(N).to(out_dtype) if out_dtype == torch.bfloat16 else None
    try:
        expect = torch._scaled_mm(a, b.t(), tsa, tsb, bias=bias, out_dtype=out_dtype)
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - torch build without it
        pytest.skip(f"torch._scaled_mm does not run here: {e}")
    y = ops.fp8_gemm(a, b, sa, sb, bias, out_dtype=out_dtype, backend="cpu")
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3}[out_dtype]
    assert rel_err(y.double(), expect.double()) < tol
    assert rel_err(y, ref64(a, b, sa, sb, bias)) < TOLERANCE[out_dtype]


def test_products_are_exact():
    """One nonzero per row of b: y = a * b * sa * sb with a single float32 rounding."""
    M, K, N = 9, 256, 32
    a = e4m3((M, K))
    b = torch.zeros(N, K)
    ks = torch.randint(0, K, (N,))
    b[torch.arange(N), ks] = torch.randn(N) * 50
    b = b.to(torch.float8_e4m3fn)
    sa, sb = torch.full((M, 1), 2.0**-5), torch.full((N, 1), 2.0**-3)
    y = ops.fp8_gemm(a, b, sa, sb, out_dtype=torch.float32, backend="cpu")
    exact = a.double()[:, ks] * b.double()[torch.arange(N), ks] * 2.0**-8
    assert torch.equal(y, exact.float())


def test_non_contiguous(backend_device):
    be, dev = backend_device
    ab, bb = e4m3((20, 600)), e4m3((300, 600))
    a, b = ab[::2, ::2], bb[::2, ::2]
    sa, sb = scale("block", 10, 300, False), scale("block", 150, 300, True)
    y = ops.fp8_gemm(a.to(dev), b.to(dev), sa.to(dev), sb.to(dev), backend=be).cpu()
    assert rel_err(y, ref64(a, b, sa, sb)) < TOLERANCE[torch.bfloat16]
    y = ops.fp8_gemm(a.t().contiguous().t().to(dev), b.to(dev), sa.to(dev), sb.to(dev),
                     backend=be).cpu()  # fmt: skip
    assert rel_err(y, ref64(a, b, sa, sb)) < TOLERANCE[torch.bfloat16]


def test_empty(backend_device):
    be, dev = backend_device
    for M, K, N in ((0, 16, 8), (3, 0, 8), (3, 16, 0)):
        a, b = e4m3((M, K)), e4m3((N, K))
        y = ops.fp8_gemm(a.to(dev), b.to(dev), torch.ones(()).to(dev), torch.ones(()).to(dev),
                         out_dtype=torch.float32, backend=be).cpu()  # fmt: skip
        assert y.shape == (M, N) and (y == 0).all()


# opcheck's test_schema compares the inputs before and after the call with arithmetic that torch
# does not implement for float8 tensors ("mul_cpu_reduced_float" not implemented): the other
# utilities run, and the inputs are compared bit for bit here instead.
OPCHECK_UTILS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _opcheck(args):
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.bitpress.fp8_gemm.default, args, test_utils=OPCHECK_UTILS)
    torch.ops.bitpress.fp8_gemm(*args)
    for a, b in zip(args, before, strict=True):
        if isinstance(a, torch.Tensor):
            assert (
                torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                if a.element_size() == 1
                else torch.equal(a, b)
            )


def test_opcheck():
    a, b = e4m3((5, 300)), e4m3((130, 300))
    for la, lb in SCALES:
        args = (a, b, scale(la, 5, 300, False), scale(lb, 130, 300, True), None, None)
        _opcheck(args)
    args = (a, b, scale("row", 5, 300, False), scale("row", 130, 300, True), torch.randn(130),
            torch.float16)  # fmt: skip
    _opcheck(args)


def test_compile_fullgraph():
    b, sb = e4m3((64, 256)), scale("row", 64, 256, True)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        q, s = ops.fp8_quantize(x, granularity="token")
        return ops.fp8_gemm(q, b, s, sb, out_dtype=torch.float32)

    x = torch.randn(3, 256)
    q, s = ops.fp8_quantize(x, granularity="token")
    assert torch.equal(f(x), ops.fp8_gemm(q, b, s, sb, out_dtype=torch.float32))


def _bad_cases():
    a, b = e4m3((3, 256)), e4m3((130, 256))
    sa, sb = torch.ones(3, 1), torch.ones(130, 1)
    return [
        ("a dtype", (a.float(), b, sa, sb, None, None), TypeError, "a"),
        ("a rank", (a[None], b, sa, sb, None, None), RuntimeError, "a"),
        ("b dtype", (a, b.float(), sa, sb, None, None), TypeError, "b"),
        ("b rank", (a, b[0], sa, sb, None, None), RuntimeError, "b"),
        ("b K", (a, e4m3((130, 255)), sa, sb, None, None), RuntimeError, "b"),
        ("scale_a dtype", (a, b, sa.double(), sb, None, None), TypeError, "scale_a"),
        ("scale_b dtype", (a, b, sa, sb.half(), None, None), TypeError, "scale_b"),
        ("scale_a shape", (a, b, torch.ones(4, 1), sb, None, None), RuntimeError, "scale_a"),
        ("scale_b shape", (a, b, sa, torch.ones(129, 1), None, None), RuntimeError, "scale_b"),
        ("scale_b 1-D", (a, b, sa, torch.ones(130), None, None), RuntimeError, "scale_b"),
        ("block a only", (a, b, torch.ones(3, 2), sb, None, None), RuntimeError, "scale_b"),
        ("block b only", (a, b, sa, torch.ones(2, 2), None, None), RuntimeError, "scale_a"),
        ("bias size", (a, b, sa, sb, torch.ones(3), None), RuntimeError, "bias"),
        ("bias dtype", (a, b, sa, sb, torch.ones(130, dtype=torch.int64), None), TypeError,
         "bias"),
        ("out_dtype", (a, b, sa, sb, None, torch.int32), TypeError, "out_dtype"),
        ("b device", (a, b.to("meta"), sa, sb, None, None), RuntimeError, "b"),
        ("scale_a device", (a, b, sa.to("meta"), sb, None, None), RuntimeError, "scale_a"),
    ]  # fmt: skip


@pytest.mark.parametrize("i", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs(backend_device, i):
    be, dev = backend_device
    _, args, exc, arg = _bad_cases()[i]
    with pytest.raises(exc, match=rf"^fp8_gemm: {arg}\b"):
        ops.fp8_gemm(*args[:5], out_dtype=args[5], backend=be)
