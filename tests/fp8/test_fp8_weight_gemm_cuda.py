"""fp8_weight_gemm on CUDA (csrc/fp8/fp8_weight_gemm_sm80.cu and its glue, *_cuda_torch.cpp).

Without a GPU: the machine code of every kernel variant for sm_80 and sm_90a, compiled here with
nvcc from the torch-free source (tensor-core mma, cp.async pipeline, shared loads, the E4M3 decode
instructions, no local memory, register budget), and, when bitpress._C is a CUDA build, the same
kernels inside it and the registration of the CUDA implementation. The decode, the index math
and a whole-kernel emulation run on the CPU in tests/cpp/test_fp8_mma.cpp (ctest). With a GPU
(``gpu`` marker): the kernel path and the cuBLAS path against the float64 reference on odd
shapes, every scale layout, bias, strided and 3-D x, K % 16 != 0, NaN weights, CUDA graph
capture, determinism.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import fp8_cubin
import pytest
import torch

from bitpress._core import ext as _ext
from bitpress.testing import cuobjdump, extension_resource_usage, extension_sass, rel_err

SOURCE = "fp8_weight_gemm_sm80.cu"
KERNELS = {"f16": "sm80_f16_fp8_weight_gemm_kernel", "bf16": "sm80_bf16_fp8_weight_gemm_kernel"}
M_TILES = (1, 2, 4)
# Pipeline depth per variant (TileConfig<MT>::kStages in the source).
STAGES = {1: 4, 2: 4, 4: 3}

needs_nvcc = pytest.mark.skipif(not fp8_cubin.available(), reason="nvcc or cuobjdump is missing")
needs_cuda_build = pytest.mark.skipif(
    not _ext.with_cuda() or cuobjdump() is None,
    reason="bitpress._C was built without CUDA kernels, or cuobjdump is missing",
)


def _variant(funcs: dict, mt: int, block: bool) -> str:
    tag = f"ILi{mt}ELb{int(block)}E"
    hits = [k for k in funcs if tag in k]
    assert len(hits) == 1, (mt, block, sorted(funcs))
    return hits[0]


# ------------------------------------------------------------------------------------------
# Machine code (no GPU needed)
# ------------------------------------------------------------------------------------------


@needs_nvcc
@pytest.mark.parametrize("arch", fp8_cubin.ARCHS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_gemm_kernel_sass(arch, dtype):
    funcs = fp8_cubin.sass(SOURCE, arch, KERNELS[dtype])
    assert len(funcs) == 2 * len(M_TILES), sorted(funcs)  # x (tensor/channel, block)
    for mt in M_TILES:
        for block in (False, True):
            sass = funcs[_variant(funcs, mt, block)]
            hmma = [i for i in sass if i.startswith("HMMA")]
            # 2 k16 steps x 8 n8-blocks x MT m-tiles per warp and stage, fp32 accumulation.
            assert len(hmma) >= 16 * mt, (mt, block, len(hmma))
            want = "HMMA.16816.F32.BF16" if dtype == "bf16" else "HMMA.16816.F32"
            assert set(hmma) == {want}, sorted(set(hmma))
            assert any(i.startswith("LDGSTS") for i in sass), "cp.async global -> shared"
            assert sass.count("LDS.64") >= 8, "W: one 64-bit shared load per n8-block"
            assert sass.count("LDS.128") >= 2 * mt, "x: one 128-bit shared load per row"
            assert not any(i.startswith("LDSM") for i in sass), "no ldmatrix: A by LDS.128"
            # The decode: byte permutes and one packed multiply per B register (fp16: HMUL2;
            # bf16: fma.rn.bf16x2 on sm_80, which ptxas may turn into HMUL2.BF16 on sm_90).
            assert sass.count("PRMT") >= 32, sass.count("PRMT")
            mul = [i for i in sass if i.startswith(("HMUL2", "HFMA2"))]
            assert len(mul) >= 32, len(mul)
            if dtype == "bf16":
                assert all("BF16" in i for i in mul), sorted(set(mul))
            else:
                assert not any("BF16" in i for i in mul), sorted(set(mul))
            assert not any(i.startswith(("LDL", "STL")) for i in sass), f"local memory {mt}"
            if block:  # the block scale: one FFMA per accumulator and stage
                assert sass.count("FFMA") >= 32 * mt, sass.count("FFMA")


@needs_nvcc
@pytest.mark.parametrize("arch", fp8_cubin.ARCHS)
def test_gemm_kernel_resources(arch):
    for name in KERNELS.values():
        usage = fp8_cubin.resources(SOURCE, arch, name)
        assert len(usage) == 2 * len(M_TILES), sorted(usage)
        for fn, u in usage.items():
            assert u.stack == 0 and u.local == 0, (fn, u)
            assert u.registers <= 255, (fn, u)
            if "ILi1E" in fn:  # launch_bounds(256, 2): two blocks per SM
                assert u.registers <= 128, (fn, u)


@needs_nvcc
@pytest.mark.parametrize("arch", fp8_cubin.ARCHS)
def test_helper_kernels_have_no_local_memory(arch):
    """The split-K reduction (fp16, bf16) and the dense dequantization of the large-M path (fp32,
    fp16, bf16 out: one 16-byte load of codes per thread, 16-byte stores)."""
    for name, count in (("fp8_weight_gemm_reduce_kernel", 2), ("fp8_weight_dequantize_kernel", 3)):
        usage = fp8_cubin.resources(SOURCE, arch, name)
        assert len(usage) == count, sorted(usage)
        for fn, u in usage.items():
            assert u.stack == 0 and u.local == 0, (fn, u)
    for fn, sass in fp8_cubin.sass(SOURCE, arch, "fp8_weight_dequantize_kernel").items():
        assert "LDG.E.128.CONSTANT" in sass or "LDG.E.128" in sass, (fn, sorted(set(sass)))
        assert any(i.startswith("STG.E.128") for i in sass), fn


@needs_nvcc
@pytest.mark.parametrize("arch", fp8_cubin.ARCHS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("mt", M_TILES)
def test_gemm_pipeline_waits(arch, dtype, mt):
    """The cp.async pipeline as compiled: kStages - 1 commit groups before the loop; in the loop
    one wait for "at most kStages - 2 groups pending" (DEPBAR.LE SB0, kStages - 2), a barrier
    before the refill's cp.async and the first shared-memory read, one commit; then a full drain
    before the k-warp reduction reuses the stages' shared memory."""
    funcs = fp8_cubin.sass_lines(SOURCE, arch)
    for block in (False, True):
        sass = funcs[_variant({k: 0 for k in funcs if KERNELS[dtype] in k}, mt, block)]
        st = STAGES[mt]
        deps = [i for i in sass if "DEPBAR" in i]
        assert deps == ["LDGDEPBAR"] * (st - 1) + [
            f"DEPBAR.LE SB0, {st - 2:#x}",
            "LDGDEPBAR",
            "DEPBAR.LE SB0, 0x0",
        ], deps
        wait = sass.index(f"DEPBAR.LE SB0, {st - 2:#x}")

        def first(prefix, start, sass=sass):
            return next(i for i in range(start, len(sass)) if sass[i].startswith(prefix))

        barrier = first("BAR.SYNC", wait)
        assert barrier < first("LDGSTS", wait), "refill before every warp passed the wait"
        assert barrier < first("LDS", wait), "shared-memory reads before the barrier"
        drain = sass.index("DEPBAR.LE SB0, 0x0")
        assert first("BAR.SYNC", drain) < first("STS", drain), "reduction before the barrier"


