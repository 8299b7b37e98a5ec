"""W4A8 int4_gemm (act_dtype=torch.int8): every CPU kernel path (AMX-INT8, AVX512-VNNI, scalar)
against the float64 reference of the W4A8 formula, the paths against each other (bit for bit),
the error against the exact path, the module / config setting, autograd and the fake."""

from __future__ import annotations

import pytest
import torch
from int4_data import make_quantized

from bitpress import ops, reference
from bitpress._core import ext as _ext
from bitpress.int4 import layout as int4_layout
from bitpress.int4 import reference as int4_reference
from bitpress.int4.config import Int4Config
from bitpress.int4.modules import Int4Linear
from bitpress.testing import rel_err

ISAS = ["scalar", "avx2", "avx512", "amx"]
# Output rounding plus float32 accumulation of the per-group folds (the int32 sums are exact).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
I8 = torch.int8


def _isa_ok(isa):
    return ISAS.index(isa) <= ISAS.index(_ext.C.best_cpu_isa())


def _run(isa, x, p, bias=None):
    _ext.C.set_cpu_isa(isa)
    try:
        return ops.int4_gemm(x, p, bias, act_dtype=I8)
    finally:
        _ext.C.set_cpu_isa(None)


SHAPES = [
    (256, 65, 128, True, False),  # whole 64-row AMX steps, a partial tile of columns
    (384, 130, 32, False, False),  # groups of 4 octets: not whole AMX steps (VNNI on AMX CPUs)
    (512, 64, 128, False, True),  # act-order: perm, padded groups
    (192, 70, 64, True, False),  # one AMX step per group
]
SHAPE_IDS = ["g128", "g32-asym", "g128-actorder", "g64"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 16, 17, 33, 130])
@pytest.mark.parametrize("K,N,gs,sym,act", SHAPES, ids=SHAPE_IDS)
def test_every_path_matches_reference(isa, dtype, M, K, N, gs, sym, act):
    if not _isa_ok(isa):
        pytest.skip(f"this CPU cannot run the {isa} path")
    p = int4_layout.pack(make_quantized(K, N, gs, sym, act))
    torch.manual_seed(M)
    x = torch.randn(M, K).to(dtype)
    x[0, :7] = 0  # a few exact zeros
    bias = torch.randn(N).to(dtype)
    y = _run(isa, x, p, bias)
    ref = reference.int4_gemm(x, p, bias, act_dtype=I8)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y.double(), ref.double()) < TOLERANCE[dtype]


@pytest.mark.parametrize("K,N,gs,sym,act", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("M", [1, 5, 16, 40])
def test_paths_agree_bit_for_bit(K, N, gs, sym, act, M):
    p = int4_layout.pack(make_quantized(K, N, gs, sym, act))
    x = torch.randn(M, K, dtype=torch.float32)
    outs = {isa: _run(isa, x, p) for isa in ISAS if _isa_ok(isa)}
    base = outs["scalar"]
    for isa, y in outs.items():
        assert torch.equal(y, base), isa


def test_zero_rows_and_quantization_rule():
    p = int4_layout.pack(make_quantized(128, 64, 128, True, False))
    x = torch.zeros(3, 128)
    x[1, 5] = 2.5
    x[2] = torch.linspace(-1, 1, 128)
    y = ops.int4_gemm(x, p, act_dtype=I8)
    assert torch.equal(y[0], torch.zeros(64))
    ref = reference.int4_gemm(x, p, act_dtype=I8)
    assert rel_err(y.double(), ref.double()) < 2e-5
    xq, sx = int4_reference.quantize_act_int8(x)
    assert xq.abs().max() <= 127 and float(sx[0]) == 1.0 and float(xq[1, 5]) == 127.0


def test_error_against_exact_path():
    torch.manual_seed(0)
    p = int4_layout.pack(make_quantized(1024, 256, 128, True, False))
    x = torch.randn(16, 1024, dtype=torch.bfloat16)
    exact = ops.int4_gemm(x, p).double()
    w4a8 = ops.int4_gemm(x, p, act_dtype=I8).double()
    sqnr = 10 * torch.log10(exact.pow(2).sum() / (w4a8 - exact).pow(2).sum())
    assert sqnr > 30, float(sqnr)  # gaussian x: ~36 dB from 8-bit rounding


def test_backward_is_straight_through():
    p = int4_layout.pack(make_quantized(256, 65, 128, True, False))
    x = torch.randn(4, 256, requires_grad=True)
    ops.int4_gemm(x, p, act_dtype=I8).sum().backward()
    g8 = x.grad.clone()
    x.grad = None
    ops.int4_gemm(x, p).sum().backward()
    assert torch.equal(g8, x.grad)


def test_fake_and_compile():
    p = int4_layout.pack(make_quantized(256, 65, 128, True, False))
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.bitpress.int4_gemm(x, *p.op_args(), None, I8)
    assert y.shape == (2, 3, 65) and y.dtype == torch.bfloat16
    torch.library.opcheck(
        torch.ops.bitpress.int4_gemm.default, (x, *p.op_args(), None, I8),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


def test_module_and_config():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96).to(torch.bfloat16)
    m = Int4Linear.from_linear(lin)
    assert m.act_dtype is None and "act_dtype" not in repr(m)
    keys = set(m.state_dict())
    m.act_dtype = I8
    assert "act_dtype=torch.int8" in repr(m) and set(m.state_dict()) == keys
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    assert torch.equal(m(x), ops.int4_gemm(x, m.weight_packed, m.bias, act_dtype=I8))
    model = torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.Linear(96, 64))
    import bitpress

    bitpress.quantize_(model, Int4Config(group_size=32, activations="int8"))
    assert all(mod.act_dtype == I8 for mod in model if isinstance(mod, Int4Linear))
    with pytest.raises(ValueError, match="activations"):
        Int4Config(activations="fp8")
    with pytest.raises(ValueError, match="act_dtype"):
        Int4Linear(64, 8, act_dtype=torch.float16)
    assert Int4Linear(64, 8, act_dtype=I8).act_dtype == I8


@pytest.mark.parametrize("bad", [torch.float16, torch.uint8, torch.int32])
def test_bad_act_dtype_names_it(bad):
    p = int4_layout.pack(make_quantized(128, 64, 128, True, False))
    x = torch.randn(2, 128)
    for call in (
        lambda: ops.int4_gemm(x, p, act_dtype=bad),
        lambda: torch.ops.bitpress.int4_gemm(x, *p.op_args(), None, bad),
        lambda: ops.int4_gemm(x, p, act_dtype=bad, backend="reference"),
    ):
        with pytest.raises(RuntimeError, match=r"int4_gemm: act_dtype"):
            call()
