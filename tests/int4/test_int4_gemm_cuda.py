"""int4_gemm on CUDA (csrc/int4/int4_gemm_sm80.cu, csrc/int4/int4_gemm_cuda_torch.cpp).

Without a GPU: the machine code of every shipped kernel variant for sm_80 and sm_90a (tensor-core
mma, ldmatrix, cp.async, no local memory, register budget), and the registration of the CUDA
implementation. The index math and the dequantization are tested on the CPU by
tests/cpp/test_int4_mma.cpp (ctest). With a GPU (``gpu`` marker): the kernel path and the cuBLAS
path against the float64 reference on odd shapes, act-order, groups, zero points, bias, strided
and 3-D x, CUDA graph capture, and bad input.
"""

from __future__ import annotations

import os
import re
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
from bitpress.testing import cuobjdump, extension_resource_usage, extension_sass, rel_err

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
