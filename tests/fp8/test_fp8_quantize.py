"""fp8_quantize: the E4M3 rule (round to nearest even, saturation, NaN) against torch's cast, every
granularity, dtype and odd shape against the reference bit for bit, static scales, the scale of
an all-zero set, non-contiguous inputs, opcheck, torch.compile, and bad input."""

from __future__ import annotations

import pytest
import torch
from fp8_data import DTYPES, cpu_isa  # noqa: F401 (fixture)

from bitpress import ops
from bitpress.fp8 import reference
from bitpress.fp8.reference import E4M3, FP8_MIN_SCALE

OP = "fp8_quantize"


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _special_floats() -> torch.Tensor:
    """Values at every rounding boundary of E4M3 (midpoints and their neighbours), the
    saturation edge (448, 464, 480, ...), subnormals, zeros of both signs, inf and NaN."""
    codes = torch.arange(0, 0x7F, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
    mids = (codes[1:] + codes[:-1]) / 2
    near = torch.cat([mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(0.0))])
    extra = torch.tensor(
        [0.0, -0.0, 448.0, 449.0, 463.99, 464.0, 464.01, 470.0, 479.9, 480.0, 500.0, 1e6, 3e38,
         float("inf"), float("nan"), 2.0**-9, 2.0**-10, 2.0**-10 * 1.0001, 1e-30, 1e-45, 2.0**-6,
         2.0**-6 * (1 - 2**-5)]
    )  # fmt: skip
    v = torch.cat([codes, near, extra, torch.randn(4000) * 100, torch.randn(1000) * 0.01])
    return torch.cat([v, -v])


def test_e4m3_rule_matches_torch(backend_device):
    """q = x.clamp(-448, 448).to(float8_e4m3fn) bit for bit (scale 1: x / 1 == x)."""
    be, dev = backend_device
    x = _special_floats()
    q, s = ops.fp8_quantize(x.to(dev), granularity="tensor", scale=torch.ones(1, device=dev),
                            backend=be)  # fmt: skip
    expect = x.clamp(-448, 448).to(E4M3)
    assert torch.equal(_bits(q.cpu()), _bits(expect))
    assert s.dtype == torch.float32 and s.shape == (1,) and float(s) == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_e4m3_rule_every_dtype(backend_device, dtype):
    """Every 16-bit input value (fp16 / bf16: all 65536 patterns) and random float32."""
    be, dev = backend_device
    if dtype == torch.float32:
        x = torch.randn(1 << 16) * torch.exp2(torch.randint(-20, 12, (1 << 16,)).float())
    else:
        x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    q, _ = ops.fp8_quantize(x.to(dev), granularity="tensor", scale=torch.ones((), device=dev),
                            backend=be)  # fmt: skip
    expect = x.float().clamp(-448, 448).to(E4M3)
    assert torch.equal(_bits(q.cpu()), _bits(expect))


