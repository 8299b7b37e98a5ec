"""int4_gemm, Triton backend (triton_kernels/int4_gemm.py): both paths (split-K GEMV, tiled
tl.dot GEMM) under the interpreter against the float64 reference on odd shapes, every dtype, bias,
3-D and strided x; opcheck; bad input; the compiled kernels' PTX/SASS for sm_80 and sm_90; and
real shapes on a GPU (skipped without one).

bf16 under the interpreter (Triton 3.8) is tested against an emulating reference, because the
interpreter's fp32 -> bf16 cast truncates instead of rounding to nearest even and its bf16 tl.dot
is wrong: the GEMV output is compared with the truncated reference, and the GEMM kernel runs with
DOT_F32 (both tl.dot operands cast to fp32 after the weight tile was rounded -- truncated -- to
bf16), compared with a reference that truncates the dequantized weight and the output likewise.
What that leaves untested without a GPU: the bf16 tensor-core dot itself and the RNE conversions,
which the AOT tests check only as instructions (mma/wgmma with bf16 operands, cvt.rn.bf16).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from int4_data import make_quantized
from test_int4_gemm import TOLERANCE, ref64

from bitpress import ops
from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import Int4CpuTiles, Int4Layout, Int4MmaTiles
from bitpress.testing import compile_triton, cuobjdump, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# bf16 against a reference truncated like the interpreter: agreement up to the last bit of the
# few elements whose float32 sums straddle a bf16 boundary -- far below RNE-vs-truncation (~2e-3).
INTERP_BF16_TOL = 1e-3

# (M, K, N, group_size, sym, act_order). K = 136: G = 5 groups of 27-28 rows padded to 32 with
# act-order, or one group of 136 padded to 144 (group -1): padding rows (perm = -1) in both.
CASES = [
    (1, 64, 1, 32, True, False),
    (3, 136, 7, 32, False, True),
    (17, 256, 65, 64, False, True),
    (1, 256, 130, 128, False, False),
    (33, 256, 130, 32, True, True),
    (70, 136, 65, -1, True, False),
    (33, 64, 7, 64, False, False),
    (70, 256, 1, 128, True, True),
]


def _case_id(c):
    M, K, N, gs, sym, act = c
    return f"M{M}-K{K}-N{N}-g{gs}-{'sym' if sym else 'asym'}{'-act' if act else ''}"


def _trunc_bf16(y: torch.Tensor) -> torch.Tensor:
    """float -> bf16 by truncation of the float32 value (the interpreter's cast)."""
    bits = y.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def _interp_expected(x, qw, packed, bias, path):
    """(expected output, tolerance) of a CPU (interpreter) launch of ``path`` on x."""
    if x.dtype != torch.bfloat16:
        return ref64(x, packed, bias), TOLERANCE[x.dtype]
    if path == "gemv":
        # fp32 accumulation, one (truncating) rounding at the end.
        return _trunc_bf16(ref64(x, packed, bias)), INTERP_BF16_TOL
    # The GEMM dequantizes (q - z) * s in fp32, rounds the tile to bf16 (truncating here), then
    # accumulates exactly enough in fp32 (DOT_F32) and rounds (truncates) the output.
    w = _trunc_bf16(qw.dequantize(torch.float32)).double()  # [N, K]
    y = x.double().reshape(-1, x.shape[-1]) @ w.t()
    if bias is not None:
        y = y + bias.double()
    return _trunc_bf16(y).reshape(*x.shape[:-1], -1), INTERP_BF16_TOL


def _run(x, packed, bias=None, **kw):
    from bitpress.triton_kernels import int4_gemm as tk

    weight = packed.op_kwargs()
    assert weight.pop("layout") == Int4Layout.MMA_TILES
    return tk.int4_gemm(x, **weight, bias=bias, **kw)


# ------------------------------------------------------------------------------------------
# Interpreter: both paths against the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, path, dtype):
    M, K, N, gs, sym, act = case
    qw = make_quantized(K, N, gs, sym, act)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    if act or K % 16:
        assert p.perm is not None
    x = torch.randn(M, K).to(dtype)
    out = _run(x, p, path=path)
    assert out.shape == (M, N) and out.dtype == dtype
    want, tol = _interp_expected(x, qw, p, None, path)
    assert rel_err(out, want) <= tol, rel_err(out, want)


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize(
    "dtype,bias_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float16),
    ],
    ids=str,
)
def test_op_bias_3d_strided_x(path, dtype, bias_dtype):
    """Through bitpress.ops (the registered custom op): x [2, M/2, K] sliced out of a wider buffer
    (row stride 2K, element stride 2), a bias of another dtype."""
    M = 6 if path == "gemv" else 34
    K, N = 136, 70
    qw = make_quantized(K, N, 32, sym=False, act_order=True)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    buf = torch.randn(2, M // 2, 2 * K).to(dtype)
    x = buf[..., ::2]
    assert not x.is_contiguous()
    bias = torch.randn(N).to(bias_dtype)
    if path == "gemv":
        out = ops.int4_gemm(x, p, bias, backend="triton")
    else:  # the op chooses the GEMV at this M: force the GEMM on the launcher
        out = _run(x, p, bias, path="gemm")
    assert out.shape == (2, M // 2, N) and out.dtype == dtype
    want, tol = _interp_expected(x, qw, p, bias, path)
    assert rel_err(out, want) <= tol, rel_err(out, want)


@pytest.mark.interpreter
@pytest.mark.parametrize("split_k", [1, 2, 3, 40])
def test_gemv_split_k(split_k):
    """S = 1 writes the output directly; S > 1 goes through the workspace and the reduce kernel;
    S = 40 > the number of K blocks leaves some K ranges empty (their partials must be 0)."""
    M, K, N = 5, 512, 65
    qw = make_quantized(K, N, 128, sym=False)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    x = torch.randn(M, K, dtype=torch.float16)
    bias = torch.randn(N, dtype=torch.float16)
    out = _run(x, p, bias, path="gemv", split_k=split_k, config={"BLOCK_N": 64, "BLOCK_K": 32})
    assert rel_err(out, ref64(x, p, bias)) <= TOLERANCE[torch.float16]


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "path,config",
    [
        ("gemv", {"BLOCK_N": 256, "BLOCK_K": 16}),  # block past Np: masked words / scales
        ("gemv", {"BLOCK_N": 64, "BLOCK_K": 64}),
        ("gemm", {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64}),
        ("gemm", {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 16}),
    ],
)
def test_block_configs(path, config):
    M, K, N = (7 if path == "gemv" else 40), 256, 130
    qw = make_quantized(K, N, 64, sym=False, act_order=True)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    x = torch.randn(M, K)
    out = _run(x, p, path=path, config=config)
    assert rel_err(out, ref64(x, p)) <= TOLERANCE[torch.float32]


@pytest.mark.interpreter
def test_default_path_by_m():
    """The launcher's default (GEMV iff M <= GEMV_MAX_M) gives the reference result on both sides
    of the threshold, and M = 0 gives an empty output."""
    from bitpress.triton_kernels.int4_gemm import GEMV_MAX_M

    qw = make_quantized(128, 33, 32, sym=True)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    for M in (GEMV_MAX_M, GEMV_MAX_M + 1):
        x = torch.randn(M, 128)
        out = ops.int4_gemm(x, p, backend="triton")
        assert rel_err(out, ref64(x, p)) <= TOLERANCE[torch.float32]
    out = ops.int4_gemm(torch.randn(2, 0, 128), p, backend="triton")
    assert out.shape == (2, 0, 33)


@pytest.mark.interpreter
def test_rejects_cpu_tile_layout():
    p = int4_layout.pack(make_quantized(64, 8, 32))
    assert type(p) is Int4CpuTiles
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "int4_gemm: this backend reads Int4MmaTiles weights, got Int4CpuTiles: convert the "
            "weight with weight.to(device, layout=Int4MmaTiles)"
        ),
    ):
        ops.int4_gemm(torch.randn(2, 64), p, backend="triton")


