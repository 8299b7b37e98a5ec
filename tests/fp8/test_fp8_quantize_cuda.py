"""fp8_quantize on CUDA (csrc/fp8/fp8_quantize_sm80.cu and its glue, fp8_quantize_cuda_torch.cpp).

Without a GPU: the machine code of every kernel for sm_80 and sm_90a, compiled here with nvcc from
the torch-free source (no local memory; the hardware E4M3 conversion on the sm_90a image and the
software one on sm_80; the tensor amax as a device atomic, no host round trip). With a GPU
(``gpu`` marker): codes and scales equal to the reference bit for bit for every granularity,
dtype, static and dynamic scales, odd shapes, zeros, NaN / inf / out-of-range values, and CUDA
graph capture of the dynamic per-tensor scale.
"""

from __future__ import annotations

import os
import re

import fp8_cubin
import pytest
import torch

SOURCE = "fp8_quantize_sm80.cu"
KERNELS = [
    "fp8_quantize_rows_kernel",
    "fp8_quantize_blocks_kernel",
    "fp8_quantize_amax_kernel",
    "fp8_quantize_tensor_kernel",
    "fp8_quantize_finalize_kernel",
]

needs_nvcc = pytest.mark.skipif(not fp8_cubin.available(), reason="nvcc or cuobjdump is missing")


@needs_nvcc
@pytest.mark.parametrize("arch", fp8_cubin.ARCHS)
def test_kernels_have_no_local_memory(arch):
    for name in KERNELS:
        usage = fp8_cubin.resources(SOURCE, arch, name)
        # One per x dtype (fp32, fp16, bf16), one finalize.
        assert len(usage) == (1 if name.endswith("finalize_kernel") else 3), (name, sorted(usage))
        for fn, u in usage.items():
            assert u.stack == 0 and u.local == 0, (fn, u)
        for fn, sass in fp8_cubin.sass(SOURCE, arch, name).items():
            assert not any(i.startswith(("LDL", "STL")) for i in sass), fn


@needs_nvcc
@pytest.mark.parametrize("arch", fp8_cubin.ARCHS)
def test_encoding_instructions(arch):
    """sm_90a: cvt.rn.satfinite.e4m3x2.f32 (F2FP.SATFINITE.E4M3); sm_80 has no FP8 conversion and
    runs the software RNE of fp8.h. The tensor amax: one atomic max per warp into the scale."""
    for name in ("fp8_quantize_rows_kernel", "fp8_quantize_blocks_kernel"):
        for fn, sass in fp8_cubin.sass(SOURCE, arch, name).items():
            f2fp = [i for i in sass if i.startswith("F2FP") and "E4M3" in i]
            if arch == "sm_90a":
                assert f2fp and all("SATFINITE" in i for i in f2fp), (fn, sorted(set(f2fp)))
            else:
                assert not f2fp, fn
    for fn, sass in fp8_cubin.sass(SOURCE, arch, "fp8_quantize_amax_kernel").items():
        assert any(re.match(r"(RED|ATOM)G?\.E\.MAX", i) for i in sass), (fn, sorted(set(sass)))


def test_glue_guarded_and_stubbed():
    path = os.path.join(fp8_cubin.CSRC, "fp8", "fp8_quantize_cuda_torch.cpp")
    glue = open(path).read()
    code = re.sub(r"//[^\n]*", "", glue).strip()
    assert code.startswith("#if defined(BITPRESS_WITH_CUDA)") and code.endswith("#endif")
    assert "TORCH_LIBRARY_IMPL(bitpress, CUDA, m)" in glue
    assert "prepare_fp8_quantize" in glue  # the one authoritative check of the op
    stub = open(os.path.join(fp8_cubin.CSRC, "fp8", "fp8_quantize_cuda_stubs.cpp")).read()
    assert "Status fp8_quantize_cuda(const Fp8QuantizeParams&, void*)" in stub


# ------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def fp8_ref():
    return pytest.importorskip("bitpress.fp8.reference")


@pytest.fixture(scope="module")
def fp8_ops():
    return pytest.importorskip("bitpress.fp8.ops")


def _x(shape, dtype, seed=0, special=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 100
    if special and x.numel() > 8:
        flat = x.view(-1)
        flat[1] = 0.0
        flat[-2] = -1e-9  # an E4M3 subnormal after scaling, or zero
    return x.to(dtype).cuda()


def _same(out, ref):
    q, s = out
    rq, rs = ref
    assert q.dtype == torch.float8_e4m3fn and q.shape == rq.shape
    assert s.dtype == torch.float32 and s.shape == rs.shape
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32)), (s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "granularity,shape,block_size",
    [
        ("tensor", (7, 33), None),
        ("tensor", (0, 16), None),
        ("token", (1, 4096), None),
        ("token", (3, 5, 257), None),
        ("channel", (130, 1000), None),
        ("block", (9, 300), None),
        ("block", (2, 3, 128), [1, 128]),
        ("block", (300, 260), [128, 128]),
        ("block", (5, 7), [2, 3]),
    ],
)
@pytest.mark.parametrize("static", [False, True])
def test_against_reference(fp8_ref, fp8_ops, dtype, granularity, shape, block_size, static):
    x = _x(shape, dtype)
    scale = None
    if static:
        _, scale = fp8_ref.fp8_quantize(x.cpu() * 0.5, granularity, None, block_size)
        scale = scale.cuda()
    out = fp8_ops.fp8_quantize(
        x, granularity=granularity, scale=scale, block_size=block_size, backend="cuda"
    )
    ref = fp8_ref.fp8_quantize(
        x.cpu(), granularity, None if scale is None else scale.cpu(), block_size
    )
    _same((out[0].cpu(), out[1].cpu()), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "token", "block"])
def test_special_values(fp8_ref, fp8_ops, granularity):
    """A zero row (scale = the float32 floor), NaN (NaN scale, NaN codes of its set), inf and
    values saturated by a static scale."""
    x = torch.randn(4, 256)
    x[1] = 0
    x[2, 7] = float("nan")
    x[3, 9] = float("inf")
    x = x.cuda()
    out = fp8_ops.fp8_quantize(x, granularity=granularity, backend="cuda")
    _same((out[0].cpu(), out[1].cpu()), fp8_ref.fp8_quantize(x.cpu(), granularity))
    small = torch.full((1,) if granularity == "tensor" else out[1].shape, 1e-3).cuda()
    out = fp8_ops.fp8_quantize(x, granularity=granularity, scale=small, backend="cuda")
    _same((out[0].cpu(), out[1].cpu()), fp8_ref.fp8_quantize(x.cpu(), granularity, small.cpu()))


@pytest.mark.gpu
def test_dynamic_tensor_scale_in_a_cuda_graph(fp8_ref, fp8_ops):
    x = _x((64, 1000), torch.bfloat16)
    fp8_ops.fp8_quantize(x, granularity="tensor", backend="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q, s = fp8_ops.fp8_quantize(x, granularity="tensor", backend="cuda")
    x.copy_(_x((64, 1000), torch.bfloat16, seed=3))
    g.replay()
    torch.cuda.synchronize()
    _same((q.cpu(), s.cpu()), fp8_ref.fp8_quantize(x.cpu(), "tensor"))
