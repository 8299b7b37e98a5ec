"""int4_dequantize on every backend against the reference; the reference against the definition;
opcheck, torch.compile, bad input, and the machine code of the GPU kernels."""

from __future__ import annotations

import pytest
import torch
from backend_matrix import backend_device_params
from int4_data import make_int4

import bitpress
from bitpress import ops, reference
from bitpress._core import ext as _ext
from bitpress.testing import compile_triton, cuobjdump, extension_resource_usage, extension_sass

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(8, 1), (8, 7), (56, 33), (136, 127), (256, 4095)]
VARIANTS = [  # (group_size, zeros, act_order)
    (32, False, False),
    (64, True, False),
    (128, True, True),
    (-1, True, False),
]

# The ``backend_device`` fixture (tests/conftest.py) runs every backend registered for OP on
# every device it can use here: cpu and reference on CPU tensors, triton under the interpreter,
# cuda and triton on a GPU (``gpu``: skipped without one).
OP = "int4_dequantize"


def expected_for(backend, device, out, args, **kw):
    """The reference result for ``args`` (CPU tensors).

    The Triton interpreter's fp32->bf16 cast truncates where the compiled kernel (and every other
    backend) rounds to nearest even: there, the float32 reference is truncated instead, so that
    everything but the final rounding is still compared exactly."""
    if backend == "triton" and device.type == "cpu" and out.dtype == torch.bfloat16:
        ref32 = reference.int4_dequantize(*args, **{**kw, "dtype": torch.float32})
        return (ref32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    return reference.int4_dequantize(*args, **kw)


def _group_size_for(K, gs):
    return gs if gs == -1 or gs <= K else -1


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize(
    "variant",
    VARIANTS,
    ids=lambda v: f"g{v[0]}-{'asym' if v[1] else 'sym'}{'-actorder' if v[2] else ''}",
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend_device, K, N, variant, dtype):
    backend, device = backend_device
    if backend == "triton" and device.type == "cpu" and K * N > 40_000:
        pytest.skip("interpreter: large shapes covered by the compiled backends")
    gs, zeros, act_order = variant
    d = make_int4(K, N, _group_size_for(K, gs), dtype, zeros, act_order)
    args = d.args(device)
    out = ops.int4_dequantize(*args, backend=backend)
    assert out.shape == (K, N) and out.dtype == dtype and out.device == device
    want = expected_for(backend, device, out, d.args("cpu"))
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("scale_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dtype_pairs(backend_device, scale_dtype, out_dtype):
    backend, device = backend_device
    d = make_int4(64, 40, 32, scale_dtype, zeros=True)
    out = ops.int4_dequantize(*d.args(device), dtype=out_dtype, backend=backend)
    assert out.dtype == out_dtype
    want = expected_for(backend, device, out, d.args("cpu"), dtype=out_dtype)
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0)


def test_non_contiguous_inputs(backend_device):
    backend, device = backend_device
    d = make_int4(64, 24, 16, torch.float16, zeros=True, act_order=True)
    qweight, scales, qzeros, g_idx, gs = d.args(device)
    # qweight as the transpose of an [N, K/8] buffer, scales as every other column of a wider
    # buffer, qzeros with a padded row stride.
    qweight_t = qweight.t().contiguous().t()
    wide = torch.zeros(scales.shape[0], 2 * scales.shape[1], dtype=scales.dtype, device=device)
    wide[:, ::2] = scales
    qz_pad = torch.zeros(qzeros.shape[0], qzeros.shape[1] + 3, dtype=torch.int32, device=device)
    qz_pad[:, : qzeros.shape[1]] = qzeros
    assert not qweight_t.is_contiguous() and not wide[:, ::2].is_contiguous()
    out = ops.int4_dequantize(
        qweight_t, wide[:, ::2], qz_pad[:, : qzeros.shape[1]], g_idx, gs, backend=backend
    )
    assert out.device == device
    want = expected_for(backend, device, out, d.args("cpu"))
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "amx"])
def test_every_cpu_path(isa):
    order = ["scalar", "avx2", "avx512", "amx"]
    if order.index(isa) > order.index(_ext.C.best_cpu_isa()):
        pytest.skip(f"this CPU cannot run the {isa} path")
    d = make_int4(136, 129, 32, torch.bfloat16, zeros=True, act_order=True)
    _ext.C.set_cpu_isa(isa)
    try:
        assert _ext.C.cpu_isa() == isa
        for out_dtype in DTYPES:
            out = ops.int4_dequantize(*d.args(), dtype=out_dtype, backend="cpu")
            ref = reference.int4_dequantize(*d.args(), dtype=out_dtype)
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
    finally:
        _ext.C.set_cpu_isa(None)


