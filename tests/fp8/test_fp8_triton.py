"""fp8_quantize, fp8_gemm and fp8_weight_gemm, Triton backend (triton_kernels/fp8_*.py): the
kernels under the interpreter against float64 references and torch._scaled_mm on odd shapes,
every scale layout and dtype, bias, 3-D and strided inputs; the E4M3 encode / decode bit for bit;
the compiled kernels' PTX/SASS for sm_80, sm_89 and sm_90; real shapes on a GPU (skipped
without one).

Interpreter notes (Triton 3.8): tl.dot on E4M3, fp16 and fp32 operands is right; on bf16 it is
wrong, so fp8_weight_gemm runs its dot on fp32 operands on CPU tensors (``DOT_F32``; exact, the
decoded weights are bf16 values); and the fp32 -> bf16 cast truncates instead of rounding to
nearest even, so bf16 outputs are compared with a reference truncated the same way. What that
leaves untested without a GPU: the bf16 tensor-core dot and the RNE output conversion, checked
only as instructions by the AOT tests.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from bitpress import ops
from bitpress.fp8 import reference
from bitpress.fp8.reference import FP8_MIN_SCALE as MIN_SCALE
from bitpress.testing import _triton_asm, cuobjdump, rel_err

E4M3 = torch.float8_e4m3fn
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3}
INTERP_BF16_TOL = 1e-3


def _trunc_bf16(y: torch.Tensor) -> torch.Tensor:
    """float -> bf16 by truncation of the float32 value (the interpreter's cast), as float64."""
    bits = y.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).double()


def _expect(ref64: torch.Tensor, dtype: torch.dtype):
    """(expected, tolerance) of an interpreter result in ``dtype``."""
    if dtype == torch.bfloat16:
        return _trunc_bf16(ref64), INTERP_BF16_TOL
    return ref64, TOL[dtype]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _e4m3(shape, gen, scale=3.0):
    return (torch.randn(shape, generator=gen) * scale).to(E4M3)


def _block_expand(s: torch.Tensor, rows: int, cols: int, br: int, bc: int) -> torch.Tensor:
    return s.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]


# ------------------------------------------------------------------------------------------
# fp8_quantize
# ------------------------------------------------------------------------------------------


def _quantize_ref(x: torch.Tensor, granularity: str, scale=None, block_size=None):
    """bitpress.fp8.reference: scale = max(amax / 448, 2^-126) per set (NaN propagates), q =
    e4m3(clamp(x / scale, +-448)) rounded to nearest even, NaN kept."""
    return reference.fp8_quantize(x, granularity, scale, block_size)


def _same_e4m3(q: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal codes where finite, NaN at the same places (a NaN's sign bit may differ)."""
    qn, wn = q.float().isnan(), want.float().isnan()
    return torch.equal(qn, wn) and torch.equal(
        q.view(torch.uint8)[~qn], want.view(torch.uint8)[~wn]
    )


def _same_scale(s: torch.Tensor, want: torch.Tensor) -> bool:
    return (
        s.shape == want.shape
        and torch.equal(s.isnan(), want.isnan())
        and torch.equal(s[~s.isnan()], want[~want.isnan()])
    )


def _quantize(*args, **kw):
    from bitpress.triton_kernels.fp8_quantize import fp8_quantize

    return fp8_quantize(*args, **kw)


@pytest.mark.interpreter
def test_encode_bit_exact():
    """Every E4M3 value, every midpoint between neighbours (ties to even), both signs, values past
    448 (saturation), subnormals, -0, inf and NaN: the kernel's integer encode equals
    torch's RNE conversion of the saturated value bit for bit."""
    gen = _gen(1)
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(E4M3).float()
    mids = (codes[1:] + codes[:-1]) / 2
    nudge = torch.cat([mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9))])
    special = [0.0, -0.0, 448.0, 449.0, 464.0, 465.0, 1e30, float("inf"), float("nan")]
    v = torch.cat(
        [
            codes,
            mids,
            nudge,
            torch.tensor(special),
            torch.randn(3000, generator=gen) * 100,
            torch.randn(3000, generator=gen) * 1e-3,
            torch.randn(500, generator=gen) * 1e-40,  # fp32 subnormals
        ]
    )
    v = torch.cat([v, -v])
    q, s = _quantize(v.reshape(1, -1), "tensor", scale=torch.ones(1))
    want = torch.where(v.isnan(), v, v.clamp(-448.0, 448.0)).to(E4M3)
    bad = (q.view(torch.uint8).flatten() != want.view(torch.uint8)).nonzero().flatten()
    assert len(bad) == 0, [(v[i].item(), q.flatten()[i].item()) for i in bad[:5]]
    assert torch.equal(s, torch.ones(1))