@pytest.mark.parametrize("granularity", ["tensor", "token", "block"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_isa_paths_bit_for_bit(cpu_isa, dtype, granularity):  # noqa: F811
    """The CPU kernel's scalar and AVX-512 paths (16 lanes, masked tails): the E4M3 rule on every
    special value and every 16-bit pattern, and dynamic scales (amax with NaN and inf present)
    on ragged rows, bit for bit against the reference."""
    if dtype == torch.float32:
        x = torch.cat([_special_floats(), torch.randn(3001)])
    else:
        x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        x = x.float()
    q, _ = ops.fp8_quantize(x.to(dtype), granularity="tensor", scale=torch.ones(1), backend="cpu")
    assert torch.equal(_bits(q), _bits(x.to(dtype).float().clamp(-448, 448).to(E4M3))), cpu_isa
    y = (torch.randn(37, 203) * torch.exp2(torch.randint(-12, 9, (37, 1)).float())).to(dtype)
    y[3, 100] = float("nan")
    y[5, 7] = float("inf")
    y[6] = 0.0
    kw = {"block_size": (1, 64)} if granularity == "block" else {}
    q, s = ops.fp8_quantize(y, granularity=granularity, backend="cpu", **kw)
    rq, rs = reference.fp8_quantize(y, granularity=granularity, **kw)
    assert torch.equal(s, rs) or torch.allclose(s, rs, equal_nan=True, rtol=0, atol=0), cpu_isa
    assert torch.equal(_bits(q), _bits(rq)), cpu_isa


SHAPES = {
    "tensor": [(1, 1), (7, 300), (33, 4096), (3, 5, 17), (0, 5), (4, 0)],
    "token": [(1, 1), (7, 300), (33, 4096), (3, 5, 17), (129,), (0, 5), (4, 0)],
    "channel": [(1, 1), (129, 257), (33, 4096), (0, 8)],
    "block": [(1, 1), (7, 300), (5, 1000), (3, 5, 129), (0, 5), (4, 0)],
}
CASES = [(g, s) for g, shapes in SHAPES.items() for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity,shape", CASES)
def test_matches_reference(backend_device, granularity, shape, dtype):
    be, dev = backend_device
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 50).to(dtype)
    q, s = ops.fp8_quantize(x.to(dev), granularity=granularity, backend=be)
    rq, rs = reference.fp8_quantize(x, granularity)
    assert q.dtype == E4M3 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == rs.shape
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(_bits(q.cpu()), _bits(rq))
    if x.numel() and granularity != "tensor":
        # the largest magnitude of each set maps to +-448 (amax / (amax / 448) rounds to 448).
        amax_code = _bits(q.cpu()).reshape(-1, shape[-1])[:, :] & 0x7F
        assert int(amax_code.max()) == 0x7E


@pytest.mark.parametrize("block_size", [(128, 128), (1, 128), (1, 16), (3, 8), (300, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_blocks(backend_device, block_size, dtype):
    be, dev = backend_device
    x = (torch.randn(260, 300) * 10).to(dtype)
    x[:128, :128] *= 1000  # one block with large values, saturating nothing
    q, s = ops.fp8_quantize(x.to(dev), granularity="block", block_size=block_size, backend=be)
    rq, rs = reference.fp8_quantize(x, "block", None, block_size)
    bm, bk = block_size
    assert s.shape == (-(-260 // bm), -(-300 // bk))
    assert torch.equal(s.cpu(), rs) and torch.equal(_bits(q.cpu()), _bits(rq))


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel", "block"])
def test_static_scale(backend_device, granularity):
    be, dev = backend_device
    x = torch.randn(9, 260) * 100
    _, s = reference.fp8_quantize(x, granularity)
    s = s * torch.rand(s.shape) * 0.5  # smaller than needed: saturation happens
    q, s_out = ops.fp8_quantize(x.to(dev), granularity=granularity, scale=s.to(dev), backend=be)
    rq, _ = reference.fp8_quantize(x, granularity, s)
    assert torch.equal(s_out.cpu(), s) and torch.equal(_bits(q.cpu()), _bits(rq))
    assert (_bits(q.cpu()) & 0x7F).max() == 0x7E
    if dev.type == "cpu" and be != "reference":
        assert s_out.data_ptr() != s.data_ptr()  # a fresh output, not an alias of the input


def test_zero_and_nonfinite_sets(backend_device):
    be, dev = backend_device
    x = torch.randn(5, 40)
    x[0] = 0
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3] = 1e-44  # amax / 448 underflows to 0 in float32: the floor applies
    q, s = ops.fp8_quantize(x.to(dev), granularity="token", backend=be)
    s, q = s.cpu(), q.cpu()
    assert float(s[0]) == FP8_MIN_SCALE and (q[0].float() == 0).all()
    assert float(s[3]) == FP8_MIN_SCALE and torch.isfinite(q[3].float()).all()
    assert torch.isnan(s[1]).all() and torch.isnan(q[1].float()).all()
    assert float(s[2]) == float("inf")
    rq, rs = reference.fp8_quantize(x, "token")
    assert torch.equal(_bits(q), _bits(rq))
    assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s[~s.isnan()], rs[~rs.isnan()])
    q, s = ops.fp8_quantize(torch.zeros(3, 8, device=dev), granularity="tensor", backend=be)
    assert float(s) == FP8_MIN_SCALE and torch.isfinite(s).all()


def test_non_contiguous(backend_device):
    be, dev = backend_device
    base = torch.randn(40, 300) * 7
    for x in (base.t(), base[::3, 5:200], base[:, ::2], base[:1].expand(6, 300)):
        for g in ("tensor", "token", "block"):
            q, s = ops.fp8_quantize(x.to(dev), granularity=g, backend=be)
            rq, rs = reference.fp8_quantize(x.contiguous(), g)
            assert torch.equal(_bits(q.cpu()), _bits(rq)) and torch.equal(s.cpu(), rs), g


def test_opcheck():
    x = torch.randn(7, 300, dtype=torch.bfloat16)
    for args in (
        (x, "token", None, None),
        (x, "tensor", None, None),
        (x, "block", None, [1, 128]),
        (x[:, :256].float(), "block", None, [128, 128]),
        (x.float(), "channel", torch.rand(7, 1) + 0.1, None),
    ):
        torch.library.opcheck(torch.ops.bitpress.fp8_quantize.default, args)


def test_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        q, s = ops.fp8_quantize(x, granularity="token")
        return q.float() * s

    x = torch.randn(5, 200)
    rq, rs = reference.fp8_quantize(x, "token")
    assert torch.equal(f(x), rq.float() * rs)


BAD = [
    # (what, kwargs, exception, the argument the message names)
    ("x dtype", dict(x=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "x"),
    ("x 0-D", dict(x=torch.tensor(1.0)), RuntimeError, "x"),
    ("granularity", dict(granularity="row"), RuntimeError, "granularity"),
    ("block_size without block", dict(block_size=(1, 128)), RuntimeError, "block_size"),
    ("block_size", dict(granularity="block", block_size=(0, 128)), RuntimeError, "block_size"),
    ("block_size rank", dict(granularity="block", block_size=(1, 2, 3)), RuntimeError,
     "block_size"),
    ("channel 3-D", dict(x=torch.zeros(2, 3, 4), granularity="channel"), RuntimeError, "x"),
    ("block rows 3-D", dict(x=torch.zeros(2, 3, 4), granularity="block", block_size=(2, 2)),
     RuntimeError, "x"),
    ("scale dtype", dict(scale=torch.ones(3, 1, dtype=torch.float16)), TypeError, "scale"),
    ("scale shape", dict(scale=torch.ones(3)), RuntimeError, "scale"),
    ("tensor scale shape", dict(granularity="tensor", scale=torch.ones(2)), RuntimeError, "scale"),
    ("block scale shape", dict(granularity="block", scale=torch.ones(3, 2)), RuntimeError,
     "scale"),
    ("scale device", dict(scale=torch.ones(3, 1, device="meta")), RuntimeError, "scale"),
]  # fmt: skip


@pytest.mark.parametrize("what,kw,exc,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(backend_device, what, kw, exc, arg):
    be, dev = backend_device
    a = dict(x=torch.zeros(3, 4), granularity="token", scale=None, block_size=None)
    a.update(kw)
    with pytest.raises(exc, match=rf"^fp8_quantize: {arg}\b"):
        ops.fp8_quantize(
            a["x"], granularity=a["granularity"], scale=a["scale"], block_size=a["block_size"],
            backend=be,
        )  # fmt: skip
