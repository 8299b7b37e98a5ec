"""sparse24_int4_gemm on CUDA (csrc/sparse24/sparse24_int4_gemm_sm80.cu, csrc/sparse24/
sparse24_int4_gemm_cuda_torch.cpp), layout Sparse24Layout.MMA (bitpress.sparse24.layout_mma_int4).

Without a GPU: the kernel source is compiled with nvcc for sm_80 and sm_90a (seconds; no torch)
and its machine code read: sparse tensor-core mma (HMMA.SP.16832.F32, .BF16 for bf16) in every
variant, the register decode (LOP3 and packed half ops, no conversion instructions per code),
ldmatrix and cp.async, no local memory (STACK 0, LOCAL 0, no LDL/STL), the register budget of two
256-thread blocks per SM. The decode, index maps and the kernel's data flow are emulated on the
CPU by tests/cpp/test_sparse24_int4_mma.cpp (ctest). With a GPU (``gpu`` marker): the kernel
against the float64 reference on odd shapes, symmetric and asymmetric, every scale / zero / bias
dtype, group sizes, 3-D and strided x, poisoned outputs, CUDA graph capture, torch.compile, and
the errors of the glue.
"""

from __future__ import annotations

import os

import pytest
import torch

from bitpress.sparse24 import layout_mma_int4 as LI
from bitpress.sparse24 import reference
from bitpress.sparse24.layout import pack_qvalues
from bitpress.testing import compile_cuda, cuobjdump, nvcc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "csrc", "sparse24", "sparse24_int4_gemm_sm80.cu")
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
GEMM_KERNELS = {
    "f16": "sm80_f16_sparse24_int4_gemm_kernel",
    "bf16": "sm80_bf16_sparse24_int4_gemm_kernel",
}
M_TILES = (1, 2, 4)
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
        # 2 pairs x 2 k-tiles (selectors 0, 1) x MT m8 tiles per warp and stage, all sparse.
        assert len(hmma) >= 4 * mt and all(i == want for i in hmma), (mt, sorted(set(hmma)))
        assert sum(i.startswith("LDSM.16.M88.4") for i in sass) >= 4 * mt, mt  # B by ldmatrix.x4
        assert any(i.startswith("LDGSTS.E.BYPASS.128") for i in sass), mt  # cp.async.cg 16 B
        # The decode: one LOP3 per A register (mask + magic exponent), then two packed half ops
        # (fp16: HADD2 + HFMA2; bf16 on sm_80: two HFMA2.BF16_V2) per register, 4 registers x
        # 4 k-tiles per warp and stage: no per-code conversion instruction.
        assert sum(i.startswith("LOP3") for i in sass) >= 16, mt
        if dtype == "bf16":
            packed = [i for i in sass if i.startswith("HFMA2.BF16")]
        else:
            packed = [i for i in sass if i.startswith(("HFMA2", "HADD2")) and "F32" not in i]
        assert len(packed) >= 2 * 16, (mt, len(packed))
        assert not any(i.startswith(("LDL", "STL")) for i in sass), mt


@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
def test_no_local_memory_and_register_budget(arch):
    funcs, res = _cubin(arch)
    assert len(res) == len(funcs) == 2 * len(M_TILES) + 2, sorted(res)  # + 2 reductions
    for fn, r in res.items():
        assert r.stack == 0 and r.local == 0, (fn, r)
        assert not any(i.startswith(("LDL", "STL")) for i in funcs[fn]), fn
        if "sparse24_int4_gemm_kernel" in fn:
            assert r.registers <= MAX_REGS, (fn, r)


def test_source_named_for_its_archs():
    # `_sm80.cu`: built for every listed arch >= 8.0 (setup.py / CMake), sm_90a included.
    assert os.path.basename(SOURCE).endswith("_sm80.cu")
    with open(SOURCE) as f:
        text = f.read()
    assert "mma_sp_m16n8k32" in text and "sparse24_int4_mma_decode" in text
    assert "#include <torch" not in text and "#include <ATen" not in text


# ------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------

TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}  # w and y rounded to 16 bits
NIBBLES = [a | b << 2 for a in range(4) for b in range(a + 1, 4)]


