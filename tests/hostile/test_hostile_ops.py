"""The hostile-input suite of the ops: every registered op (``bitpress._core.registry.ops()``,
no list here) on every backend this machine runs (the ``backend_matrix`` params: cpu, reference,
triton under the interpreter with small cases, and cuda / triton on a GPU), plus the op's fake
under ``FakeTensorMode``, driven by hypothesis from the op's :class:`HostileSpec`.

* **Valid inputs** (:func:`test_valid_inputs`): sizes 0, 1, primes, anything small and a few
  large ones; every option of the spec (dtypes, act-order, asymmetric zeros, bias, ragged
  batches, greedy / sampling rows, ...); int32 <-> int64 where accepted; every tensor in a drawn
  memory layout (strided, column-major, at a storage offset, expanded with stride 0 where the
  value stays valid); NaN / +-inf where the contract allows. The result must agree with the
  reference on contiguous copies: same shape and dtype, the same NaN and +-inf positions, the
  finite rest within the op's selftest tolerance (exact where it is 0, tokens exactly).
* **Invalid inputs** (:func:`test_invalid_inputs`): one corruption of a valid case: a dtype the
  op does not accept (``TypeError``), a wrong rank, a wrong size, a tensor on the meta device, a
  value out of range on the backends that check values (``RuntimeError``). The message must
  start with ``<op>: <argument>``; for a wrong size, which of two conflicting arguments is
  "wrong" is a matter of check order, so it may name the argument or one its sizes are checked
  against (``TensorArg.related``); a resize the reference accepts must give the reference's
  result. Never a crash: the compiled kernels run in-process.

A new op joins by registering a ``HostileSpec`` (``OpSpec(hostile=...)`` or
``bitpress._core.registry.register_hostile``); :func:`test_every_op_has_a_hostile_spec` fails
for an op that has none or whose spec misses a tensor argument of its schema.

Budget: the hypothesis profile (``tests/conftest.py``): ``ci`` (default, derandomized, fixed
example counts) or ``dev`` (10x, random seeds): ``HYPOTHESIS_PROFILE=dev pytest tests/hostile``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from backend_matrix import backend_device_params
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from strategies import (
    INTERPRETER_WORK,
    LAYOUTS,
    VALUE_CHECK,
    corrupt,
    generator,
    names_pattern,
    options,
    relayout,
    seeds,
    sizes,
    tensor_args,
    with_nonfinite,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import bitpress  # noqa: F401  (every op and its hostile spec register)
from bitpress import ops
from bitpress._core import registry
from bitpress.int4 import layout as int4_layout
from bitpress.int4 import reference as int4_reference
from bitpress.int4.layout import Int4CpuTiles
from bitpress.int4.quantized import QuantizedWeight
from bitpress.int4.rtn import rtn_quantize
from bitpress.testing import rel_err

OPS = list(registry.ops())


@dataclasses.dataclass
class KnownBug:
    """A library bug the suite found: the property tests reject the inputs ``matches`` (so that
    CI stays green and still covers the rest), and :func:`test_known_bug` reproduces it,
    ``xfail(strict=True)``: once fixed it XPASSes, which fails, and the entry must go."""

    op: str
    matches: Callable[[str, dict, dict, dict], bool]  # (backend, sizes, options, arguments)
    reproduce: Callable[[], None]  # raises (or asserts) while the bug is there
    reason: str


def _int4_gemm_k0(backend: str) -> None:
    """int4_gemm with K = 0 (x [3, 0], an empty weight of N = 5 columns) is y = 0 (+ bias)."""
    qw = QuantizedWeight(
        torch.zeros(0, 5, dtype=torch.uint8),
        torch.ones(0, 5, dtype=torch.float16),
        torch.full((0, 5), 8, dtype=torch.uint8),
        torch.zeros(0, dtype=torch.int32),
        8,
        True,
    )
    w = int4_layout.pack(qw, layout=Int4CpuTiles)
    x = torch.randn(3, 0)
    if backend == "reference-fn":
        got = int4_reference.int4_gemm(x, w)
    else:
        got = ops.int4_gemm(x, w, backend=backend)
    assert torch.equal(got, torch.zeros(3, 5))


def _int4_gemm_inf(backend: str) -> None:
    """An inf in x gives +-inf in the columns whose weight is nonzero at that row (IEEE)."""
    w = int4_layout.pack(rtn_quantize(torch.randn(64, 64), 32, sym=True), layout=Int4CpuTiles)
    x = torch.randn(2, 64)
    x[0, 5] = math.inf
    got = ops.int4_gemm(x, w, backend=backend)
    want = int4_reference.int4_gemm(x, w)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())


def _has_inf(t) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.device.type != "meta"
        and t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        and bool(t.isinf().any())
    )


def _int4_gemm_wide_x() -> None:
    """A weight with a perm (act-order), x with more columns than the weight's K: the cpu
    backend (and the fake) accept it and ignore the extra columns; every backend must agree."""
    qw = rtn_quantize(torch.randn(16, 32), 16, sym=True)
    qw.g_idx = qw.g_idx.flip(0).contiguous()
    w = int4_layout.pack(qw, layout=Int4CpuTiles)
    x = torch.randn(2, 34)
    cpu = ops.int4_gemm(x, w, backend="cpu")
    assert torch.allclose(ops.int4_gemm(x, w, backend="reference"), cpu, rtol=2e-5, atol=1e-5)


KNOWN_BUGS = [
    KnownBug(
        "int4_gemm",
        lambda backend, sz, opt, a: (
            a["perm"] is not None
            and isinstance(a["x"], torch.Tensor)
            and a["x"].dim() > 0
            and a["x"].shape[-1] > a["in_features"]
        ),
        _int4_gemm_wide_x,
        "int4_gemm with a perm and x.size(-1) > the weight's K: the cpu backend and the fake "
        "accept it (y ignores x's extra columns), the reference backend raises torch's unnamed "
        "RuntimeError 'mat1 and mat2 shapes cannot be multiplied' (reference.int4_gemm "
        "dequantizes [N, in_features]); one check must decide (the schema has no in_features)",
    ),
    KnownBug(
        "int4_gemm",
        lambda backend, sz, opt, a: backend == "cpu" and _has_inf(a["x"]),
        lambda: _int4_gemm_inf("cpu"),
        "int4_gemm cpu backend: an +-inf in row m of x makes every y[m, n] NaN (all dtypes, "
        "fp32 too); the reference (and IEEE) give +-inf where W[n, k] != 0, NaN only where it is "
        "0 (the kernel's zero-point factoring s*(sum x*q) - s*z*(sum x) turns inf into inf - inf)",
    ),
]
# The Triton interpreter runs slow Python per program: a quarter of the examples, small sizes.
INTERPRETER_EXAMPLES = max(4, settings().max_examples // 4)


def _params(*, interpreter: bool, fake: bool = False) -> list:
    params = []
    for op in OPS:
        for p in backend_device_params(op):
            is_interp = "interpreter" in p.id
            if is_interp == interpreter:
                params.append(pytest.param(op, p.values[0], marks=p.marks, id=f"{op}-{p.id}"))
    if fake and not interpreter:
        params += [pytest.param(op, None, id=f"{op}-fake") for op in OPS]
    return params


def _to(args: dict, device) -> dict:
    """``args`` on ``device``; a meta tensor (a corruption) stays where it is."""
    return {
        k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
        for k, v in args.items()
    }


def _contiguous(args: dict) -> dict:
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _interpreted(bd) -> bool:
    return bd is not None and bd.backend == "triton" and bd.device.type == "cpu"


def _describe(args: dict) -> str:
    parts = []
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            dt = str(v.dtype).removeprefix("torch.")
            parts.append(
                f"{k}={dt}{list(v.shape)} stride={v.stride()} off={v.storage_offset()} "
                f"{v.device.type}"
            )
        else:
            parts.append(f"{k}={v!r}")
    return "; ".join(parts)


def assert_agree(got, want, tol: float, what: str) -> None:
    """Same shape, dtype, NaN and +-inf positions; the finite rest within ``tol``."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            g = g.cpu()
            assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, w.shape)
            assert torch.equal(g, w), f"{what}: output {i} differs\ngot  {g}\nwant {w}"
        return
    got = got.cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    gf, wf = got.double(), want.double()
    for name, mask in (
        ("NaN", torch.isnan),
        ("+inf", lambda t: t == math.inf),
        ("-inf", lambda t: t == -math.inf),
    ):
        gm, wm = mask(gf), mask(wf)
        if not torch.equal(gm, wm):
            i = tuple((gm != wm).nonzero()[0].tolist())
            raise AssertionError(
                f"{what}: {name} positions differ, first at {list(i)}: got {gf[i].item()}, "
                f"want {wf[i].item()}"
            )
    fin = torch.isfinite(wf)
    g, w = gf[fin], wf[fin]
    if tol == 0:
        assert torch.equal(g, w), f"{what}: not exact, rel err {rel_err(g, w):.3g}"
    else:
        err = rel_err(g, w)
        assert err <= tol, f"{what}: rel err {err:.3g} > {tol:g}"