@needs_cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_extension_ships_the_kernels(arch):
    """A CUDA build of bitpress._C holds every variant, without local memory."""
    for name in KERNELS.values():
        funcs = extension_sass(name, arch)
        assert len(funcs) == 2 * len(M_TILES), sorted(funcs)
        for fn, u in extension_resource_usage(name, arch).items():
            assert u.stack == 0 and u.local == 0, (fn, u)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bitpress::fp8_weight_gemm", "CUDA")


def test_glue_guarded_and_stubbed():
    """The CUDA glue compiles only with BITPRESS_WITH_CUDA (a CPU build must not see it) and the
    stub file defines the entry point the kernel library exports."""
    glue = open(os.path.join(fp8_cubin.CSRC, "fp8", "fp8_weight_gemm_cuda_torch.cpp")).read()
    code = re.sub(r"//[^\n]*", "", glue).strip()
    assert code.startswith("#if defined(BITPRESS_WITH_CUDA)") and code.endswith("#endif"), code[:80]
    assert "TORCH_LIBRARY_IMPL(bitpress, CUDA, m)" in glue
    assert "prepare_fp8_weight_gemm" in glue  # the one authoritative check of the op
    stub = open(os.path.join(fp8_cubin.CSRC, "fp8", "fp8_weight_gemm_cuda_stubs.cpp")).read()
    assert "Status fp8_weight_gemm_cuda(const Fp8WeightGemmCudaParams&, void*)" in stub
    assert "Status fp8_weight_dequantize_cuda(const Fp8WeightDequantizeCudaParams&, void*)" in stub