def test_reference_matches_definition():
    """The reference against an element-by-element reading of the packed words, in float64."""
    d = make_int4(24, 10, 8, torch.float32, zeros=True, act_order=True)
    ref = reference.int4_dequantize(*d.args())
    qw, qz, s, g = d.qweight.tolist(), d.qzeros.tolist(), d.scales.double(), d.g_idx.tolist()
    want = torch.empty(24, 10, dtype=torch.float64)
    for k in range(24):
        for n in range(10):
            q = (qw[k // 8][n] >> (4 * (k % 8))) & 0xF
            z = (qz[g[k]][n // 8] >> (4 * (n % 8))) & 0xF
            want[k, n] = (q - z) * s[g[k], n]
    # The float64 product is exact; one rounding to float32 is the op's definition.
    torch.testing.assert_close(ref, want.float(), rtol=0, atol=0)


def test_symmetric_means_zero_eight():
    d = make_int4(16, 8, 8, torch.float32)
    out = ops.int4_dequantize(*d.args())
    torch.testing.assert_close(out, (d.q - 8).float() * d.scales.repeat_interleave(8, 0))


def test_empty_and_large_group():
    d = make_int4(8, 4, -1, torch.float16)
    assert ops.int4_dequantize(d.qweight[:0], d.scales[:0], None, None, 128).shape == (0, 4)
    # group_size larger than K: one group.
    out = ops.int4_dequantize(d.qweight, d.scales, None, None, 4096)
    torch.testing.assert_close(out, reference.int4_dequantize(*d.args()))


def test_opcheck():
    for zeros, act_order in [(False, False), (True, True)]:
        d = make_int4(64, 24, 16, torch.bfloat16, zeros=zeros, act_order=act_order)
        torch.library.opcheck(torch.ops.bitpress.int4_dequantize.default, d.args())
        torch.library.opcheck(
            torch.ops.bitpress.int4_dequantize.default, d.args(), {"dtype": torch.float32}
        )


@pytest.mark.interpreter
def test_opcheck_triton_op():
    d = make_int4(16, 8, 8, torch.float16, zeros=True)
    torch.library.opcheck(torch.ops.bitpress.int4_dequantize_triton.default, d.args())


@pytest.mark.slow
def test_torch_compile_fullgraph():
    d = make_int4(64, 24, 16, torch.float16, zeros=True)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(qweight, scales, qzeros, g_idx, gs):
        return ops.int4_dequantize(qweight, scales, qzeros, g_idx, gs) * 2

    torch.testing.assert_close(f(*d.args()), 2 * reference.int4_dequantize(*d.args()))


# ------------------------------------------------------------------------------------------
# Bad input: every backend raises an error that names the argument and what was expected.
# ------------------------------------------------------------------------------------------

# Every backend that runs on CPU tensors here (the C++ checks are the same on CUDA).
BAD_BACKENDS = [
    pytest.param(p.values[0].backend, id=p.id, marks=p.marks)
    for p in backend_device_params(OP)
    if p.values[0].device.type == "cpu"
]


def _bad_cases():
    d = make_int4(64, 16, 32, torch.float16, zeros=True)
    qw, s, qz, _, gs = d.args()
    return [
        ("qweight float", (qw.float(), s, qz, None, gs), TypeError, "qweight must be int32"),
        ("qweight 1-D", (qw.flatten(), s, qz, None, gs), RuntimeError, "qweight must be 2-D"),
        ("scales int", (qw, s.int(), qz, None, gs), TypeError, "scales must be float32"),
        ("scales N", (qw, s[:, :8], qz, None, gs), RuntimeError, "scales.size(1) must be 16"),
        ("scales G", (qw, s[:1], qz[:1], None, gs), RuntimeError, "scales.size(0) must be 2"),
        ("qzeros N", (qw, s, qz[:, :1].repeat(1, 3), None, gs), RuntimeError, "qzeros.size(1)"),
        ("qzeros dtype", (qw, s, qz.long(), None, gs), TypeError, "qzeros must be int32"),
        ("group_size 0", (qw, s, qz, None, 0), RuntimeError, "group_size must be positive"),
        (
            "g_idx len",
            (qw, s, qz, torch.zeros(63, dtype=torch.int32), gs),
            RuntimeError,
            "g_idx.size(0) must be 64",
        ),
        (
            "g_idx dtype",
            (qw, s, qz, torch.zeros(64, dtype=torch.int64), gs),
            TypeError,
            "g_idx must be int32",
        ),
        (
            "g_idx range",
            (qw, s, qz, torch.full((64,), 2, dtype=torch.int32), gs),
            RuntimeError,
            "g_idx values must lie in [0, 2)",
        ),
        (
            "device",
            (qw, s.to("meta"), qz, None, gs),
            RuntimeError,
            "scales must be on the same device as qweight",
        ),
    ]


@pytest.mark.parametrize("backend", BAD_BACKENDS)
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(backend, case):
    name, args, exc, msg = case
    if backend == "triton" and name == "g_idx range":
        pytest.skip("the Triton kernel marks a bad g_idx with NaN instead (no host sync)")
    with pytest.raises(exc, match="int4_dequantize: .*" + _re(msg)):
        ops.int4_dequantize(*args, backend=backend)


def test_bad_dtype_argument():
    d = make_int4(16, 8, 8, torch.float16)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        ops.int4_dequantize(*d.args(), dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        ops.int4_dequantize(*d.args(), dtype=torch.int8, backend="reference")


@pytest.mark.interpreter
def test_triton_marks_bad_g_idx_with_nan():
    d = make_int4(16, 8, 8, torch.float16)
    g_idx = torch.zeros(16, dtype=torch.int32)
    g_idx[3] = 7
    out = ops.int4_dequantize(d.qweight, d.scales, None, g_idx, 8, backend="triton")
    assert out[3].isnan().all() and not out[[0, 1, 2, 4]].isnan().any()


def _re(s):
    import re

    return re.escape(s)


# ------------------------------------------------------------------------------------------
# Machine code: the CUDA object and the Triton kernel, checked without a GPU.
# ------------------------------------------------------------------------------------------

needs_cuda_build = pytest.mark.skipif(
    not _ext.with_cuda() or cuobjdump() is None,
    reason="bitpress._C was built without CUDA kernels, or cuobjdump is missing",
)


@needs_cuda_build
def test_extension_has_sm80_and_sm90a_code():
    from bitpress.testing import extension_archs

    archs = extension_archs()
    assert "sm_80" in archs and "sm_90a" in archs, archs
    # cuda_archs() also lists the PTX shipped for newer GPUs (compute_80; tests/int4/
    # test_int4_gemm_cuda.py::test_shipped_cubins_and_ptx checks it with cuobjdump --list-ptx).
    assert set(_ext.cuda_archs()) == set(archs) | {"compute_80"}


@needs_cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_kernel_sass(arch):
    funcs = extension_sass("int4_dequantize_kernel", arch)
    assert len(funcs) == 9, sorted(funcs)  # 3 scale dtypes x 3 output dtypes
    for name, sass in funcs.items():
        assert any(i.startswith("LDG") for i in sass), name
        assert any(i.startswith("STG") for i in sass), name
        assert not any(i.startswith(("LDL", "STL")) for i in sass), f"local memory in {name}"
    for name, res in extension_resource_usage("int4_dequantize_kernel", arch).items():
        assert res.stack == 0 and res.local == 0, (name, res)
        assert res.registers <= 64, (name, res)  # 128 threads/block: full occupancy needs <= 64


TRITON_SIG = {
    "qweight_ptr": "*i32",
    "scales_ptr": "*fp16",
    "qzeros_ptr": "*i32",
    "g_idx_ptr": "*i32",
    "out_ptr": "*bf16",
    "K": "i32",
    "N": "i32",
    "group_size": "i32",
    "num_groups": "i32",
    "stride_q": "i32",
    "stride_s": "i32",
    "stride_z": "i32",
    "stride_o": "i32",
}


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is missing")
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernel_compiles_for_gpu(arch):
    from bitpress.triton_kernels.int4_dequantize import int4_dequantize_kernel

    asm = compile_triton(
        int4_dequantize_kernel,
        TRITON_SIG,
        {"HAS_ZEROS": True, "HAS_G_IDX": True, "BLOCK_K": 32, "BLOCK_N": 64},
        arch=arch,
    )
    target = "sm_90a" if arch == 90 else "sm_80"
    assert f".target {target}" in asm.ptx
    # The output is rounded to bf16 by the hardware conversion (round to nearest even).
    assert "cvt.rn.bf16" in asm.ptx
    assert any(i.startswith("F2FP") and "BF16" in i for i in asm.sass), sorted(set(asm.sass))
    assert any(i.startswith("LDG") for i in asm.sass) and any(i.startswith("STG") for i in asm.sass)
    assert asm.spills == 0 and not any(i.startswith(("LDL", "STL")) for i in asm.sass)
    assert asm.resources is not None and asm.resources.local == 0


def test_available_backends_cpu():
    assert {"cpu", "reference"} <= set(bitpress.available_backends())
