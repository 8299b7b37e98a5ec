"""int4_gemm on every CPU kernel path, the AMX one included: each against the float64 reference on
odd shapes (row counts around the AMX row tile of 16 and block of 32, groups split across panels,
act-order), the AMX and AVX512-BF16 paths against each other, the path names, and the
BITPRESS_CPU_ISA cap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from int4_data import make_quantized

from bitpress import ops, reference
from bitpress._core import ext as _ext
from bitpress.int4 import layout as int4_layout
from bitpress.testing import rel_err

ISAS = ["scalar", "avx2", "avx512", "amx"]
# As tests/test_int4_gemm.py: output rounding plus float32 accumulation with the group offsets.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _isa_ok(isa):
    return ISAS.index(isa) <= ISAS.index(_ext.C.best_cpu_isa())


def _run(isa, x, p):
    _ext.C.set_cpu_isa(isa)
    try:
        assert _ext.C.cpu_isa() == isa
        return ops.int4_gemm(x, p)
    finally:
        _ext.C.set_cpu_isa(None)


def ref64(x, packed):
    return reference.int4_gemm(x.double(), packed)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 5, 7, 16, 17, 33, 64, 130])
@pytest.mark.parametrize(
    "K,N,gs,sym,act",
    [
        (256, 65, 128, True, False),  # one 16-octet panel per group, a partial tile of columns
        (384, 130, 32, False, False),  # 4 groups per panel
        (512, 64, 128, False, True),  # act-order: groups padded, panels split at slab ends
        (136, 7, 8, True, False),  # groups of one octet: not whole AMX K steps (AVX-512 path)
    ],
    ids=["g128", "g32-asym", "g128-actorder", "g8"],
)
def test_every_path_matches_reference(isa, dtype, M, K, N, gs, sym, act):
    if not _isa_ok(isa):
        pytest.skip(f"this CPU cannot run the {isa} path")
    p = int4_layout.pack(make_quantized(K, N, gs, sym, act))
    x = torch.randn(M, K).to(dtype)
    out = _run(isa, x, p)
    assert out.shape == (M, N) and out.dtype == dtype
    err = rel_err(out, ref64(x, p))
    assert err <= TOLERANCE[dtype], (isa, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [16, 33, 300])
def test_amx_agrees_with_avx512(dtype, M):
    """Both multiply the same exact bf16 products (x or its hi/lo halves times 128 + q) and sum
    them in float32: only the summation order differs. Per output the float32 sums then differ by
    at most 2 gamma_K (sum |terms|) <= 2 K 2^-24 (s_max 2 * 144 sum_k |x_k|) (the offset 128 + q
    and its fold 136 sum x both count); the output rounding adds one step of the dtype each."""
    if not _isa_ok("amx"):
        pytest.skip("this CPU has no AMX")
    K, N = 1024, 192
    p = int4_layout.pack(make_quantized(K, N, 128, sym=False))
    x = torch.randn(M, K).to(dtype)
    a = _run("amx", x, p).double()
    b = _run("avx512", x, p).double()
    ref = ref64(x, p)
    assert rel_err(a, ref) <= TOLERANCE[dtype] and rel_err(b, ref) <= TOLERANCE[dtype]
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    s_max = p.scales.abs().max().item()
    terms = 2 * 144 * s_max * x.double().abs().sum(dim=1, keepdim=True)
    bound = 2 * ulp * ref.abs() + 2 * K * 2.0**-24 * terms
    assert ((a - b).abs() <= bound).all()


def test_exact_for_exact_inputs():
    """Small-integer x and power-of-two scales: every product and partial sum is exact in
    float32, so every path (AMX tiles included) equals the float64 result rounded once."""
    qw = make_quantized(256, 64, 128, sym=False, act_order=True)
    qw.scales = torch.full_like(qw.scales, 0.25)
    p = int4_layout.pack(qw)
    for dtype in DTYPES:
        x = torch.randint(-8, 8, (37, 256)).to(dtype)
        for isa in [i for i in ISAS if _isa_ok(i)]:
            assert torch.equal(_run(isa, x, p), ref64(x, p).to(dtype)), (isa, dtype)


def test_names_and_errors():
    assert _ext.C.cpu_isa() in ISAS and _ext.C.best_cpu_isa() in ISAS
    with pytest.raises(ValueError, match="must be 'scalar', 'avx2', 'avx512', 'amx'"):
        _ext.C.set_cpu_isa("sse2")
    if not _isa_ok("amx"):
        with pytest.raises(ValueError, match="cannot run the 'amx' path"):
            _ext.C.set_cpu_isa("amx")


@pytest.mark.parametrize("cap", ["avx2", "avx512"])
def test_env_caps_the_isa(cap):
    """BITPRESS_CPU_ISA=<name> caps the path for the whole process (read once, at first use)."""
    if not _isa_ok(cap):
        pytest.skip(f"this CPU cannot run the {cap} path")
    code = "from bitpress._core import ext as _ext; print(_ext.C.cpu_isa(), _ext.C.best_cpu_isa())"
    env = dict(os.environ, BITPRESS_CPU_ISA=cap)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [cap, cap]


def test_amx_after_onednn():
    """oneDNN's AMX kernels (F.linear in bf16) configure and release the same thread's tiles
    between our calls: the AMX path must configure its own at every call (a stale configuration
    after a foreign tilerelease raises SIGILL; after a foreign ldtilecfg it computes garbage)."""
    if not _isa_ok("amx"):
        pytest.skip("this CPU has no AMX")
    K, N = 512, 256
    p = int4_layout.pack(make_quantized(K, N, 128, sym=True))
    w = torch.randn(384, K, dtype=torch.bfloat16)
    for M in [16, 64, 512, 33]:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        torch.nn.functional.linear(torch.randn(512, K, dtype=torch.bfloat16), w)
        out = _run("amx", x, p)
        torch.nn.functional.linear(torch.randn(M, K, dtype=torch.bfloat16), w)
        assert rel_err(out, ref64(x, p)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("isa", ["avx512", "amx"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N", [64, 130, 190, 250, 300, 449])
@pytest.mark.parametrize("sym", [True, False])
def test_m1_tiles_in_streams(isa, dtype, N, sym):
    # M = 1 reads kStreamTiles (4) tiles of 64 columns at once: 1, 3, 4, 5, 8 tiles (the last
    # partial) cover the whole groups and each remainder.
    if not _isa_ok(isa):
        pytest.skip(f"this CPU cannot run the {isa} path")
    p = int4_layout.pack(make_quantized(256, N, 64, sym, False))
    x = torch.randn(1, 256).to(dtype)
    out = _run(isa, x, p)
    assert out.shape == (1, N)
    err = rel_err(out, ref64(x, p))
    assert err <= TOLERANCE[dtype], (isa, err)