@pytest.mark.interpreter
def test_rejects_block_k_not_dividing_group():
    p = int4_layout.pack(make_quantized(96, 8, 32), layout=Int4MmaTiles)
    with pytest.raises(ValueError, match="BLOCK_K"):
        _run(torch.randn(2, 96), p, config={"BLOCK_N": 64, "BLOCK_K": 64})


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "path,split_k", [("gemv", 1), ("gemv", 3), ("gemm", None)], ids=["gemv", "gemv-splitk", "gemm"]
)
@pytest.mark.parametrize("bad", [136, 1136, -5], ids=["K", "K+1000", "-5"])
def test_perm_value_outside_range_gives_nan(path, split_k, bad):
    """A perm value outside [-1, K) is never read (K addressed past the row of x: row m's element
    K is row m+1's first one) and makes every output row NaN: the CUDA backend's contract (its
    gather writes NaN into x_perm). Device values are not checked (a host sync)."""
    M = 5 if path == "gemv" else 20
    K, N = 136, 70
    qw = make_quantized(K, N, 32, sym=False, act_order=True)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    kw = p.op_kwargs()
    assert kw.pop("layout") == Int4Layout.MMA_TILES
    perm = kw["perm"].clone()
    valid = (perm >= 0).nonzero().flatten()
    perm[valid[3]] = bad
    x = torch.randn(M, K, dtype=torch.float16)
    from bitpress.triton_kernels import int4_gemm as tk

    out = tk.int4_gemm(x, **{**kw, "perm": perm}, path=path, split_k=split_k)
    assert out.isnan().all(), out.isnan().float().mean()
    # The untouched perm still gives the reference (padding rows, perm = -1, read as 0).
    ok = tk.int4_gemm(x, **kw, path=path, split_k=split_k)
    assert rel_err(ok, ref64(x, p)) <= TOLERANCE[torch.float16]