QUANT_CASES = [
    ((7, 300), "token", None),
    ((3, 5, 130), "token", None),
    ((3, 5000), "token", None),  # a row longer than one tile: two passes over the row
    ((33, 200), "channel", None),
    ((9, 300), "block", (1, 128)),
    ((2, 3, 300), "block", (1, 128)),
    ((200, 260), "block", (128, 128)),
    ((20, 2100), "tensor", None),  # several partial amaxes
    ((5,), "tensor", None),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,granularity,block", QUANT_CASES, ids=lambda v: str(v).replace(" ", "")
)
def test_quantize_dynamic(shape, granularity, block, dtype):
    gen = _gen(2)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    x2 = x.view(-1, x.shape[-1])
    if x2.shape[0] > 2 and granularity != "tensor":
        x2[1] = 0.0  # an all-zero row / block: scale 2^-126
        x2[2, 3] = float("nan")  # its row / block: scale NaN, q NaN
    q, s = _quantize(x, granularity, block_size=block)
    rq, rs = _quantize_ref(x, granularity, block_size=block)
    assert q.dtype == E4M3 and q.shape == x.shape and s.dtype == torch.float32
    assert _same_scale(s.reshape(rs.shape), rs)
    assert _same_e4m3(q, rq)
    want_shape = {
        "tensor": (1,),
        "token": (*x.shape[:-1], 1),
        "channel": (x.shape[0], 1),
    }.get(granularity)
    if granularity == "block":
        want_shape = (
            (*x.shape[:-1], -(-x.shape[-1] // block[1]))
            if block[0] == 1
            else (-(-x.shape[0] // block[0]), -(-x.shape[-1] // block[1]))
        )
    assert s.shape == want_shape
    if x2.shape[0] > 2 and granularity in ("token", "channel"):
        s2 = s.reshape(-1)
        assert s2[1] == MIN_SCALE and s2[2].isnan() and s2[0].isfinite()


@pytest.mark.interpreter
def test_quantize_tensor_nan_and_inf():
    """A NaN anywhere makes the per-tensor scale NaN (every q NaN); an inf makes it inf (finite x
    -> 0, inf / inf -> NaN), as the reference's formula does."""
    x = torch.randn(40, 1100)
    x[37, 1050] = float("nan")
    q, s = _quantize(x, "tensor")
    assert s.isnan().all() and q.float().isnan().all()
    x[37, 1050] = float("inf")
    q, s = _quantize(x, "tensor")
    rq, rs = _quantize_ref(x, "tensor")
    assert torch.equal(s, rs.reshape(1)) and s.isinf().all()
    assert _same_e4m3(q, rq)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "granularity,block", [("tensor", None), ("token", None), ("block", (128, 128))]
)
def test_quantize_static_scale_saturates(granularity, block):
    """A given scale is applied, not computed; values beyond 448 * scale saturate to +-448."""
    gen = _gen(3)
    x = torch.randn(130 if granularity == "block" else 20, 260, generator=gen) * 100
    if granularity == "tensor":
        scale = torch.tensor([0.05])
    elif granularity == "token":
        scale = torch.rand(20, 1, generator=gen) * 0.1 + 0.01
    else:
        scale = torch.rand(2, 3, generator=gen) * 0.1 + 0.01
    q, s = _quantize(x, granularity, scale=scale, block_size=block)
    rq, _ = _quantize_ref(x, granularity, scale=scale, block_size=block)
    assert s is not scale and torch.equal(s, scale.reshape(s.shape))  # a copy
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert (q.float().abs() == 448.0).any()


@pytest.mark.interpreter
def test_quantize_strided_and_empty():
    gen = _gen(4)
    x = torch.randn(9, 2 * 144, generator=gen).half()[:, ::2]
    assert not x.is_contiguous()
    q, s = _quantize(x, "token")
    rq, rs = _quantize_ref(x, "token")
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    q, s = _quantize(torch.randn(0, 64), "token")
    assert q.shape == (0, 64) and s.shape == (0, 1)
    q, s = _quantize(torch.zeros(4, 64), "tensor")
    assert torch.equal(s, torch.full((1,), MIN_SCALE)) and not q.float().any()
    q, s = _quantize(torch.randn(3, 0), "token")
    assert q.shape == (3, 0) and torch.equal(s, torch.full((3, 1), MIN_SCALE))


# ------------------------------------------------------------------------------------------
# fp8_gemm
# ------------------------------------------------------------------------------------------


def _gemm_ref64(a, b, sa, sb, bias):
    return reference.fp8_gemm(a, b, sa, sb, bias, out_dtype=torch.float64)


def _scales(layout, M, N, K, gen):
    kb = -(-K // 128)
    if layout == "tensor":
        return torch.rand(1, generator=gen) + 0.5, torch.rand((), generator=gen) + 0.5
    if layout == "row":
        return torch.rand(M, 1, generator=gen) + 0.5, torch.rand(N, 1, generator=gen) + 0.5
    return torch.rand(M, kb, generator=gen) + 0.5, torch.rand(-(-N // 128), kb, generator=gen) + 0.5


GEMM_SHAPES = [(1, 7, 64), (7, 65, 200), (33, 130, 300)]


@pytest.mark.interpreter
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["tensor", "row", "block"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_gemm_matches_reference(shape, layout, out_dtype):
    from bitpress.triton_kernels.fp8_gemm import fp8_gemm

    M, N, K = shape
    gen = _gen(5)
    a, b = _e4m3((M, K), gen), _e4m3((N, K), gen)
    sa, sb = _scales(layout, M, N, K, gen)
    bias = torch.randn(N, generator=gen).to(out_dtype)
    out = fp8_gemm(a, b, sa, sb, bias, out_dtype)
    assert out.shape == (M, N) and out.dtype == out_dtype
    want, tol = _expect(_gemm_ref64(a, b, sa, sb, bias), out_dtype)
    assert rel_err(out, want) <= tol, rel_err(out, want)
    if layout != "block" and out_dtype == torch.float32:
        # torch._scaled_mm (CPU), within fp32 summation-order differences.
        sm = torch._scaled_mm(
            a,
            b.t(),
            sa.reshape(-1, 1) if layout == "row" else sa.reshape(()),
            sb.reshape(1, -1) if layout == "row" else sb.reshape(()),
            bias=bias,
            out_dtype=torch.float32,
        )
        assert rel_err(out, sm) <= 1e-6


@pytest.mark.interpreter
def test_gemm_mixed_row_and_tensor_scales():
    """One side per tensor, the other per row (both ways), and [1] with [] single scales."""
    from bitpress.triton_kernels.fp8_gemm import fp8_gemm

    M, N, K = 9, 70, 150
    gen = _gen(12)
    a, b = _e4m3((M, K), gen), _e4m3((N, K), gen)
    for sa, sb in [
        (torch.rand(M, 1, generator=gen) + 0.5, torch.tensor([1.5])),
        (torch.tensor(0.75), torch.rand(N, 1, generator=gen) + 0.5),
        (torch.tensor([0.5]), torch.tensor(2.0)),
    ]:
        out = fp8_gemm(a, b, sa, sb, None, torch.float32)
        assert rel_err(out, _gemm_ref64(a, b, sa, sb, None)) <= 1e-6


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32},  # 4 promotions per scale block
        {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2},
    ],
    ids=["bk32", "bk64-group2"],
)
def test_gemm_block_k_below_128(config):
    from bitpress.triton_kernels.fp8_gemm import fp8_gemm

    M, N, K = 40, 150, 330
    gen = _gen(6)
    a, b = _e4m3((M, K), gen), _e4m3((N, K), gen)
    sa, sb = _scales("block", M, N, K, gen)
    out = fp8_gemm(a, b, sa, sb, None, torch.float32, config=config)
    assert rel_err(out, _gemm_ref64(a, b, sa, sb, None)) <= 1e-6
    with pytest.raises(ValueError, match="BLOCK_K=48 must divide 128"):
        fp8_gemm(a, b, sa, sb, config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 48})


@pytest.mark.interpreter
def test_gemm_strided_operands_and_edge_sizes():
    """Operands whose rows are slices of wider rows; K-strided operands are copied K-contiguous
    by the launcher; M = 0 and K = 0."""
    from bitpress.triton_kernels.fp8_gemm import fp8_gemm

    gen = _gen(7)
    M, N, K = 9, 20, 96
    abuf, bbuf = _e4m3((M, K + 32), gen), _e4m3((N, 2 * K), gen)
    a, b = abuf[:, :K], bbuf[:, ::2]
    sa, sb = _scales("row", M, N, K, gen)
    out = fp8_gemm(a, b, sa, sb, None, torch.float32)
    assert rel_err(out, _gemm_ref64(a, b, sa, sb, None)) <= 1e-6
    e = fp8_gemm(a[:0], b, sa[:0], sb, None, torch.float16)
    assert e.shape == (0, N) and e.dtype == torch.float16
    bias = torch.randn(N, generator=gen)
    z = fp8_gemm(a[:, :0], b[:, :0], sa, sb, bias, torch.float32)
    assert torch.equal(z, bias.expand(M, N))


# ------------------------------------------------------------------------------------------
# fp8_weight_gemm
# ------------------------------------------------------------------------------------------


def _weight_gemm_ref64(x, w, s, bias):
    return reference.fp8_weight_gemm(x.double(), w, s, bias)


def _weight_gemm(*args, **kw):
    from bitpress.triton_kernels.fp8_weight_gemm import fp8_weight_gemm

    return fp8_weight_gemm(*args, **kw)


@pytest.mark.interpreter
def test_weight_decode_exact():
    """Every one of the 256 E4M3 codes decodes exactly (x = 1, K = 1, scale 1): zeros,
    subnormals, 448, and NaN for 0x7F / 0xFF (the sign of -0 does not survive the fp32
    accumulation that starts at +0)."""
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3)
    for dtype in OUT_DTYPES:
        y = _weight_gemm(torch.ones(1, 1, dtype=dtype), codes.reshape(256, 1), torch.ones(1))
        want = codes.float()
        assert torch.equal(y[0].float().isnan(), want.isnan())
        fin = ~want.isnan()
        assert torch.equal(y[0].float()[fin], want[fin])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["tensor", "channel", "block"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_weight_gemm_matches_reference(shape, layout, dtype):
    M, N, K = shape
    gen = _gen(8)
    w = _e4m3((N, K), gen)
    if layout == "tensor":
        s = torch.rand(1, generator=gen) + 0.5
    elif layout == "channel":
        s = torch.rand(N, 1, generator=gen) + 0.5
    else:
        s = torch.rand(-(-N // 128), -(-K // 128), generator=gen) + 0.5
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    out = _weight_gemm(x, w, s, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    want, tol = _expect(_weight_gemm_ref64(x, w, s, bias), dtype)
    assert rel_err(out, want) <= tol, rel_err(out, want)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128},
        {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32},
    ],
    ids=["bk128", "bk32"],
)
def test_weight_gemm_3d_strided(config):
    """x [2, 3, K] with element stride 2, w a column slice of a wider weight, block scales and
    a bias of another dtype."""
    gen = _gen(9)
    N, K = 140, 260
    wbuf = _e4m3((N, K + 16), gen)
    w = wbuf[:, :K]
    s = torch.rand(2, 3, generator=gen) + 0.5
    x = torch.randn(2, 3, 2 * K, generator=gen).half()[..., ::2]
    bias = torch.randn(N, generator=gen)
    out = _weight_gemm(x, w, s, bias, config=config)
    assert out.shape == (2, 3, N)
    assert rel_err(out, _weight_gemm_ref64(x, w, s, bias)) <= TOL[torch.float16]


# ------------------------------------------------------------------------------------------
# Ops: the triton backend through bitpress.ops, opcheck, torch.compile, bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.interpreter
def test_ops_triton_backend():
    gen = _gen(13)
    x = torch.randn(2, 5, 200, generator=gen).bfloat16()
    q, s = ops.fp8_quantize(x, granularity="block", backend="triton")
    rq, rs = reference.fp8_quantize(x, "block")
    assert s.shape == (2, 5, 2) and torch.equal(s, rs) and _same_e4m3(q, rq)
    w = _e4m3((70, 200), gen)
    ws = torch.rand(1, 2, generator=gen) + 0.5
    y = ops.fp8_gemm(q.reshape(10, 200), w, s.reshape(10, 2), ws, backend="triton")
    assert y.dtype == torch.bfloat16 and y.shape == (10, 70)
    want, tol = _expect(_gemm_ref64(q.reshape(10, 200), w, s.reshape(10, 2), ws, None), y.dtype)
    assert rel_err(y, want) <= tol
    yw = ops.fp8_weight_gemm(x.half(), w, ws, backend="triton")
    assert rel_err(yw, _weight_gemm_ref64(x.half(), w, ws, None)) <= TOL[torch.float16]


# opcheck's test_schema runs the op under SchemaCheckMode, which compares every tensor an aten op
# inside touches before and after with a multiply that torch does not implement for
# float8_e4m3fn on the CPU; a Python custom op calls aten ops on its E4M3 tensors (views, the
# interpreter's copies), so that one test cannot run here. The others do.
_OPCHECK_TESTS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


@pytest.mark.interpreter
def test_opcheck_triton_ops():
    gen = _gen(14)
    x = torch.randn(3, 160, generator=gen).half()
    quantize = torch.ops.bitpress.fp8_quantize_triton.default
    for args in ((x, "token"), (x.float(), "block", None, [1, 128])):
        torch.library.opcheck(quantize, args, test_utils=_OPCHECK_TESTS)
    a, b = _e4m3((3, 160), gen), _e4m3((24, 160), gen)
    sa, sb = _scales("block", 3, 24, 160, gen)
    bias = torch.randn(24, generator=gen).half()
    torch.library.opcheck(
        torch.ops.bitpress.fp8_gemm_triton.default,
        (a, b, sa, sb, bias, torch.float16),
        test_utils=_OPCHECK_TESTS,
    )
    ws = torch.rand(24, 1, generator=gen)
    torch.library.opcheck(
        torch.ops.bitpress.fp8_weight_gemm_triton.default,
        (x, b, ws, bias),
        test_utils=_OPCHECK_TESTS,
    )


@pytest.mark.interpreter
def test_torch_compile_fullgraph():
    gen = _gen(15)
    w = _e4m3((24, 64), gen)
    ws = torch.rand(24, 1, generator=gen) + 0.5
    x = torch.randn(5, 64, generator=gen)

    def f(x):
        q, s = ops.fp8_quantize(x, granularity="token", backend="triton")
        y = ops.fp8_gemm(q, w, s, ws, out_dtype=torch.float32, backend="triton")
        return y + ops.fp8_weight_gemm(x, w, ws, backend="triton")

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, f(x))


@pytest.mark.interpreter
def test_bad_inputs():
    gen = _gen(16)
    a, b = _e4m3((3, 64), gen), _e4m3((8, 64), gen)
    one = torch.ones(1)
    with pytest.raises(Exception, match=r"^fp8_gemm: scale_a"):
        ops.fp8_gemm(a, b, torch.ones(2, 1), one, backend="triton")
    with pytest.raises(Exception, match=r"^fp8_gemm: b"):
        ops.fp8_gemm(a, b.float(), one, one, backend="triton")
    with pytest.raises(Exception, match=r"^fp8_weight_gemm: w_scale"):
        ops.fp8_weight_gemm(torch.randn(2, 64), b, torch.ones(3, 1), backend="triton")
    with pytest.raises(Exception, match=r"^fp8_quantize: granularity"):
        ops.fp8_quantize(torch.randn(2, 64), granularity="row", backend="triton")
    with pytest.raises(Exception, match=r"^fp8_quantize: scale"):
        ops.fp8_quantize(
            torch.randn(2, 64), granularity="token", scale=torch.ones(3, 1), backend="triton"
        )


# ------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 / sm_89 / sm_90
# ------------------------------------------------------------------------------------------

# Compiles in a fresh process (the interpreter patches triton.language in this one), with
# tt.divisibility = 16 on the pointers, row strides and K, as the JIT specializes them for
# aligned tensors: without it the loads are byte-wise and the register counts meaningless.
_AOT_SCRIPT = r"""
import base64, importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bitpress.triton_kernels._runtime import jit_function
jobs = json.load(open(sys.argv[1]))
out = []
for j in jobs:
    fn = jit_function(getattr(importlib.import_module(j["module"]), j["name"]))
    sig = dict(j["signature"])
    sig.update(dict.fromkeys(j["constexprs"], "constexpr"))
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in j["div16"]}
    src = ASTSource(fn=fn, signature=sig, constexprs=j["constexprs"], attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", j["arch"], 32),
                       options={"num_warps": j["num_warps"], "num_stages": j["num_stages"]})
    out.append({"name": c.metadata.name, "ptx": c.asm["ptx"],
                "cubin": base64.b64encode(c.asm["cubin"]).decode(),
                "spills": int(getattr(c.metadata, "n_spills", 0) or 0)})
json.dump(out, open(sys.argv[1], "w"))
"""


def _aot(jobs):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "jobs.json")
        with open(path, "w") as f:
            json.dump(jobs, f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        res = subprocess.run(
            [sys.executable, "-c", _AOT_SCRIPT, path],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stderr[-4000:]
        with open(path) as f:
            outs = json.load(f)
    return [
        _triton_asm(o["name"], o["ptx"], base64.b64decode(o["cubin"]), o["spills"]) for o in outs
    ]


def _job(module, name, sig, cx, arch, warps, stages, div):
    return dict(
        module=f"bitpress.triton_kernels.{module}",
        name=name,
        signature=sig,
        constexprs=cx,
        arch=arch,
        num_warps=warps,
        num_stages=stages,
        div16=div,
    )


def _gemm_job(arch, scale, cfg, warps, stages, out="bf16"):
    sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "sb_ptr": "*fp32"}
    sig.update({"bias_ptr": f"*{out}", "out_ptr": f"*{out}"})
    names = ["M", "N", "K", "M_BUCKET", "stride_am", "stride_bn", "stride_sam", "stride_sak"]
    names += ["stride_sbn", "stride_sbk", "stride_om"]
    sig.update(dict.fromkeys(names, "i32"))
    div = ["a_ptr", "b_ptr", "out_ptr", "stride_am", "stride_bn", "stride_om", "K"]
    cx = {"SCALE": scale, "HAS_BIAS": True, "GROUP_M": 8, **cfg}
    return _job("fp8_gemm", "fp8_gemm_kernel", sig, cx, arch, warps, stages, div)


def _weight_job(arch, scale, cfg, warps, stages, x="bf16"):
    sig = {"x_ptr": f"*{x}", "w_ptr": "*u8", "s_ptr": "*fp32", "bias_ptr": f"*{x}"}
    sig["out_ptr"] = f"*{x}"
    names = ["M", "N", "K", "M_BUCKET", "stride_xm", "stride_wn", "stride_sn", "stride_sk"]
    sig.update(dict.fromkeys([*names, "stride_om"], "i32"))
    div = ["x_ptr", "w_ptr", "out_ptr", "stride_xm", "stride_wn", "stride_om", "K"]
    cx = {"SCALE": scale, "HAS_BIAS": True, "DOT_F32": False, "GROUP_M": 8, **cfg}
    return _job("fp8_weight_gemm", "fp8_weight_gemm_kernel", sig, cx, arch, warps, stages, div)


def _quantize_job(arch, blocks, tile):
    """``blocks``: fp8_quantize_blocks_kernel with (GR, PBR, GC, PBC) = tile; else
    fp8_quantize_kernel with (TILE_R, TILE_C) = tile."""
    sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "scale_ptr": "*fp32"}
    names = ["R", "C", "BR", "BC", *(["NBR", "NBC"] if blocks else [])]
    names += ["stride_xr", "stride_qr", "stride_sr", "stride_sc"]
    sig.update(dict.fromkeys(names, "i32"))
    cx = {"MODE": 0, "MIN": MIN_SCALE}
    if blocks:
        cx.update(zip(("GR", "PBR", "GC", "PBC"), tile, strict=True))
    else:
        cx.update(TILE_R=tile[0], TILE_C=tile[1])
    div = ["x_ptr", "q_ptr", "stride_xr", "stride_qr"]
    name = "fp8_quantize_blocks_kernel" if blocks else "fp8_quantize_kernel"
    return _job("fp8_quantize", name, sig, cx, arch, 4, 3, div)


def _no_spills(asm):
    assert asm.spills == 0 and not any(i.startswith(("LDL", "STL")) for i in asm.sass)
    assert asm.resources is not None and asm.resources.local == 0 and asm.resources.stack == 0


_BIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
def test_compiled_instructions():
    """fp8_gemm: wgmma on E4M3 (QGMMA) on sm_90 with the partial sum added to an fp32 register
    accumulator every BLOCK_K = 128 (FADD / FFMA per accumulator element in the loop: the
    promotion), mma.sync m16n8k32 E4M3 (QMMA) on sm_89. fp8_weight_gemm on sm_80: mma.sync
    m16n8k16 bf16 / fp16 (HMMA.16816) after an integer decode (no fp8 conversion instruction, no
    I2F). fp8_quantize on sm_80 / sm_90: IEEE division, byte stores, no fp8 conversion. Nothing
    spills."""
    jobs = [
        _gemm_job(90, 0, _BIG, 8, 3),
        _gemm_job(90, 2, _BIG, 8, 3),
        _gemm_job(89, 1, _BIG, 8, 3, out="fp16"),
        _weight_job(80, 2, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 3),
        _weight_job(80, 1, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, 4, 4, x="fp16"),
        _weight_job(90, 0, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 3),
        _quantize_job(80, True, (2, 4, 64, 8)),
        _quantize_job(90, True, (8, 1, 1, 512)),
        _quantize_job(80, False, (32, 128)),
    ]
    asms = _aot(jobs)
    for job, asm in zip(jobs, asms, strict=True):
        _no_spills(asm)
        counts = collections.Counter(asm.sass)
        arch, name = job["arch"], job["name"]
        if name == "fp8_gemm_kernel" and arch == 90:
            assert re.search(
                r"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.f32\.e4m3\.e4m3", asm.ptx
            )
            assert any(i.startswith("QGMMA.64") for i in counts), sorted(counts)
            # 8 warps, 128 x 128: 64 accumulator elements per thread, each promoted per step.
            promote = "FFMA" if job["constexprs"]["SCALE"] == 2 else "FADD"
            assert counts[promote] >= 64, counts[promote]
            assert not any(i.startswith("STS.U8") for i in counts)  # B needs no transpose
        elif name == "fp8_gemm_kernel":
            assert "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32" in asm.ptx
            assert counts["QMMA.16832.F32.E4M3.E4M3"] > 0, sorted(counts)
        elif name == "fp8_weight_gemm_kernel" and arch == 80:
            ty = "f16" if job["signature"]["x_ptr"] == "*fp16" else "bf16"
            assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32" in asm.ptx
            want = "HMMA.16816.F32" + (".BF16" if ty == "bf16" else "")
            assert counts[want] > 0, sorted(counts)
            # (I2F.RP is the reciprocal of the integer divisions of the program-id swizzle.)
            assert not re.search(r"cvt\.[\w.]*e4m3", asm.ptx)
            assert not any(i.startswith("I2F") and i != "I2F.RP" for i in counts), sorted(counts)
        elif name == "fp8_weight_gemm_kernel":
            assert re.search(
                r"wgmma\.mma_async\.sync\.aligned\.m64n128k16\.f32\.bf16\.bf16", asm.ptx
            )
        else:
            assert "div.rn.f32" in asm.ptx and not re.search(r"cvt\.[\w.]*e4m3", asm.ptx)
            assert counts["STG.E.U8"] > 0, sorted(counts)


@pytest.mark.slow
@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
def test_every_autotune_config_compiles_without_spills():
    """fp8_gemm's configs on sm_90 (BLOCK scales: two accumulators) and fp8_weight_gemm's on
    sm_80 (BLOCK scales, bf16)."""
    from bitpress.triton_kernels import fp8_gemm as g
    from bitpress.triton_kernels import fp8_weight_gemm as w

    jobs = [_gemm_job(90, 2, c.kwargs, c.num_warps, c.num_stages) for c in g._CONFIGS]
    jobs += [_weight_job(80, 2, c.kwargs, c.num_warps, c.num_stages) for c in w._CONFIGS]
    for job, asm in zip(jobs, _aot(jobs), strict=True):
        try:
            _no_spills(asm)
        except AssertionError:
            raise AssertionError(f"{job['name']} {job['constexprs']} spills") from None


def test_autotune_pruning():
    from bitpress.triton_kernels import fp8_gemm as g
    from bitpress.triton_kernels import fp8_weight_gemm as w

    for mb in (1, 16, 64, 4096):
        kept = g._prune(g._CONFIGS, {"M_BUCKET": mb})
        assert kept and all(c.kwargs["BLOCK_M"] <= max(mb, 16) for c in kept)
        assert all(128 % c.kwargs["BLOCK_K"] == 0 for c in kept)
        for dtype in OUT_DTYPES:
            kept = w._prune(w._CONFIGS, {"M_BUCKET": mb, "x_ptr": torch.empty(0, dtype=dtype)})
            assert kept and all(128 % c.kwargs["BLOCK_K"] == 0 for c in kept)
            if dtype == torch.float32:
                for c in kept:
                    prod = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]
                    assert prod <= 512 * 32 * c.num_warps


