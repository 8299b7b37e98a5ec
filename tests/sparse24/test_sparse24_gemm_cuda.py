"""sparse24_gemm on CUDA (csrc/sparse24/sparse24_gemm_sm80.cu, csrc/sparse24/
sparse24_gemm_cuda_torch.cpp), layout Sparse24Layout.MMA.

Without a GPU: the kernel source is compiled with nvcc for sm_80 and sm_90a (seconds; no torch)
and its machine code read: sparse tensor-core mma (HMMA.SP.16832.F32, .BF16 for bf16) in every
shipped variant, ldmatrix and cp.async, no local memory (STACK 0, LOCAL 0, no LDL/STL), the
register budget of two 256-thread blocks per SM. The index math and the kernel's data flow are
emulated on the CPU by tests/cpp/test_sparse24_mma.cpp (ctest). With a GPU (``gpu`` marker): the
kernel and the cuBLAS path against a float64 reference on odd shapes, bias of each dtype, 3-D and
strided x, poisoned outputs, CUDA graph capture, and the errors for float32 x and layout ROW.
"""

from __future__ import annotations

import os

import pytest
import torch

from bitpress.sparse24 import layout_mma as L
from bitpress.testing import compile_cuda, cuobjdump, nvcc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "csrc", "sparse24", "sparse24_gemm_sm80.cu")
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
GEMM_KERNELS = {"f16": "sm80_f16_sparse24_gemm_kernel", "bf16": "sm80_bf16_sparse24_gemm_kernel"}
M_TILES = (1, 2, 4, 8)
MAX_REGS = 65536 // (2 * 256)  # __launch_bounds__(256, 2)


needs_nvcc = pytest.mark.skipif(
    nvcc() is None or cuobjdump() is None, reason="nvcc or cuobjdump is missing"
)


def _cubin(arch: str) -> tuple[dict[str, list[str]], dict]:
    return compile_cuda(SOURCE, ARCHS[arch])


def _variants(funcs: dict, name: str) -> dict[int, str]:
    out = {}
    for mt in M_TILES:
        hits = [k for k in funcs if name in k and f"ILi{mt}E" in k]
        assert len(hits) == 1, (name, mt, sorted(funcs))
        out[mt] = hits[0]
    return out


@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_gemm_kernel_sass(arch, dtype):
    funcs, _ = _cubin(arch)
    for mt, fn in _variants(funcs, GEMM_KERNELS[dtype]).items():
        sass = funcs[fn]
        want = "HMMA.SP.16832.F32.BF16" if dtype == "bf16" else "HMMA.SP.16832.F32"
        hmma = [i for i in sass if i.startswith("HMMA")]
        # 2 k-tiles (selectors 0, 1) x MT m8 tiles per warp and pair, all sparse, fp32 accumulation.
        assert len(hmma) >= 2 * mt and all(i == want for i in hmma), (mt, sorted(set(hmma)))
        assert sum(i.startswith("LDSM.16.M88.4") for i in sass) >= 2 * mt, mt  # B by ldmatrix.x4
        assert any(i.startswith("LDGSTS.E.BYPASS.128") for i in sass), mt  # cp.async.cg 16 B
        assert not any(i.startswith(("LDL", "STL")) for i in sass), mt


@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
def test_no_local_memory_and_register_budget(arch):
    funcs, res = _cubin(arch)
    assert len(res) == len(funcs) == 2 * len(M_TILES) + 3, sorted(res)  # + 2 reduce, decompress
    for fn, r in res.items():
        assert r.stack == 0 and r.local == 0, (fn, r)
        assert not any(i.startswith(("LDL", "STL")) for i in funcs[fn]), fn
        if "sparse24_gemm_kernel" in fn:
            assert r.registers <= MAX_REGS, (fn, r)


def test_source_named_for_its_archs():
    # `_sm80.cu`: built for every listed arch >= 8.0 (setup.py / CMake), sm_90a included.
    assert os.path.basename(SOURCE).endswith("_sm80.cu")
    with open(SOURCE) as f:
        text = f.read()
    # Torch-free (a .cu that includes torch takes ~90 s to compile instead of seconds).
    assert "mma_sp_m16n8k32" in text
    assert "#include <torch" not in text and "#include <ATen" not in text


# ------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # one output rounding, fp32 accumulation
NIBBLES = [a | b << 2 for a in range(4) for b in range(a + 1, 4)]