def _tolerance(spec, opts, bd, want) -> float:
    tol = spec.tol(opts)
    if _interpreted(bd) and not isinstance(want, tuple) and want.dtype == torch.bfloat16:
        tol = max(tol, 2.0**-7)  # the interpreter truncates fp32 -> bf16 (DESIGN.md)
    return tol


def _draw_case(spec, bd, data):
    interp = _interpreted(bd)
    sz = data.draw(sizes(spec, small_only=interp), label="sizes")
    if interp:
        assume(spec.work(sz) <= INTERPRETER_WORK)
    opts = data.draw(options(spec), label="options")
    backend = "cpu" if bd is None else bd.backend
    seed = data.draw(seeds, label="seed")
    gen = generator(seed)
    return sz, opts, gen, spec.make(sz, opts, gen, backend)


def _reject_known_bugs(spec, bd, sz, opts, args) -> None:
    backend = "cpu" if bd is None else bd.backend
    assume(not any(b.op == spec.op and b.matches(backend, sz, opts, args) for b in KNOWN_BUGS))


def _valid(op, bd, data):
    spec = registry.op(op).hostile()
    sz, opts, gen, args = _draw_case(spec, bd, data)
    for a in tensor_args(spec, args):
        t = args[a.name]
        if a.cast:
            t = t.to(data.draw(st.sampled_from(a.cast), label=f"{a.name} dtype"))
        if a.nonfinite:
            n = data.draw(st.sampled_from((0, 0, 1, 3)), label=f"{a.name} non-finite")
            t = with_nonfinite(t, a.nonfinite, gen, n)
        how = data.draw(st.sampled_from(LAYOUTS), label=f"{a.name} layout")
        args[a.name] = relayout(t, how, a)
    note(_describe(args))
    _reject_known_bugs(spec, bd, sz, opts, args)
    want = spec.reference(_contiguous(args))
    got = spec.call(bd.backend, _to(args, bd.device))
    if bd.device.type == "cuda":
        torch.cuda.synchronize()
    assert_agree(got, want, _tolerance(spec, opts, bd, want), f"{op} on {bd.backend}")


