"""int4_gemm on CUDA (csrc/int4/int4_gemm_sm80.cu, csrc/int4/int4_gemm_cuda_torch.cpp).

Without a GPU: the machine code of every shipped kernel variant for sm_80 and sm_90a (tensor-core
mma, ldmatrix, cp.async, no local memory, register budget), and the registration of the CUDA
implementation. The index math and the dequantization are tested on the CPU by
tests/cpp/test_int4_mma.cpp (ctest). With a GPU (``gpu`` marker): the kernel path and the cuBLAS
path against the float64 reference on odd shapes, act-order, groups, zero points, bias, strided
and 3-D x, CUDA graph capture, and bad input.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from int4_data import make_quantized

from bitpress import ops, reference
from bitpress._core import backends
from bitpress._core import ext as _ext
from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import Int4MmaTiles
from bitpress.testing import (
    cuobjdump,
    extension_path,
    extension_resource_usage,
    extension_sass,
    rel_err,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")

# Relative error against float64. fp16: the scale rounded to fp16 once per group (2^-11), the
# product (q - z) * s rounded once (2^-11), the output rounded once; bf16 the same with 2^-8.
# float32 x goes through cuBLAS with an fp32 weight.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}
HALF_DTYPES = [torch.float16, torch.bfloat16]

needs_cuda_build = pytest.mark.skipif(
    not _ext.with_cuda() or cuobjdump() is None,
    reason="bitpress._C was built without CUDA kernels, or cuobjdump is missing",
)

ARCHS = ["sm_80", "sm_90a"]
# The shipped GEMM variants: <arch generation>_<dtype>_int4_gemm_kernel<MT>, MT m16 tiles per block.
GEMM_KERNELS = {"f16": "sm80_f16_int4_gemm_kernel", "bf16": "sm80_bf16_int4_gemm_kernel"}
M_TILES = (1, 2, 4)


# ------------------------------------------------------------------------------------------
# Machine code (no GPU needed)
# ------------------------------------------------------------------------------------------


def _variant(name: str, mt: int, funcs: dict) -> list[str]:
    hits = [k for k in funcs if f"ILi{mt}E" in k]
    assert len(hits) == 1, (name, mt, sorted(funcs))
    return funcs[hits[0]]


@needs_cuda_build
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_gemm_kernel_sass(arch, dtype):
    funcs = extension_sass(GEMM_KERNELS[dtype], arch)
    assert len(funcs) == len(M_TILES), sorted(funcs)
    for mt in M_TILES:
        sass = _variant(dtype, mt, funcs)
        hmma = [i for i in sass if i.startswith("HMMA.16816.F32")]
        # 2 k-tiles x 8 n8-blocks x MT m-tiles per warp and stage, fp32 accumulation.
        assert len(hmma) >= 16 * mt, (mt, len(hmma))
        if dtype == "bf16":
            assert all(i == "HMMA.16816.F32.BF16" for i in hmma), sorted(set(hmma))
        else:
            assert all(i == "HMMA.16816.F32" for i in hmma), sorted(set(hmma))
        assert any(i.startswith("LDSM") for i in sass), "A fragments by ldmatrix"
        assert any(i.startswith("LDGSTS") for i in sass), "cp.async global -> shared"
        assert any(i == "LDS.128" for i in sass), "B fragments by one 128-bit shared load"
        assert any(i.startswith("LOP3") for i in sass), "lop3 dequantization"
        assert not any(i.startswith(("LDL", "STL")) for i in sass), f"local memory, MT={mt}"


@needs_cuda_build
@pytest.mark.parametrize("arch", ARCHS)
def test_gemm_kernel_resources(arch):
    for name in GEMM_KERNELS.values():
        usage = extension_resource_usage(name, arch)
        assert len(usage) == len(M_TILES), sorted(usage)
        for fn, u in usage.items():
            assert u.stack == 0 and u.local == 0, (fn, u)
            assert u.registers <= 255, (fn, u)
            if "ILi1E" in fn:  # launch_bounds(256, 2): two blocks per SM
                assert u.registers <= 128, (fn, u)


@needs_cuda_build
@pytest.mark.parametrize("arch", ARCHS)
def test_helper_kernels_have_no_local_memory(arch):
    names = [
        "int4_gemm_gather_kernel",
        "int4_gemm_reduce_kernel",
        "int4_gemm_dequantize_kernel",
        "int4_gemm_dequantize_poison_kernel",
    ]
    counts = {"int4_gemm_gather_kernel": 1, "int4_gemm_reduce_kernel": 2}
    for name in names:
        usage = extension_resource_usage(name, arch)
        assert len(usage) >= counts.get(name, 3), (name, sorted(usage))
        for fn, u in usage.items():
            assert u.stack == 0 and u.local == 0, (fn, u)
        for fn, sass in extension_sass(name, arch).items():
            assert not any(i.startswith(("LDL", "STL")) for i in sass), fn


# Pipeline depth per variant (TileConfig<MT>::kStages in csrc/int4/int4_gemm_sm80.cu).
STAGES = {1: 4, 2: 4, 4: 3}


@functools.cache
def _sass_lines(arch: str) -> dict[str, list[str]]:
    """{mangled function: its SASS instructions with operands, in address order}."""
    text = subprocess.run(
        [cuobjdump(), "--dump-sass", "--gpu-architecture", arch, extension_path()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    funcs: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+([^;]*);", line)
        if m and cur is not None:
            cur.append(" ".join(m.group(1).split()))
    return funcs


@needs_cuda_build
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("mt", M_TILES)
def test_gemm_pipeline_waits(arch, dtype, mt):
    """The cp.async pipeline as compiled: kStages - 1 commit groups (LDGDEPBAR) before the loop;
    in the loop one wait for "at most kStages - 2 groups pending" (cp.async.wait_group ->
    DEPBAR.LE SB0, kStages - 2: the stage about to be computed has landed, kStages - 2 stay in
    flight), a barrier before the refill's cp.async (LDGSTS) and the first shared-memory read
    (LDSM), one commit; then a full drain (DEPBAR.LE SB0, 0x0) before the reduction reuses the
    stages' shared memory. A wait one group too shallow reads a stage still in flight, one too
    deep serializes the loads; neither shows in a presence check."""
    name = [k for k in _sass_lines(arch) if GEMM_KERNELS[dtype] in k and f"ILi{mt}E" in k]
    assert len(name) == 1, name
    sass = _sass_lines(arch)[name[0]]
    st = STAGES[mt]
    deps = [i for i in sass if "DEPBAR" in i]
    assert deps == ["LDGDEPBAR"] * (st - 1) + [
        f"DEPBAR.LE SB0, {st - 2:#x}",
        "LDGDEPBAR",
        "DEPBAR.LE SB0, 0x0",
    ], deps
    wait = sass.index(f"DEPBAR.LE SB0, {st - 2:#x}")

    def first(prefix, start):
        return next(i for i in range(start, len(sass)) if sass[i].startswith(prefix))

    barrier = first("BAR.SYNC", wait)
    assert barrier < first("LDGSTS", wait), "refill before every warp passed the wait"
    assert barrier < first("LDSM", wait), "shared-memory reads before the barrier"
    drain = sass.index("DEPBAR.LE SB0, 0x0")
    assert first("BAR.SYNC", drain) < first("STS", drain), "reduction writes before the barrier"


# ------------------------------------------------------------------------------------------
# Launch checks (source level: every launch site of csrc; no GPU needed)
# ------------------------------------------------------------------------------------------


def _cuda_sources() -> list[str]:
    out = []
    for folder, _, files in os.walk(CSRC):
        out += [os.path.join(folder, f) for f in files if f.endswith((".cu", ".cuh"))]
    return sorted(out)


def _statements(path: str) -> list[str]:
    """The file's code split at ';', '{' and '}', comments and strings removed."""
    with open(path) as f:
        text = f.read()
    text = re.sub(r"//[^\n]*|/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return [" ".join(s.split()) for s in re.split(r"[;{}]", text) if s.strip()]


def test_every_launch_is_checked_once():
    """Issue 15 (1): `if (launched() != kSuccess || ...) return launched();` read
    cudaGetLastError twice, and the second read returned success after a failed launch (the glue
    then multiplied by a W no kernel wrote). Every kernel launch in csrc is followed directly by
    one call of cuda_launch_status(), whose result is used (returned or kept), no statement calls
    it twice, and cudaGetLastError is called nowhere but in the two helpers."""
    launches = 0
    for path in _cuda_sources():
        stmts = _statements(path)
        rel = os.path.relpath(path, ROOT)
        for i, st in enumerate(stmts):
            assert st.count("cuda_launch_status()") <= 1, (rel, st)
            if "cudaGetLastError" in st and not path.endswith("primitives.cuh"):
                raise AssertionError(f"{rel}: cudaGetLastError outside the helpers: {st}")
            if "<<<" not in st:
                continue
            launches += 1
            nxt = stmts[i + 1] if i + 1 < len(stmts) else ""
            assert re.fullmatch(
                r"(return cuda_launch_status\(\)|const Status \w+ = cuda_launch_status\(\))", nxt
            ), f"{rel}: launch `{st[:80]}` is followed by `{nxt}`"
    assert launches >= 9, launches  # gemm x3 variants, gather, reduce, dequant x2, repack, ...


def test_failed_cuda_calls_are_cleared():
    """Issue 15 (6): a failed cudaFuncSetAttribute (or cudaGetDevice) left its error pending, and
    an unrelated later launch check raised it. Every CUDA runtime call whose result the GEMM
    dispatch tests goes through cuda_call_status, which clears the error it returns."""
    with open(os.path.join(CSRC, "include", "bitpress", "cuda", "primitives.cuh")) as f:
        prim = f.read()
    body = prim[prim.index("inline Status cuda_call_status") :]
    body = body[: body.index("\n}\n")]
    assert "cudaGetLastError()" in body, body
    for path in _cuda_sources():
        if path.endswith("primitives.cuh"):
            continue
        rel = os.path.relpath(path, ROOT)
        for st in _statements(path):
            for call in re.findall(r"\b(cuda[A-Z]\w*)\s*\(", st):
                if call in ("cudaGetLastError",):
                    continue
                # A runtime call's status is tested only through cuda_call_status.
                if re.search(rf"{call}\s*\([^)]*\)\s*(!=|==)\s*cudaSuccess", st):
                    raise AssertionError(f"{rel}: `{st}` leaves a failed {call} pending")
    src = open(os.path.join(CSRC, "int4", "int4_gemm_sm80.cu")).read()
    assert re.search(r"cuda_call_status\(\s*cudaFuncSetAttribute\(", src)
    assert re.search(r"cuda_call_status\(\s*cudaGetDevice\(", src)


_LAUNCH_PROGRAM = r"""
#include <cstdio>
#include "bitpress/cuda/primitives.cuh"
__global__ void empty_kernel() {}
int main() {
  using bitpress::Status;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { std::printf("no device\n"); return 2; }
  empty_kernel<<<1, 2048>>>();  // more threads than a block may have: a non-sticky launch error
  const Status first = bitpress::cuda_launch_status();
  const Status again = bitpress::cuda_launch_status();  // the old `launched()` twice
  empty_kernel<<<1, 32>>>();
  const Status good = bitpress::cuda_launch_status();
  const Status attr = bitpress::cuda_call_status(cudaFuncSetAttribute(
      empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 1 << 30));  // too much: fails
  const cudaError_t pending = cudaGetLastError();  // cleared by cuda_call_status
  std::printf("%d %d %d %d %d\n", int(first), int(again), int(good), int(attr), int(pending));
  return 0;
}
"""


@pytest.mark.gpu
def test_launch_status_helpers_on_gpu(tmp_path):
    """On a GPU: a failed launch is reported once (kCudaError) and a second read says success --
    why the dispatch must keep the first; cuda_call_status clears the error of a failed
    cudaFuncSetAttribute, so nothing is left pending."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.access(nvcc, os.X_OK):
        pytest.skip("nvcc is missing")
    src = tmp_path / "launch.cu"
    src.write_text(_LAUNCH_PROGRAM)
    exe = tmp_path / "launch"
    major, minor = torch.cuda.get_device_capability()
    subprocess.run(
        [
            nvcc,
            "-std=c++17",
            f"-arch=sm_{major}{minor}",
            "-I",
            os.path.join(CSRC, "include"),
            str(src),
            "-o",
            str(exe),
        ],
        check=True,
        capture_output=True,
    )
    res = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    first, again, good, attr, pending = (int(v) for v in res.stdout.split())
    assert (first, again, good, attr, pending) == (3, 0, 0, 3, 0), res.stdout


# ------------------------------------------------------------------------------------------
# Shipped images: cubins and PTX (forward compatibility), per CUDA source
# ------------------------------------------------------------------------------------------


def _load_setup():
    spec = importlib.util.spec_from_file_location("bitpress_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() runs only as __main__
    return mod


@functools.cache
def _images() -> dict[str, set[str]]:
    """{CUDA source stem: {'sm_80', 'compute_80', ...}} from cuobjdump --list-elf / --list-ptx
    (a PTX file listed as `<stem>.sm_80.ptx` is compute_80 PTX)."""
    out: dict[str, set[str]] = {}
    for flag, kind in (("--list-elf", "cubin"), ("--list-ptx", "ptx")):
        text = subprocess.run(
            [cuobjdump(), flag, extension_path()], capture_output=True, text=True, check=True
        ).stdout
        for stem, arch in re.findall(rf"(\w+?)\.sm_(\d+a?)\.{kind}", text):
            out.setdefault(stem, set()).add(f"sm_{arch}" if kind == "cubin" else f"compute_{arch}")
    return out


@needs_cuda_build
def test_shipped_cubins_and_ptx():
    """Issue 15 (2): sm_80 and sm_90a cubins and compute_80 PTX for every _sm80.cu source (the
    driver JIT-compiles the PTX on Blackwell, sm_100 / sm_120, where no cubin fits); an
    _sm90a.cu source gets its sm_90a cubin only (no sm_80 image, no PTX); cuda_archs() lists
    exactly what was shipped; backend selection sees an image for Blackwell and none for an arch
    below 8.0."""
    images = _images()
    stems = [os.path.basename(p)[:-3] for p in _cuda_sources() if p.endswith(".cu")]
    assert stems and set(images) == set(stems), (sorted(images), stems)
    for stem in stems:
        if stem.endswith("_sm90a"):
            assert images[stem] == {"sm_90a"}, (stem, images[stem])
        else:
            assert images[stem] == {"sm_80", "sm_90a", "compute_80"}, (stem, images[stem])
    shipped = set().union(*images.values())
    assert set(_ext.cuda_archs()) == shipped, (_ext.cuda_archs(), shipped)
    for cc in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)]:
        assert backends.cuda_image_fits(cc, _ext.cuda_archs()), cc
    assert not backends.cuda_image_fits((7, 5), _ext.cuda_archs())


def test_blackwell_without_ptx_falls_back(monkeypatch):
    """Backend selection: without PTX a Blackwell device has no image and int4_gemm's cuda
    backend refuses it (the default order then takes triton); with compute_80 PTX it serves."""
    dev = backends.Device("cuda", (12, 0))
    monkeypatch.setattr(backends.ext, "with_cuda", lambda: True)
    monkeypatch.setattr(backends.ext, "cuda_archs", lambda: ["sm_80", "sm_90a"])
    why = backends.refusal("int4_gemm", "cuda", dev)
    assert why is not None and "no CUDA image for sm_120" in why, why
    monkeypatch.setattr(backends.ext, "cuda_archs", lambda: ["sm_80", "compute_80", "sm_90a"])
    assert backends.refusal("int4_gemm", "cuda", dev) is None


def test_setup_arch_groups():
    """setup.py's per-source archs: the default list ships compute_80 PTX with the _sm80 sources,
    never an sm_80 image or PTX with an _sm90a source, and reports what it ships."""
    setup = _load_setup()
    archs = setup.parse_archs(setup.DEFAULT_CUDA_ARCHS)
    sm80 = setup.gencode_flags(setup.source_archs("csrc/x/op_sm80.cu", archs))
    sm90a = setup.gencode_flags(setup.source_archs("csrc/x/op_sm90a.cu", archs))
    assert setup.shipped_images(sm80) == ["sm_80", "compute_80", "sm_90a"], sm80
    assert sm90a == ["-gencode=arch=compute_90a,code=sm_90a"], sm90a
    assert setup.shipped_images(sm80 + sm90a) == ["sm_80", "compute_80", "sm_90a"]
    # A 9.0a-only list: the _sm80 sources build for 9.0a alone; "+PTX" on 9.0a is compute_90a.
    only90 = setup.parse_archs("9.0a+PTX")
    assert setup.shipped_images(
        setup.gencode_flags(setup.source_archs("csrc/x/op_sm80.cu", only90))
    ) == ["sm_90a", "compute_90a"]
    assert setup.source_archs("csrc/x/op_sm90a.cu", setup.parse_archs("8.0+PTX")) == []


@needs_cuda_build
def test_cuda_implementation_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bitpress::int4_gemm", "CUDA")


# ------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------


def _weight(K, N, gs=128, sym=True, act=False, seed=0):
    qw = make_quantized(K, N, gs, sym, act, seed=seed)
    return int4_layout.pack(qw, layout=Int4MmaTiles).to("cuda")


def _ref64(x, p, bias=None):
    return reference.int4_gemm(x.double(), p, None if bias is None else bias.double())


def _run(x, p, bias=None):
    with torch.no_grad():
        return ops.int4_gemm(x, p, bias, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("M", [1, 7, 16, 33, 64, 65, 300])
@pytest.mark.parametrize("N", [1, 65, 4095])
def test_against_reference(dtype, M, N):
    K = 512
    p = _weight(K, N, 128, sym=False)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    out = _run(x, p)
    assert out.shape == (M, N) and out.dtype == dtype
    assert not out.isnan().any()
    assert rel_err(out.double(), _ref64(x, p)) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(
    "K,N,gs,sym,act",
    [
        (4096, 4096, 128, True, False),  # Llama shapes: split-K at M = 1
        (4096, 256, 128, False, True),  # act-order: x gathered by perm
        (1000, 130, 64, False, True),  # K not a multiple of the group: padded groups
        (768, 64, -1, True, False),  # one group over K
        (136, 7, 8, False, False),  # tiny groups (several per stage), K % 128 != 0
        (16, 1, -1, False, False),  # a single k-tile
    ],
)
@pytest.mark.parametrize("M", [1, 33])
def test_groups_act_order_zeros(dtype, K, N, gs, sym, act, M):
    p = _weight(K, N, gs, sym, act)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    out = _run(x, p, bias)
    assert rel_err(out.double(), _ref64(x, p, bias)) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bias_dtypes(bias_dtype):
    p = _weight(256, 100, 64, sym=False, act=True)
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(100, device="cuda", dtype=bias_dtype)
    out = _run(x, p, bias)
    assert rel_err(out.double(), _ref64(x, p, bias)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_strided_and_3d_x(dtype):
    K, N = 256, 130
    p = _weight(K, N, 64, sym=False)
    xt = torch.randn(K, 9, device="cuda", dtype=dtype).t()  # stride (1, 9): copied
    assert not xt.is_contiguous()
    assert rel_err(_run(xt, p).double(), _ref64(xt, p)) < TOLERANCE[dtype]
    x3 = torch.randn(2, 3, K, device="cuda", dtype=dtype)
    out = _run(x3, p)
    assert out.shape == (2, 3, N)
    assert rel_err(out.double(), _ref64(x3, p)) < TOLERANCE[dtype]
    # A row view at an odd element offset: not 16-byte aligned, so the glue copies it.
    big = torch.randn(4, K + 1, device="cuda", dtype=dtype)
    xo = big[:, 1:]
    assert rel_err(_run(xo, p).double(), _ref64(xo, p)) < TOLERANCE[dtype]


@pytest.mark.gpu
def test_float32_x_goes_to_cublas():
    p = _weight(512, 65, 128, sym=False, act=True)
    x = torch.randn(3, 512, device="cuda")
    bias = torch.randn(65, device="cuda", dtype=torch.float16)
    out = _run(x, p, bias)
    assert out.dtype == torch.float32
    assert rel_err(out.double(), _ref64(x, p, bias)) < TOLERANCE[torch.float32]


@pytest.mark.gpu
def test_empty_shapes():
    p = _weight(128, 64)
    x = torch.randn(0, 128, device="cuda", dtype=torch.float16)
    assert _run(x, p).shape == (0, 64)
    qw = make_quantized(128, 1, 128)
    p1 = int4_layout.pack(qw, layout=Int4MmaTiles).to("cuda")
    out = _run(torch.randn(2, 128, device="cuda", dtype=torch.float16), p1)
    assert out.shape == (2, 1) and not out.isnan().any()


_THRESHOLD_SCRIPT = """
import torch, sys
sys.path.insert(0, {tests!r})
from int4_data import make_quantized
from bitpress import ops, reference
from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import Int4MmaTiles
from bitpress.testing import rel_err
p = int4_layout.pack(make_quantized(512, 200, 64, False, True), layout=Int4MmaTiles).to("cuda")
for M in (1, 65, 300):
    x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
    out = ops.int4_gemm(x, p, backend="cuda")
    ref = reference.int4_gemm(x.double(), p)
    assert rel_err(out.double(), ref) < 1e-2, (M, rel_err(out.double(), ref))
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("max_m", ["0", "1000"])
def test_threshold_env_var(max_m):
    """BITPRESS_INT4_CUDA_MAX_M=0 sends every M to cuBLAS, 1000 every M here to the kernel (M =
    300: five m-blocks of 64); both agree with the reference."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, BITPRESS_INT4_CUDA_MAX_M=max_m)
    res = subprocess.run(
        [sys.executable, "-c", _THRESHOLD_SCRIPT.format(tests=tests)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("act", [False, True])
def test_cuda_graph_capture(act):
    p = _weight(4096, 65, 128, sym=False, act=act)  # split-K (few output tiles) + gather
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    bias = torch.randn(65, device="cuda", dtype=torch.float16)
    _run(x, p, bias)  # warm-up outside the capture (device queries, function attributes)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _run(x, p, bias)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out.double(), _ref64(x, p, bias)) < TOLERANCE[torch.float16]


@pytest.mark.gpu
def test_deterministic():
    p = _weight(4096, 130, 128, sym=False)
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(_run(x, p), _run(x, p))


@pytest.mark.gpu
def test_bad_input():
    p = _weight(256, 70, 64, sym=False, act=True)
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    op = torch.ops.bitpress.int4_gemm
    kw = p.op_kwargs()
    cpu_layout = int4_layout.pack(make_quantized(256, 70, 64, False, True)).to("cuda")
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "int4_gemm: this backend reads Int4MmaTiles weights, got Int4CpuTiles: convert the "
            "weight with weight.to(device, layout=Int4MmaTiles)"
        ),
    ):
        op(x, **cpu_layout.op_kwargs())
    with pytest.raises(RuntimeError, match=re.escape("reads Int4MmaTiles weights")):
        ops.int4_gemm(x, cpu_layout, backend="cuda")
    with pytest.raises(TypeError, match="scales must be float32"):
        op(x, **{**kw, "scales": kw["scales"].half()})
    with pytest.raises(RuntimeError, match="zeros must have the shape of scales"):
        op(x, **{**kw, "zeros": kw["zeros"][:, :64]})
    with pytest.raises(RuntimeError, match="perm must be on the same device"):
        op(x, **{**kw, "perm": kw["perm"].cpu()})
    with pytest.raises(RuntimeError, match=r"perm.size\(0\)"):
        op(x, **{**kw, "perm": kw["perm"][:16]})
    with pytest.raises(RuntimeError, match=r"qweight.size\(1\)"):
        op(x, **{**kw, "out_features": 200})
    with pytest.raises(RuntimeError, match=r"bias.size\(0\)"):
        op(x, **kw, bias=torch.zeros(3, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"layout must be 0 \(Int4CpuTiles\) or 1"):
        op(x, **{**kw, "layout": 2})
    q_noperm = _weight(256, 70, 64)
    with pytest.raises(RuntimeError, match=r"x.size\(-1\) must be K = 256"):
        op(torch.randn(2, 128, device="cuda", dtype=torch.float16), **q_noperm.op_kwargs())
    # The backend choice: on this device the default is the cuda backend.
    assert backends.select("int4_gemm", x.device, dtype=x.dtype)[0] == "cuda"
