"""int4_gemm_repack (GPTQ qweight -> the GPU mma layout of int4_mma_layout.h): the CPU and CUDA
kernels against the plain-torch definition (int4_layout.mma_qweight) bit for bit on odd shapes
and act-order perms with padding rows, the round trip through int4_layout.unpack, strided
inputs, bad input, opcheck, torch.compile, CUDA graphs, and the machine code of the CUDA kernel."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from int4_data import make_quantized

from bitpress import ops
from bitpress._core import backends
from bitpress._core import ext as _ext
from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import Int4MmaTiles
from bitpress.int4.packing import pack_int4_along_k
from bitpress.testing import cuobjdump, extension_resource_usage, extension_sass

NS = [1, 7, 64, 65, 130, 4095]
# (K, group_size, act_order): act-order perms come from mma_row_order, with -1 padding rows
# wherever a group's row count is not a multiple of 16 (K = 136 in 5 groups: 27-28 rows each).
KS = [
    pytest.param(16, 16, False, id="K16"),
    pytest.param(136, 32, True, id="K136-act"),
    pytest.param(4096, 128, False, id="K4096"),
]


def _gptq(K, N, group_size, act_order, seed=0):
    """(QuantizedWeight, GPTQ qweight [K/8, N], perm [Kp] int32 of the mma layout or None)."""
    qw = make_quantized(K, N, group_size, sym=False, act_order=act_order, seed=seed)
    perm = None
    if act_order:
        perm, _ = int4_layout.mma_row_order(qw.g_idx, qw.scales.shape[0])
        perm = perm.to(torch.int32)
        assert bool((perm == -1).any()) or K % 16 == 0
    return qw, pack_int4_along_k(qw.q), perm


def _mv(t, device):
    return None if t is None else t.to(device)


OP = "int4_gemm_repack"  # the op of the backend_device fixture (tests/conftest.py)


@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("K,group_size,act_order", KS)
def test_matches_reference(backend_device, K, group_size, act_order, N):
    """Every backend on every device it runs on, bit for bit against the plain-torch
    definition (int4_layout.mma_qweight, the reference backend)."""
    backend, device = backend_device
    qw, qweight, perm = _gptq(K, N, group_size, act_order)
    out = ops.int4_gemm_repack(qweight.to(device), _mv(perm, device), backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    Kp = K if perm is None else perm.numel()
    assert out.device == device
    assert out.dtype == torch.int32 and out.shape == (Kp // 16, -(-N // 64) * 128)
    assert torch.equal(out.cpu(), int4_layout.mma_qweight(qw.q, perm))


def test_cpu_matches_reference_act_order_large():
    _, qweight, perm = _gptq(4096, 130, 128, True)
    # 4096 rows in 32 groups of 128: act-order without padding; the rows are a real permutation.
    assert perm is not None and not bool((perm == torch.arange(4096)).all())
    out = ops.int4_gemm_repack(qweight, perm, backend="cpu")
    assert torch.equal(out, ops.int4_gemm_repack(qweight, perm, backend="reference"))


@pytest.mark.parametrize("N", [7, 130])
@pytest.mark.parametrize("K,group_size,act_order", KS[:2])
def test_equals_pack_mma_and_round_trips(K, group_size, act_order, N):
    qw, qweight, _ = _gptq(K, N, group_size, act_order)
    packed = int4_layout.pack(qw, layout=Int4MmaTiles)
    out = ops.int4_gemm_repack(qweight, packed.perm)
    assert torch.equal(out, packed.qweight)
    # The op's qweight in an Int4PackedWeight unpacks to the GPTQ tensors exactly.
    back = int4_layout.unpack(dataclasses.replace(packed, qweight=out), group_size, sym=False)
    assert torch.equal(back.q, qw.q)
    assert torch.equal(back.g_idx, qw.g_idx)
    assert torch.equal(back.scales, qw.scales)
    assert torch.equal(back.zeros, qw.zeros)


def test_padding_rows_and_columns_are_zero():
    """perm -1 rows and columns >= N are zero even where the source nibbles are all 15."""
    qweight = torch.full((2, 5), -1, dtype=torch.int32)  # every nibble 15
    perm = torch.tensor([3, -1] * 8, dtype=torch.int32)
    out = ops.int4_gemm_repack(qweight, perm, backend="cpu")
    vals = ((out.long() & 0xFFFFFFFF).unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    assert int(vals.sum()) == 15 * 8 * 5  # 8 real rows x 5 columns of 15, everything else 0
    assert torch.equal(out, ops.int4_gemm_repack(qweight, perm, backend="reference"))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda qw: torch.nn.functional.pad(qw, (0, 9))[:, :-9], id="row-stride"),
        pytest.param(lambda qw: qw.t().contiguous().t(), id="column-major"),
        pytest.param(lambda qw: qw.repeat_interleave(2, 1)[:, ::2], id="step-2"),
        pytest.param(lambda qw: qw[:1].expand(qw.shape[0], -1), id="expanded"),
    ],
)
def test_non_contiguous_qweight(make):
    _, qweight, perm = _gptq(136, 65, 32, True)
    strided = make(qweight)
    assert not strided.is_contiguous()
    out = ops.int4_gemm_repack(strided, perm, backend="cpu")
    assert torch.equal(out, ops.int4_gemm_repack(strided.contiguous(), perm, backend="reference"))


def test_empty():
    qweight = torch.zeros(0, 5, dtype=torch.int32)
    assert ops.int4_gemm_repack(qweight, None, backend="cpu").shape == (0, 128)
    # K = 0 with padding rows only, and N = 0.
    out = ops.int4_gemm_repack(qweight, torch.full((16,), -1, dtype=torch.int32), backend="cpu")
    assert torch.equal(out, torch.zeros(1, 128, dtype=torch.int32))
    assert ops.int4_gemm_repack(torch.zeros(2, 0, dtype=torch.int32), backend="cpu").shape == (1, 0)


# ------------------------------------------------------------------------------------------
# Bad input: the cpu and reference backends raise the same error, naming the argument.
# ------------------------------------------------------------------------------------------


def _bad_cases():
    qweight = pack_int4_along_k(torch.randint(0, 16, (64, 10)))  # K = 64
    perm = torch.arange(64, dtype=torch.int32)
    odd = pack_int4_along_k(torch.randint(0, 16, (136, 10)))
    out_of_range = perm.clone()
    out_of_range[5] = 64
    below = perm.clone()
    below[63] = -2
    return [
        ("qweight dtype", (qweight.float(), perm), TypeError, "qweight must be int32"),
        ("qweight 1-D", (qweight.flatten(), perm), RuntimeError, "qweight must be 2-D"),
        ("perm dtype", (qweight, perm.long()), TypeError, "perm must be int32"),
        ("perm 2-D", (qweight, perm.view(4, 16)), RuntimeError, "perm must be 1-D"),
        ("perm len", (qweight, perm[:24]), RuntimeError, "perm.size(0) must be a multiple of 16"),
        ("no perm, K", (odd, None), RuntimeError, "(no perm) must be a multiple of 16"),
        ("perm value K", (qweight, out_of_range), RuntimeError, "perm values must lie in [-1, 64)"),
        ("perm value -2", (qweight, below), RuntimeError, "perm values must lie in [-1, 64)"),
        (
            "device",
            (qweight, perm.to("meta")),
            RuntimeError,
            "perm must be on the same device as qweight",
        ),
    ]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(backend, case):
    _, args, exc, msg = case
    impl = backends.implementations("int4_gemm_repack")[backend]
    with pytest.raises(exc, match="int4_gemm_repack: .*" + re.escape(msg)):
        impl(*args)


# ------------------------------------------------------------------------------------------
# torch integration
# ------------------------------------------------------------------------------------------


def test_opcheck():
    _, qweight, perm = _gptq(136, 70, 32, True)
    torch.library.opcheck(torch.ops.bitpress.int4_gemm_repack.default, (qweight, perm))
    _, qweight, _ = _gptq(64, 65, 32, False)
    torch.library.opcheck(torch.ops.bitpress.int4_gemm_repack.default, (qweight, None))


def test_torch_compile_fullgraph():
    _, qweight, perm = _gptq(136, 70, 32, True)

    @torch.compile(fullgraph=True)
    def f(qweight, perm):
        return ops.int4_gemm_repack(qweight, perm) ^ 1

    want = ops.int4_gemm_repack(qweight, perm, backend="reference") ^ 1
    assert torch.equal(f(qweight, perm), want)


# ------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("K,group_size,act_order", KS)
def test_cuda_matches_cpu(K, group_size, act_order, N):
    _, qweight, perm = _gptq(K, N, group_size, act_order)
    cpu = ops.int4_gemm_repack(qweight, perm, backend="cpu")
    out = ops.int4_gemm_repack(qweight.cuda(), _mv(perm, "cuda"), backend="cuda")
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), cpu)


@pytest.mark.gpu
def test_cuda_non_contiguous_and_empty():
    _, qweight, perm = _gptq(136, 65, 32, True)
    strided = torch.nn.functional.pad(qweight, (0, 9))[:, :-9].cuda()
    cpu = ops.int4_gemm_repack(qweight, perm, backend="cpu")
    assert torch.equal(ops.int4_gemm_repack(strided, perm.cuda(), backend="cuda").cpu(), cpu)
    col_major = qweight.t().contiguous().t().cuda()
    assert torch.equal(ops.int4_gemm_repack(col_major, perm.cuda(), backend="cuda").cpu(), cpu)
    empty = torch.zeros(0, 5, dtype=torch.int32, device="cuda")
    assert ops.int4_gemm_repack(empty, None, backend="cuda").shape == (0, 128)


@pytest.mark.gpu
def test_cuda_out_of_range_perm_is_a_padding_row():
    """Documented: perm on the device is not checked; an out-of-range row is written as zeros."""
    _, qweight, perm = _gptq(64, 70, 32, False)
    perm = torch.arange(64, dtype=torch.int32)
    bad = perm.clone()
    bad[5], bad[40] = 64, -7
    padded = perm.clone()
    padded[5], padded[40] = -1, -1
    out = ops.int4_gemm_repack(qweight.cuda(), bad.cuda(), backend="cuda")
    assert torch.equal(out.cpu(), ops.int4_gemm_repack(qweight, padded, backend="cpu"))


@pytest.mark.gpu
def test_cuda_graph_capture():
    _, qweight, perm = _gptq(136, 130, 32, True)
    qweight, perm = qweight.cuda(), perm.cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ops.int4_gemm_repack(qweight, perm, backend="cuda")  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.int4_gemm_repack(qweight, perm, backend="cuda")
    out.fill_(0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ops.int4_gemm_repack(qweight.cpu(), perm.cpu(), backend="cpu"))


# ------------------------------------------------------------------------------------------
# Machine code of the CUDA kernel (compiled here, without a GPU)
# ------------------------------------------------------------------------------------------

needs_cuda_build = pytest.mark.skipif(
    not _ext.with_cuda() or cuobjdump() is None,
    reason="bitpress._C was built without CUDA kernels, or cuobjdump is missing",
)


@needs_cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_kernel_sass(arch):
    funcs = extension_sass("int4_gemm_repack", arch)
    assert len(funcs) == 1, sorted(funcs)
    for name, sass in funcs.items():
        assert any(i.startswith("LDG") for i in sass), name
        assert any(i.startswith("STG") for i in sass), name
        assert any(i.startswith("LDS") for i in sass), name  # the tile staged in shared memory
        assert not any(i.startswith(("LDL", "STL")) for i in sass), f"local memory in {name}"
    usage = extension_resource_usage("int4_gemm_repack", arch)
    assert len(usage) == 1, sorted(usage)
    for name, res in usage.items():
        assert res.stack == 0 and res.local == 0, (name, res)
        assert res.registers <= 64, (name, res)  # 128 threads/block: full occupancy