@pytest.mark.parametrize("op, bd", _params(interpreter=False))
@given(data=st.data())
def test_valid_inputs(op, bd, data):
    _valid(op, bd, data)


@pytest.mark.parametrize("op, bd", _params(interpreter=True))
@settings(max_examples=INTERPRETER_EXAMPLES)
@given(data=st.data())
def test_valid_inputs_interpreter(op, bd, data):
    _valid(op, bd, data)


def _fake_call(spec, args):
    """The op's fake (register_fake) on fake copies of ``args``: the cpu path under
    FakeTensorMode dispatches to it."""
    with FakeTensorMode() as mode:
        fake = {
            k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()
        }
        return spec.call("cpu", fake)


def _invalid(op, bd, data):
    spec = registry.op(op).hostile()
    sz, opts, gen, args = _draw_case(spec, bd, data)
    _reject_known_bugs(spec, bd, sz, opts, args)
    backend = "fake" if bd is None else bd.backend
    kinds = ["dtype", "rank", "size", "device", "value"]
    if backend not in spec.value_checks:
        kinds.remove("value")
    if backend == "fake":
        kinds.remove("device")  # a fake tensor of another device: see test_bad_inputs
    kind = data.draw(st.sampled_from(kinds), label="corruption")
    c = corrupt(spec, args, kind, data, gen)
    assume(c is not None)
    note(f"{c.describe()}\n{_describe(c.args)}")
    _reject_known_bugs(spec, bd, sz, opts, c.args)

    ref_exc = None
    # A resize, or a rank change of an argument whose contract spans ranks (a scale: one value as
    # [] or [1], or per row as [M, 1]), may stay valid: then the result must be the reference's.
    if kind in ("size", "rank"):
        try:
            spec.call("reference", c.args)
        except (RuntimeError, TypeError, ValueError) as e:
            ref_exc = e
        if ref_exc is not None and backend not in spec.value_checks:
            # A size that makes a value out of range (x shorter than perm's rows): the CPU
            # checks, the GPU documents NaN; not this backend's contract to raise.
            assume(not VALUE_CHECK.search(str(ref_exc)))
    try:
        if backend == "fake":
            if kind in ("size", "rank") and ref_exc is None:
                return  # a valid resize: the fake has nothing to compare
            if kind == "value":
                return
            got = _fake_call(spec, c.args)
        else:
            got = spec.call(backend, _to(c.args, bd.device))
            if bd.device.type == "cuda":
                torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001  (the type is the assertion)
        exc = e
    else:
        exc = None
    if kind in ("size", "rank") and ref_exc is None:
        assert exc is None, f"{op} on {backend}: the reference accepts {c.describe()}, got {exc!r}"
        want = spec.reference(_contiguous(c.args))
        assert_agree(got, want, _tolerance(spec, opts, bd, want), f"{op} on {backend}")
        return
    assert exc is not None, f"{op} on {backend}: no error for {c.describe()}"
    want_type = type(ref_exc) if ref_exc is not None else c.exc
    msg = str(exc)
    assert isinstance(exc, want_type) and not isinstance(exc, NotImplementedError), (
        f"{op} on {backend}: {c.describe()}: want {want_type.__name__}, got "
        f"{type(exc).__name__}: {msg}"
    )
    pat = names_pattern(op, c.names, anywhere=kind in ("size", "device"))
    assert pat.search(msg), (
        f"{op} on {backend}: {c.describe()}: message names none of {c.names}: {msg}"
    )