def _weights(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    nib = torch.tensor(NIBBLES, dtype=torch.uint8)[torch.randint(0, 6, (n, k // 4), generator=g)]
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    values = torch.randn(n, k // 2, generator=g).to(dtype)
    dense = torch.zeros(n, k, dtype=torch.float64)
    cols = 4 * torch.arange(k // 4)
    dense.scatter_(1, cols + (nib & 3).long(), values[:, 0::2].double())
    dense.scatter_(1, cols + (nib >> 2).long(), values[:, 1::2].double())
    return values, meta, dense


def _op():
    if not hasattr(torch.ops.bitpress, "sparse24_gemm"):
        pytest.skip("torch.ops.bitpress.sparse24_gemm is not defined in this build")
    return torch.ops.bitpress.sparse24_gemm


def _rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 16, 32),
        (1, 4096, 4096),
        (7, 48, 96),
        (16, 80, 224),
        (17, 64, 416),
        (33, 128, 64),
        (64, 16, 1024),
        (65, 48, 160),
        (300, 96, 544),
    ],
)
@pytest.mark.parametrize("bias", [None, "x", "f32"])
def test_gemm_matches_reference(dtype, m, n, k, bias):
    op = _op()
    from bitpress.testing import poisoned_outputs

    values, meta, dense = _weights(n, k, dtype, seed=m * 7 + n + k)
    vm, mm = L.to_mma(values, meta)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    b = None if bias is None else torch.randn(n, dtype=dtype if bias == "x" else torch.float32)
    ref = x.double() @ dense.T + (0 if b is None else b.double())
    dev = "cuda"
    with poisoned_outputs():
        out = op(x.to(dev), vm.to(dev), mm.to(dev), 1, None if b is None else b.to(dev))
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.gpu
def test_gemm_3d_strided_x_and_graph_capture():
    op = _op()
    values, meta, dense = _weights(64, 256, torch.bfloat16, seed=1)
    vm, mm = (t.cuda() for t in L.to_mma(values, meta))
    xb = torch.randn(2, 3, 512, dtype=torch.bfloat16, device="cuda")
    x = xb[..., 1:257]  # row stride 512, odd offset: copied to an aligned matrix by the glue
    out = op(x, vm, mm, 1, None)
    ref = x.double().cpu() @ dense.T
    assert out.shape == (2, 3, 64) and _rel(out.cpu(), ref) < TOLERANCE[torch.bfloat16]
    xs = torch.randn(4, 256, dtype=torch.bfloat16, device="cuda")
    op(xs, vm, mm, 1, None)  # warm-up: the smem opt-in happens outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = op(xs, vm, mm, 1, None)
    xs.copy_(torch.randn_like(xs))
    g.replay()
    torch.cuda.synchronize()
    assert _rel(y.cpu(), xs.double().cpu() @ dense.T) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gemm_errors():
    op = _op()
    values, meta, _ = _weights(32, 64, torch.float16, seed=2)
    vm, mm = (t.cuda() for t in L.to_mma(values, meta))
    x = torch.randn(3, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match="sparse24_gemm: x must be float16 or bfloat16 on CUDA"):
        op(x.float(), vm, mm, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_gemm: layout must be 1"):
        op(x, vm, mm, 0, None)
    with pytest.raises(TypeError, match="sparse24_gemm: values must have x's dtype"):
        op(x, vm.bfloat16(), mm, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_gemm: values.size\(1\) must be 64"):
        op(torch.randn(3, 128, device="cuda", dtype=torch.float16), vm, mm, 1, None)
    with pytest.raises(
        RuntimeError, match=r"sparse24_gemm: x.size\(-1\) \(K\) must be a multiple of 32"
    ):
        op(torch.randn(3, 72, device="cuda", dtype=torch.float16), vm[:, :36], mm, 1, None)
    with pytest.raises(
        RuntimeError, match=r"sparse24_gemm: values.size\(0\) \(N\) must be a multiple"
    ):
        op(x, vm[:24], mm, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_gemm: meta.size\(1\) must be 1"):
        op(x, vm, torch.cat([mm, mm], 1), 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_gemm: bias.size\(0\) must be 32"):
        op(x, vm, mm, 1, torch.zeros(31, device="cuda"))


@pytest.mark.gpu
def test_public_op_and_opcheck():
    """bitpress.ops.sparse24_gemm with layout MMA on CUDA tensors reaches this kernel; opcheck."""
    _op()
    from bitpress import ops
    from bitpress.sparse24.layout import Sparse24Layout

    values, meta, dense = _weights(64, 128, torch.float16, seed=3)
    vm, mm = (t.cuda() for t in L.to_mma(values, meta))
    x = torch.randn(5, 128, device="cuda", dtype=torch.float16)
    out = ops.sparse24_gemm(x, vm, mm, layout=Sparse24Layout.MMA)
    assert _rel(out.cpu(), x.double().cpu() @ dense.T) < TOLERANCE[torch.float16]
    torch.library.opcheck(torch.ops.bitpress.sparse24_gemm, (x, vm, mm, 1, None))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 200])  # the kernel path and the cuBLAS path
def test_torch_compile_fullgraph(m):
    op = _op()
    values, meta, dense = _weights(48, 96, torch.bfloat16, seed=4)
    vm, mm = (t.cuda() for t in L.to_mma(values, meta))
    bias = torch.randn(48, device="cuda")

    @torch.compile(fullgraph=True)
    def f(x):
        return op(x, vm, mm, 1, bias) * 2

    x = torch.randn(m, 96, device="cuda", dtype=torch.bfloat16)
    ref = (x.double().cpu() @ dense.T + bias.double().cpu()) * 2
    assert _rel(f(x).cpu(), ref) < TOLERANCE[torch.bfloat16]
