"""fp8_gemm on Hopper (csrc/fp8/fp8_gemm_sm90a.cu, csrc/fp8/fp8_gemm_cuda_torch.cpp).

Without a GPU: the machine code of the kernel, compiled here for sm_90a with nvcc (and read from
bitpress._C when it was built with CUDA): FP8 wgmma (QGMMA.64x128x32.F32.E4M3.E4M3) in chains of 4
restarted every 128 K (the promotion), operands by 16-byte cp.async and no byte-wide shared stores
(B is read K-major, as it is stored), no local memory, the register budget, the cp.async pipeline
waits and the proxy fence before the tensor core reads shared memory; that the source is built for
sm_90a only. The index maps, the swizzle, the descriptors and the whole kernel are emulated on the
CPU by tests/cpp/test_fp8_wgmma.cpp (ctest). With a GPU (``gpu`` marker): the kernel against a
float64 reference (and torch._scaled_mm where it applies) on odd shapes, every scale granularity and
output dtype, bias, non-contiguous inputs, K not a multiple of 16 (padded by the glue), poisoned
outputs, and the argument checks.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import pytest
import torch

from bitpress._core import ext as _ext
from bitpress.testing import cuobjdump, extension_path, nvcc, poisoned_outputs

try:  # branch fp8's plain-torch reference; the float64 formula below stands in without it
    from bitpress.fp8 import reference as fp8_reference
except ImportError:
    fp8_reference = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "csrc", "fp8", "fp8_gemm_sm90a.cu")
GEMM = "sm90_e4m3_fp8_gemm_kernel"
REDUCE = "sm90_fp8_gemm_reduce_kernel"
# Fp8TileConfig<kWG>::kStages: 1 warpgroup (BM = 64) 6 stages, 2 warpgroups 4.
STAGES = {1: 6, 2: 4}
# Registers per thread: two 64-float accumulators (the tensor core's partial and the promoted fp32
# sum), the next stage's cp.async addresses (issued while the MMAs run) and the epilogue's scales;
# 255 is the hardware limit (one 256-thread block per SM): the budget keeps a margin below it so
# that a change that would start spilling shows here first.
REGISTER_BUDGET = 232


@functools.cache
def _compiled_cubin() -> str:
    """The kernel source compiled for sm_90a, as setup.py builds it (torch-free: seconds)."""
    out_dir = os.path.join(ROOT, "build", "test_fp8_gemm_cuda")
    os.makedirs(out_dir, exist_ok=True)
    cubin = os.path.join(out_dir, "fp8_gemm_sm90a.cubin")
    cmd = [
        nvcc(),
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-O3",
        "-I" + os.path.join(ROOT, "csrc", "include"),
        "-I" + os.path.join(ROOT, "csrc"),
        "-gencode",
        "arch=compute_90a,code=sm_90a",
        "-cubin",
        "-Xptxas",
        "-v",
        "-o",
        cubin,
        SOURCE,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    return cubin, res.stderr


def _binary(source: str) -> str:
    if source == "compiled":
        if nvcc() is None or cuobjdump() is None:
            pytest.skip("nvcc or cuobjdump missing")
        return _compiled_cubin()[0]
    if not _ext.with_cuda() or cuobjdump() is None or "sm_90a" not in _ext.cuda_archs():
        pytest.skip("bitpress._C was built without an sm_90a image, or cuobjdump is missing")
    if not any(GEMM in k for k in _sass(extension_path())):
        pytest.skip("bitpress._C has no fp8_gemm kernel: built before csrc/fp8/fp8_gemm_sm90a.cu")
    return extension_path()


@functools.cache
def _sass(binary: str) -> dict[str, list[str]]:
    """{mangled function: its SASS instructions with operands, in address order}."""
    text = subprocess.run(
        [cuobjdump(), "--dump-sass", "--gpu-architecture", "sm_90a", binary],
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


@functools.cache
def _resources(binary: str) -> dict[str, tuple[int, int, int]]:
    """{mangled function: (registers, stack, local)}."""
    text = subprocess.run(
        [cuobjdump(), "--dump-resource-usage", "--gpu-architecture", "sm_90a", binary],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out, func = {}, None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)
        if m and func:
            out[func] = tuple(int(v) for v in m.groups())
            func = None
    return out


def _op(ins: str) -> str:
    """The mnemonic of an instruction, without a predicate guard; "" for the never-executed
    fillers ptxas pads with (guarded by @!PT, e.g. `@!PT LDS RZ, [RZ]`)."""
    if ins.startswith("@!PT "):
        return ""
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split(" ")[0]


def _gemm_variants(binary: str) -> dict[str, list[str]]:
    funcs = {k: v for k, v in _sass(binary).items() if GEMM in k}
    # 2 block heights (1 or 2 warpgroups) x 3 output dtypes.
    assert len(funcs) == 6, sorted(funcs)
    return funcs


def _warpgroups(name: str) -> int:
    m = re.search(r"kernelILi(\d)E", name)
    assert m, name
    return int(m.group(1))


SOURCES = ["compiled", "extension"]


@pytest.mark.parametrize("source", SOURCES)
def test_qgmma_chains(source):
    """Per K tile, one chain of 4 QGMMA.64x128x32 on E4M3 with an fp32 accumulator: the first with
    no accumulator input (RZ, !UPT: the tensor core's sum restarts, i.e. the partial sum is
    promoted to the fp32 registers every 128 K), the last waited for before anything reads it."""
    for name, sass in _gemm_variants(_binary(source)).items():
        q = [i for i, ins in enumerate(sass) if _op(ins).startswith(("QGMMA", "HGMMA", "HMMA"))]
        ops = {_op(sass[i]) for i in q}
        assert ops == {"QGMMA.64x128x32.F32.E4M3.E4M3"}, (name, ops)
        assert len(q) == 4, (name, len(q))  # one loop body: 128 K = 4 x k32
        first, rest = sass[q[0]], [sass[i] for i in q[1:]]
        assert "RZ" in first and "!UPT" in first, first
        assert all("RZ" not in ins for ins in rest), rest
        assert "gsb0" in sass[q[-1]], sass[q[-1]]
        wait = next(i for i in range(q[-1], len(sass)) if sass[i].startswith("WARPGROUP.DEPBAR"))
        assert sass[wait] == "WARPGROUP.DEPBAR.LE gsb0, 0x0", sass[wait]
        # While the chain runs: the next stage's cp.async, and no instruction touches the 64
        # accumulator registers (R<d>..R<d+63>, d the QGMMA destination) before the wait.
        between = sass[q[-1] + 1 : wait]
        assert "LDGSTS.E.BYPASS.128" in [_op(i) for i in between], name
        d = int(re.search(r"QGMMA\S* R(\d+),", first).group(1))
        for ins in between:
            regs = {int(r) for r in re.findall(r"\bR(\d+)\b", ins)}
            assert not regs & set(range(d, d + 64)), (name, ins)
        arrive = [i for i, ins in enumerate(sass) if ins.startswith("WARPGROUP.ARRIVE")]
        assert arrive and arrive[-1] < q[0], name


@pytest.mark.parametrize("source", SOURCES)
def test_operands_k_major_by_cp_async(source):
    """A and B reach shared memory only by 16-byte cp.async (LDGSTS.128): no shared store at all,
    so in particular no byte-wide STS.U8 (what an FP8 kernel emits when it must transpose a
    non-K-major B in shared memory)."""
    for name, sass in _gemm_variants(_binary(source)).items():
        ops = [_op(i) for i in sass]
        assert "LDGSTS.E.BYPASS.128" in ops, name
        assert not any(o.startswith("STS") for o in ops), (
            name,
            sorted({o for o in ops if "STS" in o}),
        )
        assert not any(o.startswith(("LDS", "LDSM")) for o in ops), "operands read by wgmma only"


@pytest.mark.parametrize("source", SOURCES)
def test_epilogue_stores_column_pairs(source):
    """The accumulator gives a thread two adjacent columns: one store per pair, 4 bytes for bf16 /
    fp16 output (STG.E, besides the 2-byte STG.E.U16 of the unaligned fallback), 8 bytes for fp32
    output and for the split-K partials (STG.E.64)."""
    for name, sass in _gemm_variants(_binary(source)).items():
        ops = {_op(i) for i in sass}
        assert "STG.E.64" in ops, name
        dtype = int(re.search(r"DTypeE(\d)E", name).group(1))  # 0 fp32, 1 fp16, 2 bf16
        if dtype in (1, 2):
            assert {"STG.E", "STG.E.U16"} <= ops, (name, sorted(o for o in ops if "STG" in o))


@pytest.mark.parametrize("source", SOURCES)
def test_pipeline_waits_and_proxy_fence(source):
    """In the loop: wait for the stage about to be used (cp.async.wait_group kStages - 2 ->
    DEPBAR.LE SB0, kStages - 2), make the cp.async writes visible to the async proxy
    (fence.proxy.async -> FENCE.VIEW.ASYNC.S), then the barrier, all before the wgmma chain; a
    drain (DEPBAR.LE SB0, 0x0) after the loop."""
    for name, sass in _gemm_variants(_binary(source)).items():
        st = STAGES[_warpgroups(name)]
        wait = sass.index(f"DEPBAR.LE SB0, {st - 2:#x}")
        fence = next(i for i in range(wait, len(sass)) if sass[i].startswith("FENCE.VIEW.ASYNC.S"))
        bar = next(i for i in range(fence, len(sass)) if sass[i].startswith("BAR.SYNC"))
        q0 = next(i for i, ins in enumerate(sass) if _op(ins).startswith("QGMMA"))
        assert wait < fence < bar < q0, (name, wait, fence, bar, q0)
        assert "DEPBAR.LE SB0, 0x0" in sass[q0:], name
        prologue = [i for i in sass[:wait] if i == "LDGDEPBAR"]
        assert len(prologue) == st - 1, (name, len(prologue))


@pytest.mark.parametrize("source", SOURCES)
def test_no_local_memory_and_register_budget(source):
    binary = _binary(source)
    res = {k: v for k, v in _resources(binary).items() if GEMM in k or REDUCE in k}
    assert len(res) == 9, sorted(res)  # 6 GEMM variants, 3 reductions
    for name, (reg, stack, local) in res.items():
        assert stack == 0 and local == 0, (name, reg, stack, local)
        assert reg <= (REGISTER_BUDGET if GEMM in name else 64), (name, reg)
    for name, sass in _sass(binary).items():
        if GEMM in name or REDUCE in name:
            assert not any(_op(i).startswith(("LDL", "STL")) for i in sass), name


def test_ptxas_keeps_wgmma_asynchronous():
    """ptxas serializes wgmma (and says "Potential Performance Loss: wgmma.mma_async instructions
    are serialized", C7515 and friends) when accumulator registers are touched between a wgmma and
    its wait or the pipeline cannot be proven safe; the kernel must compile without that."""
    if nvcc() is None:
        pytest.skip("nvcc missing")
    log = _compiled_cubin()[1]
    assert "Used" in log, log  # the -v report is there, so the absence below means something
    assert "Potential Performance Loss" not in log, log
    assert "spill" not in log.replace("0 bytes spill", ""), log


def test_source_built_for_sm90a_only():
    """setup.py compiles `<op>_sm90a.cu` for 9.0a alone (wgmma exists nowhere else), and not at
    all when 9.0a is not listed."""
    sys.path.insert(0, ROOT)
    try:
        import setup  # noqa: PLC0415 (setup.py at the repository root; its body is guarded)
    finally:
        sys.path.remove(ROOT)
    archs = setup.parse_archs("8.0+PTX;9.0a")
    assert [a[:2] for a in setup.source_archs(SOURCE, archs)] == [(90, "a")]
    assert setup.source_archs(SOURCE, setup.parse_archs("8.0;8.9")) == []


# ------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_hopper = pytest.mark.skipif(
    not (_hopper() and _ext.with_cuda() and "sm_90a" in _ext.cuda_archs()),
    reason="needs a compute capability 9.0 GPU and bitpress._C built with its sm_90a image",
)


def _quantize(x: torch.Tensor, block: tuple[int, int] | None, per_row: bool):
    """E4M3 codes and fp32 scales of x [R, K] (tensor, per row, or blocks of block = (br, 128))."""
    R, K = x.shape
    if block is None:
        amax = x.abs().amax(dim=1, keepdim=True) if per_row else x.abs().amax().reshape(1)
        s = (amax / 448).clamp_min(1e-12).float()
        q = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        return q, s
    br, bk = block
    rb, kb = -(-R // br), -(-K // bk)
    xp = torch.zeros(rb * br, kb * bk, dtype=x.dtype, device=x.device)
    xp[:R, :K] = x
    amax = xp.reshape(rb, br, kb, bk).abs().amax(dim=(1, 3))
    s = (amax / 448).clamp_min(1e-12).float()
    full = s.repeat_interleave(br, 0).repeat_interleave(bk, 1)[:R, :K]
    q = (x / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def _dequant(q: torch.Tensor, s: torch.Tensor, br: int) -> torch.Tensor:
    R, K = q.shape
    x = q.double()
    if s.numel() == 1:
        return x * s.double().reshape(())
    if s.shape == (R, 1):
        return x * s.double()
    full = s.double().repeat_interleave(br, 0).repeat_interleave(128, 1)[:R, :K]
    return x * full


GRANULARITIES = ["tensor", "row", "block"]
SHAPES = [(1, 129, 144), (7, 200, 784), (16, 4096, 4096), (65, 130, 912), (257, 384, 2064)]
OUT_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", list(OUT_TOL))
def test_fp8_gemm_cuda_vs_float64(gran, shape, out_dtype):
    M, N, K = shape
    g = torch.Generator(device="cuda").manual_seed(M * 7 + N * 3 + K)
    x = torch.randn(M, K, device="cuda", generator=g)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.05
    block_a = (1, 128) if gran == "block" else None
    block_b = (128, 128) if gran == "block" else None
    a, sa = _quantize(x, block_a, gran == "row")
    b, sb = _quantize(w, block_b, gran == "row")
    bias = torch.randn(N, device="cuda", generator=g)
    ref = _dequant(a, sa, 1) @ _dequant(b, sb, 128).T + bias.double()
    with poisoned_outputs():
        out = torch.ops.bitpress.fp8_gemm(a, b, sa, sb, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < OUT_TOL[out_dtype], err
    if fp8_reference is not None and hasattr(fp8_reference, "fp8_gemm"):
        r = fp8_reference.fp8_gemm(
            a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), bias.cpu(), out_dtype=out_dtype
        )
        err_r = ((out.double().cpu() - r.double()).norm() / r.double().norm()).item()
        assert err_r < OUT_TOL[out_dtype], err_r
    if gran != "block" and out_dtype == torch.bfloat16 and N % 16 == 0:  # _scaled_mm needs it
        sm = torch._scaled_mm(
            a,
            b.T,
            scale_a=sa.reshape(-1, 1) if gran == "row" else sa.reshape(()),
            scale_b=sb.reshape(1, -1) if gran == "row" else sb.reshape(()),
            bias=bias.to(out_dtype),
            out_dtype=out_dtype,
        )
        assert ((out.double() - sm.double()).norm() / sm.double().norm()).item() < 1e-2


@pytest.mark.gpu
@needs_hopper
def test_fp8_gemm_cuda_strided_inputs_and_k0():
    M, N, K = 33, 257, 512
    x = torch.randn(M, 2 * K, device="cuda")[:, ::2]
    a, sa = _quantize(x.contiguous(), None, True)
    a_view = torch.empty(M, K + 16, dtype=torch.float8_e4m3fn, device="cuda")[:, 16:]
    a_view.copy_(a)
    b, sb = _quantize(torch.randn(N, K, device="cuda"), None, True)
    out = torch.ops.bitpress.fp8_gemm(a_view, b, sa, sb, None, torch.float32)
    ref = _dequant(a, sa, 1) @ _dequant(b, sb, 128).T
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    a0 = torch.empty(M, 0, dtype=torch.float8_e4m3fn, device="cuda")
    b0 = torch.empty(N, 0, dtype=torch.float8_e4m3fn, device="cuda")
    one = torch.ones(1, device="cuda")
    bias = torch.randn(N, device="cuda")
    out0 = torch.ops.bitpress.fp8_gemm(a0, b0, one, one, bias, torch.float32)
    assert torch.equal(out0, bias.expand(M, N))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("K", [1, 17, 40, 300])
def test_fp8_gemm_cuda_k_not_multiple_of_16(K):
    """The kernel copies rows in 16-byte chunks; the glue zero-pads a and b to K % 16 == 0 (exact,
    block scales unchanged)."""
    M, N = 5, 131
    a, sa = _quantize(torch.randn(M, K, device="cuda"), (1, 128), False)
    b, sb = _quantize(torch.randn(N, K, device="cuda"), (128, 128), False)
    out = torch.ops.bitpress.fp8_gemm(a, b, sa, sb, None, torch.float32)
    ref = _dequant(a, sa, 1) @ _dequant(b, sb, 128).T
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.gpu
@needs_hopper
def test_fp8_gemm_cuda_bad_inputs():
    a = torch.zeros(4, 32, device="cuda").to(torch.float8_e4m3fn)
    b = torch.zeros(8, 32, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones(1, device="cuda")
    with pytest.raises(RuntimeError, match=r"^fp8_gemm: scale_b must be"):
        torch.ops.bitpress.fp8_gemm(a, b, one, torch.ones(3, 1, device="cuda"), None, None)
    with pytest.raises((RuntimeError, TypeError), match=r"^fp8_gemm: b must be float8_e4m3fn"):
        torch.ops.bitpress.fp8_gemm(a, b.half(), one, one, None, None)
    with pytest.raises((RuntimeError, TypeError), match=r"^fp8_gemm: out_dtype must be"):
        torch.ops.bitpress.fp8_gemm(a, b, one, one, None, torch.int32)