_INTERPRETED_IMPORT_SCRIPT = r"""
import json, sys
import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from bitpress.triton_kernels import _runtime, int4_dequantize, int4_gemm, spec_verify

cuda, cpu = torch.device("cuda"), torch.device("cpu")
# Precondition: @triton.jit decided at decoration time (this process imported them under
# TRITON_INTERPRET=1).
assert type(int4_gemm.int4_gemm_kernel) is InterpretedFunction
assert type(int4_gemm.int4_gemm_autotuned.fn) is InterpretedFunction
for k in (int4_gemm.int4_gemm_kernel, int4_gemm.int4_gemv_kernel,
          int4_gemm.int4_gemm_reduce_kernel, spec_verify.spec_verify_kernel,
          int4_dequantize.int4_dequantize_kernel):
    f = _runtime.for_device(k, cuda)
    assert type(f) is JITFunction, (k, type(f))
    assert f.fn is k.fn
    assert type(_runtime.for_device(k, cpu)) is InterpretedFunction
for t in (int4_gemm.int4_gemm_autotuned, int4_gemm.int4_gemv_autotuned):
    a = _runtime.for_device(t, cuda)
    assert isinstance(a, Autotuner) and type(a.fn) is JITFunction, type(a.fn)
    assert a.configs is t.configs and a.keys == t.keys and a.cache == {}
    assert a.early_config_prune is t.early_config_prune
    assert _runtime.for_device(t, cuda) is a  # one compiled autotuner (one tuning cache)
if sys.argv[1] == "compile":
    # The JITFunction compiles for sm_80 inside a CUDA launch's context: tl.cdiv / tl.sum and the
    # module's helpers were InterpretedFunctions in this process.
    from bitpress.testing import _compile
    sig = json.loads(sys.argv[2])
    cx = {"HAS_ZEROS": True, "HAS_PERM": True, "HAS_BIAS": True, "DIRECT": False,
          "BLOCK_M": 4, "BLOCK_N": 64, "BLOCK_K": 32}
    with _runtime.interpretable(cuda, int4_gemm.__name__):
        c = _compile(_runtime.for_device(int4_gemm.int4_gemv_kernel, cuda), sig, cx, 80, 4, 3)
    assert ".target sm_80" in c.asm["ptx"]
    assert type(int4_gemm.int4_gemm_kernel) is InterpretedFunction  # restored
if sys.argv[1] == "gpu":
    sys.path.insert(0, sys.argv[2])
    from int4_data import make_quantized
    from bitpress import ops, reference
    from bitpress.int4 import layout
    from bitpress.int4.layout import Int4MmaTiles
    from bitpress.testing import rel_err
    p = layout.pack(make_quantized(512, 130, 64, False, True), layout=Int4MmaTiles).to("cuda")
    for M in (3, 40):  # GEMV (split-K + reduce) and GEMM, autotuned
        x = torch.randn(M, 512, device="cuda", dtype=torch.float16)
        out = ops.int4_gemm(x, p, backend="triton")
        assert out.is_cuda
        assert rel_err(out.double(), reference.int4_gemm(x.double(), p)) < 2e-3
print("ok")
"""