_INTERPRETED_IMPORT_SCRIPT = r"""
import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
from bitpress.triton_kernels import _runtime, fp8_gemm, fp8_quantize, fp8_weight_gemm

cuda = torch.device("cuda")
assert type(fp8_gemm.fp8_gemm_kernel) is InterpretedFunction
kernels = (fp8_gemm.fp8_gemm_kernel, fp8_weight_gemm.fp8_weight_gemm_kernel,
           fp8_quantize.fp8_quantize_kernel, fp8_quantize.fp8_quantize_blocks_kernel,
           fp8_quantize.fp8_amax_kernel,
           fp8_quantize.fp8_tensor_scale_kernel)
for k in kernels:
    assert type(_runtime.for_device(k, cuda)) is JITFunction
for t in (fp8_gemm.fp8_gemm_autotuned, fp8_weight_gemm.fp8_weight_gemm_autotuned):
    a = _runtime.for_device(t, cuda)
    assert isinstance(a, Autotuner) and type(a.fn) is JITFunction
helpers = (fp8_weight_gemm.e4m3_to_f32, fp8_quantize.f32_to_e4m3, fp8_quantize._scale_of,
           fp8_quantize._abs_bits, fp8_quantize._quantize_tile)
assert all(type(h) is JITFunction for h in helpers)
print("ok")
"""


