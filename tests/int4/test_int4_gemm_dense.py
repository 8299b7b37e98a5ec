"""int4_gemm's dense CPU path (decode once into a reused workspace, then the dense GEMM) and the
measured choice between it and the fused kernel (csrc/int4/int4_gemm_dense_torch.cpp): the dense
path against the float64 reference on odd shapes, act-order, asymmetric zeros, bias and every x
dtype; the decode exact against the reference dequantization; the auto mode records one choice per
(M bucket, K, N, dtype, ISA) and its output is right whichever path it picked."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from int4_data import make_quantized

from bitpress import ops, reference
from bitpress._core import ext as _ext
from bitpress.int4 import layout as int4_layout
from bitpress.int4 import reference as int4_reference
from bitpress.testing import rel_err

# The dense path rounds each weight once to x's dtype (2^-9 relative in bf16, 2^-12 in fp16) on
# top of the output rounding: a little above the fused path's bounds.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture
def path():
    """Sets int4_gemm's CPU path for one test; restores auto and forgets the choices after."""
    _ext.C.int4_cpu_path_choices(True)

    def set_path(mode):
        return _ext.C.int4_cpu_path(mode)

    yield set_path
    _ext.C.int4_cpu_path("auto")
    _ext.C.int4_cpu_path_choices(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 7, 64, 97])
@pytest.mark.parametrize(
    "K,N,gs,sym,act,bias",
    [
        (256, 65, 128, True, False, False),
        (384, 130, 32, False, False, True),
        (512, 64, 128, False, True, True),  # act-order: perm scatters the decoded rows
        (136, 7, 8, True, False, False),
    ],
    ids=["g128", "g32-asym-bias", "g128-actorder-bias", "g8"],
)
def test_dense_path_matches_reference(path, dtype, M, K, N, gs, sym, act, bias):
    gen = torch.Generator().manual_seed(M * 1009 + K + N)
    p = int4_layout.pack(make_quantized(K, N, gs, sym, act))
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    assert path("dense") == "dense"
    out = ops.int4_gemm(x, p, b)
    ref = reference.int4_gemm(x.double(), p, None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_dense_path_non_contiguous_rows(path):
    p = int4_layout.pack(make_quantized(256, 96, 128, False, False))
    x = torch.randn(70, 2 * 256).to(torch.bfloat16)[:, ::2]  # row stride 512, column stride 2
    path("dense")
    out = ops.int4_gemm(x, p)
    assert rel_err(out, reference.int4_gemm(x.double(), p)) < TOLERANCE[torch.bfloat16]


def test_dense_and_fused_agree(path):
    """The two paths differ only by the weight's rounding to x's dtype: in fp32 (no rounding of
    the weight) they agree to float32 summation order."""
    p = int4_layout.pack(make_quantized(512, 192, 64, False, True))
    x = torch.randn(80, 512)
    path("fused")
    fused = ops.int4_gemm(x, p)
    path("dense")
    dense = ops.int4_gemm(x, p)
    assert rel_err(dense, fused) < 1e-5


@pytest.mark.parametrize(
    "M,K,N,gs,sym,act",
    [
        (70, 512, 130, 128, False, True),
        (33, 256, 65, 32, True, False),
        (200, 1024, 300, 64, False, False),
        (16, 4096, 64, 128, True, False),
    ],
)
def test_dequant_tiles_match_the_workspace_path(path, monkeypatch, M, K, N, gs, sym, act):
    """On AMX the bf16 dense path decodes per K chunk on the tiles (no workspace): the weights are
    the workspace path's (bf16((q - z) s)), so both agree to float32 summation order, and both
    match the float64 product with those rounded weights closely."""
    if _ext.C.best_cpu_isa() != "amx":
        pytest.skip("the dequantized-panel path runs on AMX only")
    gen = torch.Generator().manual_seed(M + K + N)
    q = make_quantized(K, N, gs, sym, act)
    p = int4_layout.pack(q)
    x = torch.randn(M, 2 * K, generator=gen).bfloat16()[:, ::2]  # rows with a stride
    b = torch.randn(N, generator=gen).bfloat16()
    path("dense")
    tiles = ops.int4_gemm(x, p, b)
    monkeypatch.setenv("BITPRESS_INT4_DENSE_GEMM", "onednn")
    onednn = ops.int4_gemm(x, p, b)
    assert rel_err(tiles, onednn) < 2e-3
    assert (
        rel_err(tiles, reference.int4_gemm(x.double(), p, b.double())) < TOLERANCE[torch.bfloat16]
    )
    w = int4_reference.dequantize_packed(p, torch.bfloat16).double()  # bf16((q - z) s)
    assert rel_err(tiles, x.double() @ w.t() + b.double()) < 2.5e-3


def test_auto_measures_once_per_key(path):
    p = int4_layout.pack(make_quantized(256, 128, 128, True, False))
    path("auto")
    ref = None
    for M in (70, 100, 127, 200):  # buckets 64-127 (three calls) and 128-255
        x = torch.randn(M, 256).to(torch.bfloat16)
        out = ops.int4_gemm(x, p)
        ref = reference.int4_gemm(x.double(), p)
        assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    small = ops.int4_gemm(torch.randn(5, 256).to(torch.bfloat16), p)  # below the minimum: fused
    assert small.shape == (5, 128)
    lines = _ext.C.int4_cpu_path_choices(False)
    assert len(lines) == 2, lines
    assert lines[0].startswith("M 64-127 K 256 N 128 bfloat16 ")
    assert lines[1].startswith("M 128-255 K 256 N 128 bfloat16 ")
    for line in lines:
        assert line.split(": ")[1].split(" ")[0] in ("fused", "dense")


def test_path_names(path):
    assert path(None) == "auto"
    with pytest.raises(ValueError, match="int4_cpu_path: mode must be"):
        path("fast")


def test_environment_variable_sets_the_path():
    code = (
        "import torch, bitpress; from bitpress._core import ext; print(ext.C.int4_cpu_path(None))"
    )
    env = {"BITPRESS_INT4_CPU_PATH": "dense", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "dense"
