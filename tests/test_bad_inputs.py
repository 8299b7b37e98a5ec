"""The same bad inputs to every backend (issue 9 item 6): each op's table of wrong dtypes, ranks,
sizes, devices and layouts is fed to every backend that runs on CPU tensors here (cpu,
reference, triton under the interpreter) and to the fake (under FakeTensorMode): the same
exception type, and the message names the argument that is actually wrong
(``<op>: <argument> ...``, DESIGN.md: "The error names the argument that is actually wrong")."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch
from backend_matrix import backend_device_params
from torch._subclasses.fake_tensor import FakeTensorMode

from bitpress import ops
from bitpress._core import backends
from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import LAYOUTS, Int4CpuTiles, Int4MmaTiles
from bitpress.int4.packing import pack_int4_along_k, pack_int4_along_n
from bitpress.int4.rtn import rtn_quantize


def _cpu_backends(op):
    """The backends of ``op`` that run on CPU tensors here, plus the fake."""
    params = [
        pytest.param(p.values[0].backend, id=p.id, marks=p.marks)
        for p in backend_device_params(op)
        if p.values[0].device.type == "cpu"
    ]
    return [*params, pytest.param("fake", id="fake")]


def _fake(args: tuple, kwargs: dict, fn):
    """``fn(*args, **kwargs)`` with every tensor a fake tensor (the op's register_fake)."""
    with FakeTensorMode() as mode:

        def cv(a):
            return mode.from_tensor(a) if isinstance(a, torch.Tensor) else a

        return fn(*(cv(a) for a in args), **{k: cv(v) for k, v in kwargs.items()})


def _expect(op, arg, exc, call, pattern=None):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    pattern = pattern or rf"{op}: {re.escape(arg)}\b"
    assert re.search(pattern, msg), f"names {arg!r}? {msg}"


# --------------------------------------------------------------------------------------------
# int4_dequantize
# --------------------------------------------------------------------------------------------

K, N, GS = 64, 16, 32  # G = 2


def _dequantize_args():
    g = torch.Generator().manual_seed(0)
    qweight = pack_int4_along_k(torch.randint(0, 16, (K, N), generator=g))
    scales = torch.rand(2, N, generator=g).half()
    qzeros = pack_int4_along_n(torch.randint(0, 16, (2, N), generator=g))
    g_idx = (torch.arange(K) // GS).int()
    return dict(qweight=qweight, scales=scales, qzeros=qzeros, g_idx=g_idx, group_size=GS)


# (name, changes to the arguments, exception, argument the message must name, marks)
DEQUANTIZE_CASES = [
    ("qweight dtype", lambda a: dict(qweight=a["qweight"].float()), TypeError, "qweight"),
    ("qweight rank", lambda a: dict(qweight=a["qweight"].flatten()), RuntimeError, "qweight"),
    ("scales dtype", lambda a: dict(scales=a["scales"].int()), TypeError, "scales"),
    ("scales rank", lambda a: dict(scales=a["scales"][0]), RuntimeError, "scales"),
    ("scales N", lambda a: dict(scales=a["scales"][:, :8]), RuntimeError, "scales"),
    (
        "scales G",
        lambda a: dict(scales=a["scales"][:1], qzeros=a["qzeros"][:1], g_idx=None),
        RuntimeError,
        "scales",
    ),
    ("qzeros dtype", lambda a: dict(qzeros=a["qzeros"].long()), TypeError, "qzeros"),
    ("qzeros rank", lambda a: dict(qzeros=a["qzeros"][0]), RuntimeError, "qzeros"),
    ("qzeros G", lambda a: dict(qzeros=a["qzeros"][:1]), RuntimeError, "qzeros"),
    ("qzeros N", lambda a: dict(qzeros=a["qzeros"].repeat(1, 3)), RuntimeError, "qzeros"),
    ("g_idx dtype", lambda a: dict(g_idx=a["g_idx"].long()), TypeError, "g_idx"),
    ("g_idx rank", lambda a: dict(g_idx=a["g_idx"].view(8, 8)), RuntimeError, "g_idx"),
    ("g_idx len", lambda a: dict(g_idx=a["g_idx"][:-1]), RuntimeError, "g_idx"),
    ("group_size 0", lambda a: dict(group_size=0, g_idx=None), RuntimeError, "group_size"),
    (
        "qweight device",
        lambda a: dict(scales=a["scales"].to("meta")),
        RuntimeError,
        "scales",
    ),
    # K is given twice (8 * qweight.size(0) and g_idx.size(0)): a qweight with the wrong
    # number of rows beside a right g_idx must be reported as qweight.
    (
        "qweight rows, g_idx right",
        lambda a: dict(qweight=a["qweight"][:-1]),
        RuntimeError,
        "qweight",
    ),
]


def _case_params(cases):
    return [pytest.param(c[:4], id=c[0], marks=c[4] if len(c) > 4 else ()) for c in cases]


@pytest.mark.parametrize("backend", _cpu_backends("int4_dequantize"))
@pytest.mark.parametrize("case", _case_params(DEQUANTIZE_CASES))
def test_int4_dequantize(backend, case):
    name, change, exc, arg = case
    if backend == "fake" and "device" in name:
        pytest.skip("a fake tensor of another device: the fake checks devices like the kernels")
    a = _dequantize_args()
    a.update(change(a))
    args = (a["qweight"], a["scales"], a["qzeros"], a["g_idx"], a["group_size"])
    if backend == "fake":
        call = lambda: _fake(args, {}, torch.ops.bitpress.int4_dequantize)  # noqa: E731
    else:
        call = lambda: ops.int4_dequantize(*args, backend=backend)  # noqa: E731
    _expect("int4_dequantize", arg, exc, call)


@pytest.mark.parametrize("backend", _cpu_backends("int4_dequantize"))
def test_int4_dequantize_dtype_argument(backend):
    a = _dequantize_args()
    args = (a["qweight"], a["scales"], a["qzeros"], a["g_idx"], a["group_size"])
    if backend == "fake":
        call = lambda: _fake(  # noqa: E731
            args, {"dtype": torch.int8}, torch.ops.bitpress.int4_dequantize
        )
    else:
        call = lambda: ops.int4_dequantize(*args, dtype=torch.int8, backend=backend)  # noqa: E731
    _expect("int4_dequantize", "dtype", TypeError, call)


# --------------------------------------------------------------------------------------------
# int4_gemm: the weight arguments by schema name (op_kwargs), in the layout each backend reads
# --------------------------------------------------------------------------------------------


def _weights(layout):
    """(act-order asymmetric weight with zeros and perm, plain symmetric weight without)."""
    w = torch.randn(70, 64, generator=torch.Generator().manual_seed(1))
    asym = rtn_quantize(w, 32, sym=False)
    asym.g_idx = asym.g_idx[torch.randperm(64, generator=torch.Generator().manual_seed(2))]
    return (
        int4_layout.pack(asym, layout=layout),
        int4_layout.pack(rtn_quantize(w, 32, sym=True), layout=layout),
    )


# (name, which weight, changes to op_kwargs, changes to (x, bias), exception, argument)
GEMM_CASES = [
    ("x dtype", 0, {}, lambda x, b: (x.int(), b), TypeError, "x"),
    ("x 0-D", 0, {}, lambda x, b: (x[0, 0], b), RuntimeError, "x"),
    ("x K", 1, {}, lambda x, b: (x[:, :56], b), RuntimeError, "x"),
    ("qweight dtype", 0, lambda w: dict(qweight=w.qweight.float()), None, TypeError, "qweight"),
    ("qweight rank", 0, lambda w: dict(qweight=w.qweight[0]), None, RuntimeError, "qweight"),
    ("out_features", 0, lambda w: dict(out_features=200), None, RuntimeError, "qweight"),
    ("scales dtype", 0, lambda w: dict(scales=w.scales.half()), None, TypeError, "scales"),
    ("scales rank", 0, lambda w: dict(scales=w.scales[None]), None, RuntimeError, "scales"),
    ("zeros dtype", 0, lambda w: dict(zeros=w.zeros.int()), None, TypeError, "zeros"),
    ("zeros shape", 0, lambda w: dict(zeros=w.zeros[..., :32]), None, RuntimeError, "zeros"),
    (
        "group_starts dtype",
        0,
        lambda w: dict(group_starts=w.group_starts.long()),
        None,
        TypeError,
        "group_starts",
    ),
    (
        "group_starts len",
        0,
        lambda w: dict(group_starts=w.group_starts[:-1]),
        None,
        RuntimeError,
        "group_starts",
    ),
    ("perm dtype", 0, lambda w: dict(perm=w.perm.long()), None, TypeError, "perm"),
    ("perm len", 0, lambda w: dict(perm=w.perm[:-8]), None, RuntimeError, "perm"),
    ("perm rank", 0, lambda w: dict(perm=w.perm[None]), None, RuntimeError, "perm"),
    ("bias dtype", 0, {}, lambda x, b: (x, b.int()), TypeError, "bias"),
    ("bias len", 0, {}, lambda x, b: (x, b[:-1]), RuntimeError, "bias"),
    ("bias rank", 0, {}, lambda x, b: (x, b[None]), RuntimeError, "bias"),
    ("scales device", 0, lambda w: dict(scales=w.scales.to("meta")), None, RuntimeError, "scales"),
    ("layout code", 0, lambda w: dict(layout=5), None, RuntimeError, "layout"),
]

# The layouts each backend reads (the reference and the fake read both).
GEMM_LAYOUTS = {
    "cpu": [Int4CpuTiles],
    "triton": [Int4MmaTiles],
    "reference": [Int4CpuTiles, Int4MmaTiles],
    "fake": [Int4CpuTiles, Int4MmaTiles],
}
GEMM_OPS = {"cpu": "int4_gemm", "triton": "int4_gemm_triton", "fake": "int4_gemm"}


def _gemm_call(backend, x, kw, bias):
    if backend == "reference":
        fields = {k: v for k, v in kw.items() if k != "layout"}
        w = LAYOUTS[kw["layout"]](**fields, in_features=64, scale_dtype=torch.float16)
        return lambda: backends.implementations("int4_gemm")["reference"](x, w, bias)
    op = getattr(torch.ops.bitpress, GEMM_OPS[backend])
    if backend == "fake":
        return lambda: _fake((x,), {**kw, "bias": bias}, op)
    return lambda: op(x, **kw, bias=bias)


@pytest.mark.parametrize("backend", _cpu_backends("int4_gemm"))
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: c[0])
def test_int4_gemm(backend, case):
    name, which, change, xb, exc, arg = case
    if backend == "fake" and "device" in name:
        pytest.skip("a fake tensor of another device: the fake checks devices like the kernels")
    for layout in GEMM_LAYOUTS[backend]:
        w = _weights(layout)[which]
        kw = w.op_kwargs()
        if callable(change):
            kw.update(change(w))
        x, bias = torch.randn(2, 64), torch.randn(70)
        if xb is not None:
            x, bias = xb(x, bias)
        if backend == "reference" and name == "layout code":
            continue  # the reference takes a weight object: its type is the layout
        _expect("int4_gemm", arg, exc, _gemm_call(backend, x, kw, bias))


@pytest.mark.parametrize("backend", _cpu_backends("int4_gemm"))
@pytest.mark.parametrize("bad", [torch.float16, torch.uint8, torch.float32])
def test_int4_gemm_act_dtype(backend, bad):
    """act_dtype: None or torch.int8 (W4A8); anything else names act_dtype."""
    for layout in GEMM_LAYOUTS[backend]:
        if backend == "cpu" and layout is not Int4CpuTiles:
            continue
        w = _weights(layout)[1]
        x = torch.randn(2, 64)
        if backend == "reference":
            call = functools.partial(ops.int4_gemm, x, w, act_dtype=bad, backend="reference")
        elif backend == "fake":
            op = torch.ops.bitpress.int4_gemm
            call = functools.partial(_fake, (x,), {**w.op_kwargs(), "act_dtype": bad}, op)
        else:
            op = getattr(torch.ops.bitpress, GEMM_OPS[backend])
            call = functools.partial(op, x, **w.op_kwargs(), act_dtype=bad)
        _expect("int4_gemm", "act_dtype", RuntimeError, call)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_int4_gemm_wrong_layout(backend):
    """A backend given the other layout names the layout it reads and the conversion."""
    want = {"cpu": Int4CpuTiles, "triton": Int4MmaTiles}[backend]
    other = Int4MmaTiles if want is Int4CpuTiles else Int4CpuTiles
    w = _weights(other)[0]
    msg = (
        f"int4_gemm: this backend reads {want.__name__} weights, got {other.__name__}: convert "
        f"the weight with weight.to(device, layout={want.__name__})"
    )
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        ops.int4_gemm(x, w, backend=backend)
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        _gemm_call(backend, x, w.op_kwargs(), None)()
    # Converted as the message says, it runs.
    assert ops.int4_gemm(x, w.to("cpu", layout=want), backend=backend).shape == (2, 70)


# --------------------------------------------------------------------------------------------
# spec_verify
# --------------------------------------------------------------------------------------------

B, KD, V = 3, 2, 11


def _spec_args():
    g = torch.Generator().manual_seed(3)
    return dict(
        target_logits=torch.randn(B, KD + 1, V, generator=g),
        draft_tokens=torch.randint(0, V, (B, KD), generator=g),
        num_draft=torch.full((B,), KD),
        draft_probs=torch.softmax(torch.randn(B, KD, V, generator=g), -1),
        temperature=torch.full((B,), 0.7),
        top_k=torch.full((B,), 5),
        top_p=torch.full((B,), 0.9),
        seeds=torch.arange(B),
        offsets=torch.zeros(B, dtype=torch.long),
    )


SPEC_CASES = [
    ("target_logits dtype", lambda a: dict(target_logits=a["target_logits"].int()), TypeError),
    ("target_logits rank", lambda a: dict(target_logits=a["target_logits"][0]), RuntimeError),
    ("draft_tokens dtype", lambda a: dict(draft_tokens=a["draft_tokens"].float()), TypeError),
    ("draft_tokens rank", lambda a: dict(draft_tokens=a["draft_tokens"][0]), RuntimeError),
    ("draft_tokens B", lambda a: dict(draft_tokens=a["draft_tokens"][:-1]), RuntimeError),
    ("draft_tokens K", lambda a: dict(draft_tokens=a["draft_tokens"][:, :-1]), RuntimeError),
    ("num_draft dtype", lambda a: dict(num_draft=a["num_draft"].float()), TypeError),
    ("num_draft len", lambda a: dict(num_draft=a["num_draft"][:-1]), RuntimeError),
    ("draft_probs dtype", lambda a: dict(draft_probs=a["draft_probs"].double()), TypeError),
    ("draft_probs B", lambda a: dict(draft_probs=a["draft_probs"][:-1]), RuntimeError),
    ("draft_probs K", lambda a: dict(draft_probs=a["draft_probs"][:, :-1]), RuntimeError),
    ("draft_probs V", lambda a: dict(draft_probs=a["draft_probs"][..., :-1]), RuntimeError),
    ("temperature dtype", lambda a: dict(temperature=a["temperature"].double()), TypeError),
    ("temperature len", lambda a: dict(temperature=a["temperature"][:-1]), RuntimeError),
    ("top_k dtype", lambda a: dict(top_k=a["top_k"].float()), TypeError),
    ("top_p dtype", lambda a: dict(top_p=a["top_p"].double()), TypeError),
    ("top_p rank", lambda a: dict(top_p=a["top_p"][None]), RuntimeError),
    ("seeds dtype", lambda a: dict(seeds=a["seeds"].int()), TypeError),
    ("offsets len", lambda a: dict(offsets=a["offsets"][:-1]), RuntimeError),
    ("offsets device", lambda a: dict(offsets=a["offsets"].to("meta")), RuntimeError),
]


@pytest.mark.parametrize("backend", _cpu_backends("spec_verify"))
@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda c: c[0])
def test_spec_verify(backend, case):
    name, change, exc = case
    if backend == "fake" and "device" in name:
        pytest.skip("a fake tensor of another device: the fake checks devices like the kernels")
    arg = name.split()[0]
    a = _spec_args()
    a.update(change(a))
    args = tuple(a.values())
    if backend == "fake":
        call = lambda: _fake(args, {}, torch.ops.bitpress.spec_verify)  # noqa: E731
    else:
        call = lambda: ops.spec_verify(*args, backend=backend)  # noqa: E731
    _expect("spec_verify", arg, exc, call)


def test_tables_cover_every_argument():
    """Each op's table names every tensor argument of its schema at least once."""
    for op, cases in (
        ("int4_dequantize", [c[3] for c in DEQUANTIZE_CASES]),
        ("int4_gemm", [c[5] for c in GEMM_CASES]),
        ("spec_verify", [c[0].split()[0] for c in SPEC_CASES]),
    ):
        schema = getattr(torch.ops.bitpress, op).default._schema
        tensors = {a.name for a in schema.arguments if "Tensor" in str(a.type)}
        assert tensors <= set(cases), (op, tensors - set(cases))


def test_dataclass_replace_keeps_the_layout_type():
    w = _weights(Int4MmaTiles)[0]
    assert type(dataclasses.replace(w, scales=w.scales.clone())) is Int4MmaTiles