def test_cuda_launch_after_interpreted_import_is_compiled():
    """Imported under TRITON_INTERPRET=1 (triton decides at decoration time), the kernels,
    autotuners and helpers still give compiled JITFunctions for CUDA launches."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_IMPORT_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["tensor", "row", "block"])
@pytest.mark.parametrize("M", [1, 16, 512])
def test_gpu_fp8_gemm(M, layout):
    from bitpress.triton_kernels.fp8_gemm import fp8_gemm

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 tensor cores need sm_89+")
    N, K = 4096, 4096
    gen = _gen(10)
    a, b = _e4m3((M, K), gen), _e4m3((N, K), gen)
    sa, sb = _scales(layout, M, N, K, gen)
    bias = torch.randn(N, generator=gen).bfloat16()
    out = fp8_gemm(*(t.cuda() for t in (a, b, sa, sb, bias)), torch.bfloat16)
    assert rel_err(out.cpu(), _gemm_ref64(a, b, sa, sb, bias)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["tensor", "channel", "block"])
def test_gpu_fp8_weight_gemm(dtype, layout):
    M, N, K = 17, 333, 1000
    gen = _gen(11)
    w = _e4m3((N, K), gen)
    s = {
        "tensor": torch.rand(1, generator=gen),
        "channel": torch.rand(N, 1, generator=gen),
        "block": torch.rand(3, 8, generator=gen),
    }[layout] + 0.5
    x = torch.randn(M, K, generator=gen).to(dtype)
    out = _weight_gemm(x.cuda(), w.cuda(), s.cuda())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(out.cpu(), _weight_gemm_ref64(x, w, s, None)) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "token", "block"])
def test_gpu_fp8_quantize_bit_exact(granularity):
    gen = _gen(12)
    x = (torch.randn(333, 1000, generator=gen) * 5).bfloat16()
    q, s = _quantize(x.cuda(), granularity)
    rq, rs = _quantize_ref(x, granularity)
    assert torch.equal(s.cpu().reshape(rs.shape), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