# ------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------

# Relative error against float64: the products are exact, the sums fp32, the output rounded once
# to x's dtype (the cuBLAS path rounds W * s once more to x's dtype).
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def fp8_ref():
    return pytest.importorskip("bitpress.fp8.reference")


@pytest.fixture(scope="module")
def fp8_ops():
    return pytest.importorskip("bitpress.fp8.ops")


def _weight(N, K, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    if kind == "tensor":
        s = torch.tensor([0.02])
    elif kind == "channel":
        s = torch.rand(N, 1, generator=g) * 0.02 + 0.001
    else:
        s = torch.rand((N + 127) // 128, (K + 127) // 128, generator=g) * 0.02 + 0.001
    return w.cuda(), s.float().cuda()


def _check(fp8_ref, fp8_ops, x, w, s, bias=None, tol=None):
    with torch.no_grad():
        out = fp8_ops.fp8_weight_gemm(x, w, s, bias, backend="cuda")
    ref = fp8_ref.fp8_weight_gemm(x.double(), w, s, None if bias is None else bias.double())
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert not out.isnan().any()
    assert rel_err(out.double(), ref.double()) < (tol or TOLERANCE[x.dtype])
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("M", [1, 7, 16, 17, 33, 64, 65, 300])
@pytest.mark.parametrize("N,K", [(1, 16), (130, 272), (4096, 4096), (257, 1000)])
def test_against_reference(fp8_ref, fp8_ops, dtype, kind, M, N, K):
    w, s = _weight(N, K, kind)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    _check(fp8_ref, fp8_ops, x, w, s)


@pytest.mark.gpu
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 40, 100])
def test_bias(fp8_ref, fp8_ops, bias_dtype, M):
    w, s = _weight(200, 512, "block")
    x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(200, device="cuda", dtype=bias_dtype)
    _check(fp8_ref, fp8_ops, x, w, s, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_strided_3d_and_odd_offsets(fp8_ref, fp8_ops, dtype):
    K, N = 256, 130
    w, s = _weight(N, K, "channel")
    xt = torch.randn(K, 9, device="cuda", dtype=dtype).t()
    _check(fp8_ref, fp8_ops, xt, w, s)
    _check(fp8_ref, fp8_ops, torch.randn(2, 3, K, device="cuda", dtype=dtype), w, s)
    big = torch.randn(4, K + 1, device="cuda", dtype=dtype)
    _check(fp8_ref, fp8_ops, big[:, 1:], w, s)  # rows not 16-byte aligned: copied
    wbig = torch.zeros(N, K + 16, dtype=torch.float8_e4m3fn, device="cuda")
    wbig[:, 16:] = w
    _check(fp8_ref, fp8_ops, torch.randn(3, K, device="cuda", dtype=dtype), wbig[:, 16:], s)


@pytest.mark.gpu
@pytest.mark.parametrize("K", [1, 15, 129, 1000 + 3])
def test_k_not_multiple_of_16(fp8_ref, fp8_ops, K):
    for kind in ("channel", "block"):
        w, s = _weight(70, K, kind)
        _check(fp8_ref, fp8_ops, torch.randn(5, K, device="cuda", dtype=torch.float16), w, s)


@pytest.mark.gpu
def test_float32_x_goes_to_cublas(fp8_ref, fp8_ops):
    w, s = _weight(65, 512, "block")
    x = torch.randn(3, 512, device="cuda")
    _check(fp8_ref, fp8_ops, x, w, s, torch.randn(65, device="cuda"))


@pytest.mark.gpu
def test_nan_weight_gives_nan_column(fp8_ops):
    w, s = _weight(130, 256, "channel")
    w.view(torch.uint8)[5, 100] = 0x7F
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    out = fp8_ops.fp8_weight_gemm(x, w, s, backend="cuda")
    assert out[:, 5].isnan().all() and not out[:, :5].isnan().any()


@pytest.mark.gpu
def test_empty_shapes(fp8_ops):
    w, s = _weight(64, 128, "channel")
    x = torch.randn(0, 128, device="cuda", dtype=torch.float16)
    assert fp8_ops.fp8_weight_gemm(x, w, s, backend="cuda").shape == (0, 64)
    w0, s0 = _weight(64, 0, "channel")
    b = torch.randn(64, device="cuda", dtype=torch.float16)
    out = fp8_ops.fp8_weight_gemm(torch.randn(2, 0, device="cuda", dtype=torch.float16), w0, s0, b)
    assert torch.equal(out, b.expand(2, 64))


_THRESHOLD_SCRIPT = """
import torch
from bitpress.fp8 import ops, reference
from bitpress.testing import rel_err
w = (torch.randn(200, 512) * 64).clamp(-448, 448).to(torch.float8_e4m3fn).cuda()
s = (torch.rand(200, 1) * 0.02 + 0.001).cuda()
for M in (1, 65, 300):
    x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
    out = ops.fp8_weight_gemm(x, w, s, backend="cuda")
    ref = reference.fp8_weight_gemm(x.double(), w, s)
    assert rel_err(out.double(), ref.double()) < 1e-2, (M, rel_err(out.double(), ref.double()))
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("max_m", ["0", "1000"])
def test_threshold_env_var(max_m):
    """BITPRESS_FP8_CUDA_MAX_M=0 sends every M to cuBLAS, 1000 every M here to the kernel."""
    env = dict(os.environ, BITPRESS_FP8_CUDA_MAX_M=max_m)
    res = subprocess.run(
        [sys.executable, "-c", _THRESHOLD_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["channel", "block"])
def test_cuda_graph_capture(fp8_ref, fp8_ops, kind):
    w, s = _weight(4096, 4096, kind)  # split-K at M = 1
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    bias = torch.randn(4096, device="cuda", dtype=torch.float16)
    fp8_ops.fp8_weight_gemm(x, w, s, bias, backend="cuda")  # warm-up (device queries, attributes)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fp8_ops.fp8_weight_gemm(x, w, s, bias, backend="cuda")
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    ref = fp8_ref.fp8_weight_gemm(x.double(), w, s, bias.double())
    assert rel_err(out.double(), ref.double()) < TOLERANCE[torch.float16]


@pytest.mark.gpu
def test_deterministic(fp8_ops):
    w, s = _weight(130, 4096, "block")
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    a = fp8_ops.fp8_weight_gemm(x, w, s, backend="cuda")
    assert torch.equal(a, fp8_ops.fp8_weight_gemm(x, w, s, backend="cuda"))


@pytest.mark.gpu
def test_bad_input(fp8_ops):
    w, s = _weight(70, 256, "channel")
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    op = torch.ops.bitpress.fp8_weight_gemm
    with pytest.raises(RuntimeError, match=r"fp8_weight_gemm: w must be on the same device"):
        op(x, w.cpu(), s)
    with pytest.raises(RuntimeError, match=r"fp8_weight_gemm: w_scale must be"):
        op(x, w, s[:5])
    with pytest.raises(TypeError, match=r"fp8_weight_gemm: w must be float8_e4m3fn"):
        op(x, w.view(torch.uint8), s)
