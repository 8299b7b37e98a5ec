"""sparse24_gemm and sparse24_int4_gemm, Triton backend (triton_kernels/sparse24_gemm.py,
sparse24_int4_gemm.py): the kernels under the interpreter against the float64 reference on odd
shapes, every dtype, bias, 3-D and strided x, both scale paths of the INT4 kernel; opcheck,
torch.compile, bad input; the compiled kernels' PTX/SASS for sm_80 and sm_90; real shapes on a
GPU (skipped without one).

bf16 under the interpreter (Triton 3.8): its fp32 -> bf16 cast truncates instead of rounding to
nearest even, and its bf16 ``tl.dot`` is wrong, so the kernels run the dot on fp32 operands there
(``DOT_F32``, set by the launcher on CPU tensors; exact for these operands, which are bf16
values). bf16 results are compared with a reference that truncates like the interpreter. What
that leaves untested without a GPU is the bf16 tensor-core dot and the RNE conversions, which the
AOT tests check only as instructions (mma / wgmma with bf16 operands, cvt.rn.bf16).
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
from bitpress.sparse24 import reference
from bitpress.sparse24.cases import random_24, random_int4_24
from bitpress.sparse24.layout import Sparse24Layout, compress
from bitpress.testing import _triton_asm, cuobjdump, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against the float64 reference: fp32 accumulation (fp16 also rounds the INT4 weights to fp16).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3}
# bf16 against a reference truncated like the interpreter (the last bit of a few sums).
INTERP_BF16_TOL = 1e-3

# (M, N, K): M = 1 / 7 / 33, N not a multiple of the block, K a multiple of 16 but not of 64.
SHAPES = [(1, 7, 64), (7, 65, 208), (33, 130, 144)]


def _shape_id(s):
    return "M{}-N{}-K{}".format(*s)


def _trunc_bf16(y: torch.Tensor) -> torch.Tensor:
    """float -> bf16 by truncation of the float32 value (the interpreter's cast), as float64."""
    bits = y.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).double()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _gemm_weight(N, K, dtype, gen):
    w = random_24(N, K, dtype, gen, fill=0.8)  # some groups with fewer than 2 nonzeros
    return compress(w)


def _gemm_expected(x, values, meta, bias):
    """(expected, tolerance) of an interpreter launch on x."""
    b = bias.double() if bias is not None else None
    y = reference.sparse24_gemm(x.double(), values.double(), meta, b)
    if x.dtype == torch.bfloat16:
        return _trunc_bf16(y), INTERP_BF16_TOL
    return y, TOL[x.dtype]


def _int4_expected(x, qvalues, meta, scales, zeros, gs, bias):
    """The kernel computes (q - z) s in fp32 and rounds it to x's dtype (truncating for bf16 in
    the interpreter), then accumulates in fp32."""
    w = reference.int4_dense(qvalues, meta, scales, zeros, gs).float()
    w = _trunc_bf16(w) if x.dtype == torch.bfloat16 else w.to(x.dtype).double()
    # Positions the meta does not keep are exactly 0 in both.
    y = x.double().reshape(-1, x.shape[-1]) @ w.t()
    if bias is not None:
        y = y + bias.double()
    y = y.reshape(*x.shape[:-1], -1)
    if x.dtype == torch.bfloat16:
        return _trunc_bf16(y), INTERP_BF16_TOL
    return y, TOL[x.dtype]