@pytest.mark.parametrize("op, bd", _params(interpreter=False, fake=True))
@given(data=st.data())
def test_invalid_inputs(op, bd, data):
    _invalid(op, bd, data)


@pytest.mark.parametrize("op, bd", _params(interpreter=True))
@settings(max_examples=INTERPRETER_EXAMPLES)
@given(data=st.data())
def test_invalid_inputs_interpreter(op, bd, data):
    _invalid(op, bd, data)


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_hostile_spec(op):
    """Every registered op registers a hostile spec naming every tensor argument of its schema
    (FP8 and 2:4 ops join the suite by registering theirs)."""
    reg = registry.op(op)
    assert reg.hostile is not None, f"{op}: no hostile spec (OpSpec(hostile=...))"
    spec = reg.hostile()
    assert spec.op == op
    schema = getattr(torch.ops.bitpress, op).default._schema
    tensors = {a.name for a in schema.arguments if "Tensor" in str(a.type)}
    assert tensors == {a.name for a in spec.args}, (op, tensors ^ {a.name for a in spec.args})
    assert {d.name for d in spec.dims} and all(isinstance(v, tuple) for v in spec.options.values())


@pytest.mark.parametrize(
    "bug",
    [
        pytest.param(b, id=f"{b.op}-{i}", marks=pytest.mark.xfail(strict=True, reason=b.reason))
        for i, b in enumerate(KNOWN_BUGS)
    ],
)
def test_known_bug(bug):
    bug.reproduce()


def test_int4_gemm_with_k_0_is_bias_or_zeros():
    """Fixed (found by this suite): K = 0 gives zeros (+ bias) on the cpu backend, and the
    reference unpacks a CPU-tile weight with K = 0."""
    _int4_gemm_k0("cpu")
    _int4_gemm_k0("reference-fn")