def _run_interpreted_import(*args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    args = [json.dumps(a) if isinstance(a, dict) else a for a in args]
    res = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_IMPORT_SCRIPT, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_cuda_launch_after_interpreted_import_is_compiled():
    """Kernel modules first imported under TRITON_INTERPRET=1 hold InterpretedFunctions (triton
    decides at decoration time); CUDA launches and autotuners still get compiled JITFunctions."""
    _run_interpreted_import("types")


@pytest.mark.slow
@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
def test_cuda_kernel_after_interpreted_import_compiles():
    sig = _signature("fp16", True)
    _run_interpreted_import("compile", sig)


def test_reduce_offsets_are_64_bit():
    """The split-K reduce reads partial s at s * stride_ws: that product must be 64-bit (S * M *
    Np passes 2^31 long before memory does). In the sm_80 PTX of the S loop no 32-bit register is
    a loop-carried sum of a register stride (the strength-reduced s * stride_ws) -- the 32-bit
    product wrapped -- and the offset is carried in a 64-bit register instead."""
    from bitpress.triton_kernels.int4_gemm import int4_gemm_reduce_kernel

    sig = {"ws_ptr": "*fp32", "bias_ptr": "*fp16", "out_ptr": "*fp16"}
    sig.update(dict.fromkeys(["M", "N", "S", "stride_ws", "stride_wm", "stride_om"], "i32"))
    cx = {"HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_N": 128}
    asm = compile_triton(int4_gemm_reduce_kernel, sig, cx, 80, 4, 3)
    loops = re.findall(r"^(\$L__BB\d+_\d+):.*?\n(.*?)bra(?:\.uni)?\s+\1;", asm.ptx, re.S | re.M)
    assert loops, asm.ptx
    for _, body in loops:
        carried32 = re.findall(r"add\.s32\s+(%r\d+), \1, %r\d+;", body)
        assert not carried32, carried32
    assert any(re.search(r"add\.s64\s+(%rd\d+), \1, %rd\d+;", b) for _, b in loops)


@pytest.mark.interpreter
def test_opcheck_triton_op():
    qw = make_quantized(64, 24, 32, sym=False, act_order=True)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    x = torch.randn(3, 64, dtype=torch.float16)
    bias = torch.randn(24, dtype=torch.float16)
    op = torch.ops.bitpress.int4_gemm_triton.default
    torch.library.opcheck(op, (x,), {**p.op_kwargs(), "bias": bias})
    kw = p.op_kwargs()
    args = [kw[a.name] for a in op._schema.arguments[1:-2]]  # between x and (bias, act_dtype)
    assert args[-1] == int(Int4Layout.MMA_TILES)
    torch.library.opcheck(op, (x, *args, bias))


# ------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 / sm_90
# ------------------------------------------------------------------------------------------


def _signature(x: str, gemv: bool) -> dict[str, str]:
    sig = {
        "x_ptr": f"*{x}",
        "qweight_ptr": "*i32",
        "scales_ptr": "*fp32",
        "zeros_ptr": "*u8",
        "perm_ptr": "*i32",
        "bias_ptr": f"*{x}",
        "out_ptr": "*fp32" if gemv else f"*{x}",
        "M": "i32",
        "K": "i32",
        "N": "i32",
        "KT": "i32",
        "tiles_per_group": "i32",
        ("S" if gemv else "M_BUCKET"): "i32",
    }
    names = ["stride_xm", "stride_xk", "stride_q", "stride_s", "stride_z"]
    names += ["stride_os", "stride_om"] if gemv else ["stride_om"]
    return {**sig, **dict.fromkeys(names, "i32")}


def _no_spills(asm):
    assert asm.spills == 0 and not any(i.startswith(("LDL", "STL")) for i in asm.sass)
    assert asm.resources is not None and asm.resources.local == 0 and asm.resources.stack == 0


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gemm_uses_tensor_cores(arch, dtype):
    from bitpress.triton_kernels.int4_gemm import int4_gemm_kernel

    flags = {"HAS_ZEROS": True, "HAS_PERM": True, "HAS_BIAS": True, "DOT_F32": False}
    blocks = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}
    asm = compile_triton(
        int4_gemm_kernel, _signature(dtype, False), {**flags, **blocks}, arch, 8, 3
    )
    ty = "f16" if dtype == "fp16" else "bf16"
    if arch == 80:
        assert re.search(rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{ty}\.{ty}\.f32", asm.ptx)
        want = "HMMA.16816.F32" + (".BF16" if dtype == "bf16" else "")
        assert want in asm.sass, sorted(set(asm.sass))
    else:
        # Triton 3.8 at num_warps = 8, 128 x 128 tiles: one warpgroup-wide m64n128k16 per k16.
        assert re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n128k16\.f32\.{ty}\.{ty}", asm.ptx)
        assert any(i.startswith("HGMMA.64") for i in asm.sass), sorted(set(asm.sass))
    assert "cvt.rn.bf16" in asm.ptx or dtype == "fp16"
    _no_spills(asm)


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
def test_gemm_fp32_is_ieee():
    """fp32 x: input_precision="ieee" keeps the dot off the tf32 tensor cores; at the largest
    fp32 tile the autotune pruning keeps (512 products per thread) nothing spills."""
    from bitpress.triton_kernels.int4_gemm import int4_gemm_kernel

    flags = {"HAS_ZEROS": False, "HAS_PERM": False, "HAS_BIAS": False, "DOT_F32": False}
    blocks = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}
    asm = compile_triton(int4_gemm_kernel, _signature("fp32", False), {**flags, **blocks}, 80, 4, 3)
    assert "tf32" not in asm.ptx and "mma" not in asm.ptx
    assert not any(i.startswith(("HMMA", "HGMMA")) for i in asm.sass)
    assert asm.sass.count("FFMA") >= 64 * 64 * 16 // 128  # every product on the FMA pipe
    _no_spills(asm)


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("direct", [False, True])
def test_gemv_compiles(arch, direct):
    """The GEMV is FMA work (no tensor cores) at the largest autotuned M bucket, without spills."""
    from bitpress.triton_kernels.int4_gemm import int4_gemv_kernel

    sig = _signature("bf16", True)
    if direct:
        sig["out_ptr"] = "*bf16"
    flags = {"HAS_ZEROS": True, "HAS_PERM": True, "HAS_BIAS": True, "DIRECT": direct}
    blocks = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}
    asm = compile_triton(int4_gemv_kernel, sig, {**flags, **blocks}, arch, 4, 3)
    assert f".target sm_{arch}{'a' if arch == 90 else ''}" in asm.ptx
    counts = collections.Counter(asm.sass)
    assert not any(i.startswith(("HMMA", "HGMMA")) for i in counts), sorted(counts)
    # 16 x 32 x 64 products per step over 128 threads: at least 256 FMAs per thread.
    assert counts["FFMA"] >= 256, counts["FFMA"]
    assert any(i.startswith("STG") for i in counts)
    _no_spills(asm)


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 16, 64, 512])
@pytest.mark.parametrize(
    "gs,sym,act", [(128, True, False), (128, False, True)], ids=["g128-sym", "g128-asym-act"]
)
def test_gpu_llama_shapes(M, dtype, gs, sym, act):
    K = N = 4096
    qw = make_quantized(K, N, gs, sym, act)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    x = torch.randn(M, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    want = ref64(x, p, bias)
    out = ops.int4_gemm(x.cuda(), p.to("cuda"), bias.cuda(), backend="triton")
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_err(out.cpu(), want) <= TOLERANCE[dtype], rel_err(out.cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_forced_paths_odd_shapes(path, dtype):
    M, K, N = 17, 1104, 333  # K: act-order groups of 34-35 rows padded to 48
    qw = make_quantized(K, N, 32, sym=False, act_order=True)
    p = int4_layout.pack(qw, layout=Int4MmaTiles)
    x = torch.randn(M, K, dtype=dtype)
    out = _run(x.cuda(), p.to("cuda"), path=path)
    assert rel_err(out.cpu(), ref64(x, p)) <= TOLERANCE[dtype]


@pytest.mark.gpu
def test_gpu_cuda_launch_after_interpreted_import():
    """A process that imported the kernels under TRITON_INTERPRET=1 runs them compiled on CUDA
    (autotuned GEMV and GEMM), with the reference result."""
    _run_interpreted_import("gpu", os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_gpu_perm_value_outside_range_gives_nan(path):
    """Compiled: a perm value >= K gives NaN rows on the Triton backend, like the CUDA backend."""
    qw = make_quantized(256, 70, 32, sym=False, act_order=True)
    p = int4_layout.pack(qw, layout=Int4MmaTiles).to("cuda")
    kw = p.op_kwargs()
    kw.pop("layout")
    perm = kw["perm"].clone()
    perm[(perm >= 0).nonzero().flatten()[5]] = 256
    x = torch.randn(20, 256, dtype=torch.float16, device="cuda")
    from bitpress.triton_kernels import int4_gemm as tk

    assert tk.int4_gemm(x, **{**kw, "perm": perm}, path=path).isnan().all()


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """No host syncs: after autotuning (warm-up), the op captures into a CUDA graph."""
    qw = make_quantized(4096, 1024, 128, sym=False)
    p = int4_layout.pack(qw, layout=Int4MmaTiles).to("cuda")
    x = torch.randn(4, 4096, dtype=torch.float16, device="cuda")
    ops.int4_gemm(x, p, backend="triton")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ops.int4_gemm(x, p, backend="triton")
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y.cpu(), ref64(x.cpu(), p.to("cpu"))) <= TOLERANCE[torch.float16]


# ------------------------------------------------------------------------------------------
# Autotune pruning (runs only on CUDA launches: checked here directly)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_rows", [16, 48, 128, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autotune_pruning(group_rows, dtype):
    from bitpress.triton_kernels import int4_gemm as tk

    x = torch.empty(0, dtype=dtype)
    for bm in (1, 4, 16):
        args = {"x_ptr": x, "tiles_per_group": group_rows // 16}
        kept = tk._prune_gemv(tk._GEMV_CONFIGS, args, BLOCK_M=bm)
        assert kept
        for c in kept:
            assert group_rows % c.kwargs["BLOCK_K"] == 0
            limit = tk.GEMV_PRODUCTS_PER_THREAD * 32 * c.num_warps
            assert bm * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] <= limit
    for m_bucket in (32, 4096):
        args = {"x_ptr": x, "tiles_per_group": group_rows // 16, "M_BUCKET": m_bucket}
        kept = tk._prune_gemm(tk._GEMM_CONFIGS, args)
        assert kept and all(group_rows % c.kwargs["BLOCK_K"] == 0 for c in kept)
        assert all(c.kwargs["BLOCK_M"] <= m_bucket for c in kept)
        if dtype == torch.float32:
            assert all(tk._products(c) <= 512 * 32 * c.num_warps for c in kept)
        elif group_rows % 32 == 0 and m_bucket == 4096:
            assert any(c.kwargs["BLOCK_M"] >= 128 for c in kept)
    if group_rows == 48:
        assert {c.kwargs["BLOCK_K"] for c in kept} == {16}


@pytest.mark.slow
@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
@pytest.mark.parametrize("arch", [80, 90])
def test_every_autotune_config_compiles_without_spills(arch):
    """Each GEMM config (bf16) and each GEMV config admitted at BLOCK_M = 16 (the most products
    per thread; smaller M buckets admit larger K x N tiles with the same bound)."""
    from bitpress.triton_kernels import int4_gemm as tk

    flags = {"HAS_ZEROS": True, "HAS_PERM": True, "HAS_BIAS": True}
    for c in tk._GEMM_CONFIGS:
        cx = {**flags, "DOT_F32": False, **c.kwargs}
        asm = compile_triton(
            tk.int4_gemm_kernel, _signature("bf16", False), cx, arch, c.num_warps, c.num_stages
        )
        _no_spills(asm)
    x = torch.empty(0, dtype=torch.bfloat16)
    for bm in (16,):
        kept = tk._prune_gemv(tk._GEMV_CONFIGS, {"x_ptr": x, "tiles_per_group": 8}, BLOCK_M=bm)
        for c in kept:
            cx = {**flags, "DIRECT": False, "BLOCK_M": bm, **c.kwargs}
            asm = compile_triton(
                tk.int4_gemv_kernel, _signature("bf16", True), cx, arch, c.num_warps, c.num_stages
            )
            _no_spills(asm)