# ------------------------------------------------------------------------------------------
# Interpreter: sparse24_gemm
# ------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_gemm_matches_reference(shape, dtype):
    M, N, K = shape
    gen = _gen()
    values, meta = _gemm_weight(N, K, dtype, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    out = ops.sparse24_gemm(x, values, meta, bias, backend="triton")
    assert out.shape == (M, N) and out.dtype == dtype
    want, tol = _gemm_expected(x, values, meta, bias)
    assert rel_err(out, want) <= tol, rel_err(out, want)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 16},
        {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128},  # K = 200 < one block past the first
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2},
    ],
    ids=lambda c: "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
)
def test_gemm_block_configs(config):
    """K = 200 (a multiple of 8, not of 16) leaves a partial group byte range in the last tile;
    GROUP_M = 2 reorders the programs."""
    from bitpress.triton_kernels.sparse24_gemm import sparse24_gemm

    M, N, K = 70, 97, 200
    gen = _gen(1)
    values, meta = _gemm_weight(N, K, torch.float16, gen)
    x = torch.randn(M, K, generator=gen).half()
    out = sparse24_gemm(x, values, meta, config=config)
    want, tol = _gemm_expected(x, values, meta, None)
    assert rel_err(out, want) <= tol


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemm_3d_strided_x_and_weights(dtype):
    """x [2, 3, K] sliced out of a wider buffer (element stride 2), values / meta as column
    slices of wider tensors, a bias of another dtype."""
    N, K = 33, 64
    gen = _gen(2)
    values, meta = _gemm_weight(N, K, dtype, gen)
    vbuf = torch.zeros(N, K, dtype=dtype)
    vbuf[:, : K // 2] = values
    mbuf = torch.zeros(N, K // 8 + 3, dtype=torch.uint8)
    mbuf[:, : K // 8] = meta
    v, m = vbuf[:, : K // 2], mbuf[:, : K // 8]
    assert not v.is_contiguous() and not m.is_contiguous()
    x = torch.randn(2, 3, 2 * K, generator=gen).to(dtype)[..., ::2]
    bias = torch.randn(N, generator=gen)
    out = ops.sparse24_gemm(x, v, m, bias, backend="triton")
    assert out.shape == (2, 3, N)
    want, tol = _gemm_expected(x, values, meta, bias)
    assert rel_err(out, want) <= tol


@pytest.mark.interpreter
def test_gemm_empty_and_non_finite():
    N, K = 9, 32
    values, meta = _gemm_weight(N, K, torch.float32, _gen(3))
    assert ops.sparse24_gemm(torch.randn(0, K), values, meta, backend="triton").shape == (0, N)
    x = torch.randn(4, K)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    out = ops.sparse24_gemm(x, values, meta, backend="triton")
    want = reference.sparse24_gemm(x.double(), values.double(), meta)
    # NaN / inf propagate where the reference has them (x * 0 at a pruned position is not
    # computed by either: the reference multiplies by 0 too, giving NaN there as well).
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    fin = want.isfinite()
    assert rel_err(out[fin], want[fin]) <= TOL[torch.float32]


# ------------------------------------------------------------------------------------------
# Interpreter: sparse24_int4_gemm
# ------------------------------------------------------------------------------------------


INT4_CASES = [
    # (M, N, K, group_size, sym)
    (1, 7, 64, 32, True),
    (7, 65, 208, 16, False),  # TILE_IN_GROUP with the 16-K tile
    (33, 130, 144, -1, False),
    (5, 33, 256, 128, True),
    (3, 20, 240, 24, False),  # group not a multiple of 16: scales per group of 4
]


def _int4_id(c):
    M, N, K, gs, sym = c
    return f"M{M}-N{N}-K{K}-g{gs}-{'sym' if sym else 'asym'}"


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", INT4_CASES, ids=_int4_id)
def test_int4_matches_reference(case, dtype):
    M, N, K, gs, sym = case
    gen = _gen(4)
    scale_dtype = torch.float32 if dtype == torch.float32 else dtype
    qvalues, meta, scales, zeros = random_int4_24(N, K, gs, sym, scale_dtype, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    out = ops.sparse24_int4_gemm(
        x, qvalues, meta, scales, zeros, group_size=gs, bias=bias, backend="triton"
    )
    assert out.shape == (M, N) and out.dtype == dtype
    want, tol = _int4_expected(x, qvalues, meta, scales, zeros, gs, bias)
    assert rel_err(out, want) <= tol, rel_err(out, want)
    # And the op's own reference (float64 weights, RNE), within the rounding of the weights.
    ref = reference.sparse24_int4_gemm(x, qvalues, meta, scales, zeros, gs, bias)
    assert rel_err(out, ref) <= {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1e-2)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "gs,config",
    [
        (64, {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64}),  # tile in group
        (64, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128}),  # tile spans 2 groups
        (40, {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}),  # groups cross tiles
    ],
    ids=["in-group", "two-groups", "crossing"],
)
def test_int4_scale_paths(gs, config):
    from bitpress.triton_kernels.sparse24_int4_gemm import sparse24_int4_gemm

    M, N, K = 40, 70, 320
    gen = _gen(5)
    qvalues, meta, scales, zeros = random_int4_24(N, K, gs, False, torch.float32, gen)
    x = torch.randn(M, K, generator=gen).half()
    out = sparse24_int4_gemm(x, qvalues, meta, scales, zeros, gs, config=config)
    want, tol = _int4_expected(x, qvalues, meta, scales, zeros, gs, None)
    assert rel_err(out, want) <= tol


@pytest.mark.interpreter
def test_int4_3d_strided_x():
    N, K, gs = 24, 128, 32
    gen = _gen(6)
    qvalues, meta, scales, zeros = random_int4_24(N, K, gs, False, torch.float16, gen)
    x = torch.randn(2, 2, 3 * K, generator=gen).half()[..., ::3]
    st = torch.zeros(scales.shape[0], N + 5, dtype=scales.dtype)
    st[:, :N] = scales
    out = ops.sparse24_int4_gemm(
        x, qvalues, meta, st[:, :N], zeros, group_size=gs, backend="triton"
    )
    want, tol = _int4_expected(x, qvalues, meta, scales, zeros, gs, None)
    assert out.shape == (2, 2, N) and rel_err(out, want) <= tol


# ------------------------------------------------------------------------------------------
# Ops: opcheck, torch.compile, bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.interpreter
def test_opcheck_triton_ops():
    gen = _gen(7)
    values, meta = _gemm_weight(24, 64, torch.float16, gen)
    x = torch.randn(3, 64, generator=gen).half()
    bias = torch.randn(24, generator=gen).half()
    torch.library.opcheck(
        torch.ops.bitpress.sparse24_gemm_triton.default,
        (x, values, meta, int(Sparse24Layout.ROW), bias),
    )
    qvalues, meta4, scales, zeros = random_int4_24(24, 64, 32, False, torch.float16, gen)
    torch.library.opcheck(
        torch.ops.bitpress.sparse24_int4_gemm_triton.default,
        (x, qvalues, meta4, scales, zeros, 32, int(Sparse24Layout.ROW), bias),
    )


@pytest.mark.interpreter
def test_torch_compile_fullgraph():
    gen = _gen(8)
    values, meta = _gemm_weight(16, 32, torch.float32, gen)
    qvalues, meta4, scales, _ = random_int4_24(16, 32, 16, True, torch.float32, gen)
    x = torch.randn(5, 32, generator=gen)

    def f(x):
        y = ops.sparse24_gemm(x, values, meta, backend="triton")
        return y + ops.sparse24_int4_gemm(
            x, qvalues, meta4, scales, group_size=16, backend="triton"
        )

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert rel_err(got, f(x)) == 0.0


@pytest.mark.interpreter
def test_bad_inputs():
    values, meta = _gemm_weight(8, 32, torch.float32, _gen(9))
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match=r"^sparse24_gemm: layout must be ROW \(0\)"):
        ops.sparse24_gemm(x, values, meta, layout=Sparse24Layout.MMA, backend="triton")
    with pytest.raises(Exception, match=r"^sparse24_gemm: values"):
        ops.sparse24_gemm(x, values.half(), meta, backend="triton")
    with pytest.raises(Exception, match=r"^sparse24_gemm: x"):
        ops.sparse24_gemm(torch.randn(2, 36), values, meta, backend="triton")
    bad = meta.clone()
    bad[1, 2] = 0x11  # idx0 == idx1
    with pytest.raises(RuntimeError, match=r"^sparse24_gemm: meta values must be nibbles"):
        ops.sparse24_gemm(x, values, bad, backend="triton")
    qvalues, meta4, scales, _ = random_int4_24(8, 32, 16, True, torch.float32, _gen(9))
    with pytest.raises(Exception, match=r"^sparse24_int4_gemm: group_size"):
        ops.sparse24_int4_gemm(x, qvalues, meta4, scales, group_size=12, backend="triton")
    with pytest.raises(Exception, match=r"^sparse24_int4_gemm: scales"):
        ops.sparse24_int4_gemm(x, qvalues, meta4, scales[:1], group_size=16, backend="triton")


def test_autotune_pruning():
    from bitpress.triton_kernels import sparse24_gemm as g
    from bitpress.triton_kernels import sparse24_int4_gemm as g4

    for dtype in DTYPES:
        x = torch.empty(0, dtype=dtype)
        for mb in (1, 16, 4096):
            kept = g._prune(g._CONFIGS, {"x_ptr": x, "M_BUCKET": mb})
            assert kept and all(c.kwargs["BLOCK_M"] <= max(mb, 16) for c in kept)
            for gs, in_group in ((128, True), (48, True), (24, False)):
                args = {"x_ptr": x, "M_BUCKET": mb, "group_size": gs, "TILE_IN_GROUP": in_group}
                kept4 = g4._prune(g4._CONFIGS, args)
                assert kept4
                if in_group:
                    assert all(gs % c.kwargs["BLOCK_K"] == 0 for c in kept4)
                if dtype == torch.float32:
                    for c in kept4:
                        prod = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]
                        assert prod <= 512 * 32 * c.num_warps


# ------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 / sm_90
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


def _gemm_job(dtype, arch, cfg, warps, stages):
    sig = {"x_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "meta_ptr": "*u8"}
    sig.update({"bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"})
    names = ["M", "N", "K", "M_BUCKET", "stride_xm", "stride_vn", "stride_meta", "stride_om"]
    sig.update(dict.fromkeys(names, "i32"))
    div = ["x_ptr", "values_ptr", "meta_ptr", "out_ptr", "K"]
    div += ["stride_xm", "stride_vn", "stride_meta", "stride_om"]
    cx = {"HAS_BIAS": True, "DOT_F32": False, "GROUP_M": 8, **cfg}
    return dict(
        module="bitpress.triton_kernels.sparse24_gemm",
        name="sparse24_gemm_kernel",
        signature=sig,
        constexprs=cx,
        arch=arch,
        num_warps=warps,
        num_stages=stages,
        div16=div,
    )


def _int4_job(dtype, arch, cfg, warps, stages, in_group=True):
    sig = {"x_ptr": f"*{dtype}", "q_ptr": "*i32", "meta_ptr": "*u8", "scales_ptr": f"*{dtype}"}
    sig.update({"zeros_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"})
    names = ["M", "N", "K", "group_size", "M_BUCKET", "stride_xm", "stride_qn", "stride_meta"]
    names += ["stride_s", "stride_z", "stride_om"]
    sig.update(dict.fromkeys(names, "i32"))
    div = ["x_ptr", "q_ptr", "meta_ptr", "scales_ptr", "zeros_ptr", "out_ptr", "K"]
    div += ["stride_xm", "stride_qn", "stride_meta", "stride_s", "stride_z", "stride_om"]
    flags = {"HAS_ZEROS": True, "HAS_BIAS": True, "TILE_IN_GROUP": in_group, "DOT_F32": False}
    return dict(
        module="bitpress.triton_kernels.sparse24_int4_gemm",
        name="sparse24_int4_gemm_kernel",
        signature=sig,
        constexprs={**flags, "GROUP_M": 8, **cfg},
        arch=arch,
        num_warps=warps,
        num_stages=stages,
        div16=div,
    )


def _no_spills(asm):
    assert asm.spills == 0 and not any(i.startswith(("LDL", "STL")) for i in asm.sass)
    assert asm.resources is not None and asm.resources.local == 0 and asm.resources.stack == 0


_BIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
def test_tensor_core_instructions():
    """sm_80: mma.sync m16n8k16 (HMMA.16816) on bf16 / fp16; sm_90: wgmma (HGMMA); the dense tile
    is built in registers (no sparse MMA), and nothing spills at the largest autotuned tile."""
    jobs = [
        _gemm_job("bf16", 80, _BIG, 8, 3),
        _gemm_job("fp16", 90, _BIG, 8, 3),
        _int4_job("bf16", 80, _BIG, 8, 3),
        _int4_job("fp16", 90, _BIG, 8, 3, in_group=False),
    ]
    for job, asm in zip(jobs, _aot(jobs), strict=True):
        ty = "bf16" if job["signature"]["x_ptr"] == "*bf16" else "f16"
        counts = collections.Counter(asm.sass)
        if job["arch"] == 80:
            assert re.search(
                rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{ty}\.{ty}\.f32", asm.ptx
            )
            want = "HMMA.16816.F32" + (".BF16" if ty == "bf16" else "")
            assert counts[want] > 0, sorted(counts)
        else:
            assert re.search(
                rf"wgmma\.mma_async\.sync\.aligned\.m64n128k16\.f32\.{ty}\.{ty}", asm.ptx
            )
            assert any(i.startswith("HGMMA.64") for i in counts), sorted(counts)
        assert not any(".SP" in i for i in counts)
        if ty == "bf16" and "int4" in job["name"]:
            assert "cvt.rn.bf16" in asm.ptx
        _no_spills(asm)


@pytest.mark.slow
@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
@pytest.mark.parametrize("arch", [80, 90])
def test_every_autotune_config_compiles_without_spills(arch):
    from bitpress.triton_kernels import sparse24_gemm as g
    from bitpress.triton_kernels import sparse24_int4_gemm as g4

    jobs = [_gemm_job("bf16", arch, c.kwargs, c.num_warps, c.num_stages) for c in g._CONFIGS]
    jobs += [_int4_job("bf16", arch, c.kwargs, c.num_warps, c.num_stages) for c in g4._CONFIGS]
    for job, asm in zip(jobs, _aot(jobs), strict=True):
        try:
            _no_spills(asm)
        except AssertionError:
            raise AssertionError(f"{job['name']} {job['constexprs']} spills") from None


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 16, 128])
def test_gpu_gemm_llama_shape(M, dtype):
    N, K = 4096, 4096
    gen = _gen(10)
    values, meta = _gemm_weight(N, K, dtype, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    out = ops.sparse24_gemm(x.cuda(), values.cuda(), meta.cuda(), bias.cuda(), backend="triton")
    want = reference.sparse24_gemm(x.double(), values.double(), meta, bias.double())
    assert rel_err(out.cpu(), want) <= {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs,sym", [(128, True), (128, False), (-1, True), (24, False)])
def test_gpu_int4_odd_shapes(dtype, gs, sym):
    M, N, K = 17, 333, 1104 if gs != 24 else 1104 - 1104 % 48
    gen = _gen(11)
    qvalues, meta, scales, zeros = random_int4_24(N, K, gs, sym, torch.float32, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    cuda = [t.cuda() if t is not None else None for t in (x, qvalues, meta, scales, zeros)]
    out = ops.sparse24_int4_gemm(*cuda, group_size=gs, backend="triton")
    want = reference.sparse24_int4_gemm(x, qvalues, meta, scales, zeros, gs)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(out.cpu(), want) <= tol


_INTERPRETED_IMPORT_SCRIPT = r"""
import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
from bitpress.triton_kernels import _runtime, sparse24_gemm as g, sparse24_int4_gemm as g4

cuda = torch.device("cuda")
assert type(g.sparse24_gemm_kernel) is InterpretedFunction
for k in (g.sparse24_gemm_kernel, g4.sparse24_int4_gemm_kernel):
    assert type(_runtime.for_device(k, cuda)) is JITFunction
for t in (g.sparse24_gemm_autotuned, g4.sparse24_int4_gemm_autotuned):
    a = _runtime.for_device(t, cuda)
    assert isinstance(a, Autotuner) and type(a.fn) is JITFunction
for mod in (g, g4):  # helpers a compiled kernel calls stay compilable
    assert type(mod.expand24) is JITFunction and type(mod.meta_nibbles) is JITFunction
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