def _weights(n, k, group_size, seed, *, asym=False, sdtype=torch.float16, zdtype=torch.float16):
    """Interchange tensors (qvalues, meta, scales, zeros) of a random 2:4 + INT4 weight."""
    g = torch.Generator().manual_seed(seed)
    nib = torch.tensor(NIBBLES, dtype=torch.uint8)[torch.randint(0, 6, (n, k // 4), generator=g)]
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    qvalues = pack_qvalues(torch.randint(0, 16, (n, k // 2), generator=g))
    groups = 1 if group_size == -1 else -(-k // group_size)
    scales = (0.01 + 0.02 * torch.rand(groups, n, generator=g)).to(sdtype)
    zeros = None
    if asym:
        z = torch.randint(0, 16, (groups, n), generator=g).float()
        z[:, 1::3] += 0.5  # float zero points too
        zeros = z.to(zdtype)
    return qvalues, meta, scales, zeros


def _op():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bitpress::sparse24_int4_gemm", "CUDA"):
        pytest.skip("the CUDA kernel of sparse24_int4_gemm is not compiled in")
    return torch.ops.bitpress.sparse24_int4_gemm


def _rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _ref(x, qvalues, meta, scales, zeros, group_size, bias=None):
    w = reference.int4_dense(qvalues, meta, scales, zeros, group_size)
    y = x.double().cpu() @ w.T
    return y if bias is None else y + bias.double().cpu()


def _cuda(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "m,n,k,group_size",
    [
        (1, 16, 32, -1),
        (1, 4096, 4096, 128),
        (7, 48, 96, 32),
        (16, 80, 288, 96),
        (17, 64, 544, 128),
        (33, 128, 1024, 64),
        (300, 96, 544, -1),
    ],
)
@pytest.mark.parametrize("asym", [False, True])
def test_gemm_matches_reference(dtype, m, n, k, group_size, asym):
    op = _op()
    from bitpress.testing import poisoned_outputs

    qv, meta, s, z = _weights(n, k, group_size, m * 7 + n + k, asym=asym, sdtype=dtype)
    qm, mm = LI.to_mma_int4(qv, meta)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    ref = _ref(x, qv, meta, s, z, group_size)
    with poisoned_outputs():
        out = op(*_cuda(x, qm, mm, s, z), group_size, 1, None)
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [torch.float32, torch.bfloat16])
def test_group_constant_and_bias_dtypes(sdtype, zdtype, bias):
    op = _op()
    qv, meta, s, z = _weights(64, 512, 128, 5, asym=True, sdtype=sdtype, zdtype=zdtype)
    qm, mm = LI.to_mma_int4(qv, meta)
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    b = torch.randn(64).to(bias)
    out = op(*_cuda(x, qm, mm, s, z), 128, 1, b.cuda())
    assert _rel(out.cpu(), _ref(x, qv, meta, s, z, 128, b)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gemm_3d_strided_x_and_graph_capture():
    op = _op()
    qv, meta, s, _ = _weights(64, 256, 128, 1, sdtype=torch.bfloat16)
    qm, mm, sc = _cuda(*LI.to_mma_int4(qv, meta), s)
    xb = torch.randn(2, 3, 512, dtype=torch.bfloat16, device="cuda")
    x = xb[..., 1:257]  # row stride 512, odd offset: copied to an aligned matrix by the glue
    out = op(x, qm, mm, sc, None, 128, 1, None)
    assert out.shape == (2, 3, 64)
    assert _rel(out.cpu(), _ref(x, qv, meta, s, None, 128)) < TOLERANCE[torch.bfloat16]
    xs = torch.randn(4, 256, dtype=torch.bfloat16, device="cuda")
    op(xs, qm, mm, sc, None, 128, 1, None)  # warm-up: the smem opt-in happens outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = op(xs, qm, mm, sc, None, 128, 1, None)
    xs.copy_(torch.randn_like(xs))
    g.replay()
    torch.cuda.synchronize()
    assert _rel(y.cpu(), _ref(xs, qv, meta, s, None, 128)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gemm_errors():
    op = _op()
    qv, meta, s, _ = _weights(32, 64, 32, 2)
    qm, mm, sc = _cuda(*LI.to_mma_int4(qv, meta), s)
    x = torch.randn(3, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(
        TypeError, match="sparse24_int4_gemm: x must be float16 or bfloat16 on CUDA"
    ):
        op(x.float(), qm, mm, sc, None, 32, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_int4_gemm: layout must be 1"):
        op(x, qm, mm, sc, None, 32, 0, None)
    with pytest.raises(RuntimeError, match=r"sparse24_int4_gemm: qvalues must be"):
        op(x, qm.float(), mm, sc, None, 32, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_int4_gemm: qvalues.size\(1\) must be 4"):
        op(x, qm[:, :2], mm, sc, None, 32, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_int4_gemm: group_size must be"):
        op(x, qm, mm, sc, None, 16, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_int4_gemm: scales.size\(0\) must be 2"):
        op(x, qm, mm, sc[:1], None, 32, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_int4_gemm: zeros.size\(1\) must be 32"):
        op(x, qm, mm, sc, sc[:, :16], 32, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_int4_gemm: meta.size\(1\) must be 1"):
        op(x, qm, mm.repeat(1, 2, 1), sc, None, 32, 1, None)
    with pytest.raises(RuntimeError, match=r"sparse24_int4_gemm: bias.size\(0\) must be 32"):
        op(x, qm, mm, sc, None, 32, 1, torch.zeros(31, device="cuda"))


@pytest.mark.gpu
def test_torch_compile_fullgraph_and_opcheck():
    """Both go through the fake (bitpress/sparse24/ops.py), which must accept layout MMA (its
    meta int32 [N/16, ceil(K/64), 32]) for CUDA tensors."""
    op = _op()
    qv, meta, s, z = _weights(48, 96, 32, 4, asym=True, sdtype=torch.bfloat16)
    qm, mm, sc, zp = _cuda(*LI.to_mma_int4(qv, meta), s, z)
    bias = torch.randn(48, device="cuda")

    @torch.compile(fullgraph=True)
    def f(x):
        return op(x, qm, mm, sc, zp, 32, 1, bias) * 2

    x = torch.randn(5, 96, device="cuda", dtype=torch.bfloat16)
    assert _rel(f(x).cpu(), _ref(x, qv, meta, s, z, 32, bias) * 2) < TOLERANCE[torch.bfloat16]
    torch.library.opcheck(op, (x, qm, mm, sc, zp, 32, 1, bias))
