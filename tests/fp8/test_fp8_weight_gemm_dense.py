"""fp8_weight_gemm's dense CPU path (bf16 x, per-tensor / per-channel scales: W decoded to bf16,
at::mm, the scales and bias in float32 after) against a float64 reference, forced through
BITPRESS_FP8_CPU_PATH in a subprocess on every CPU ISA path this machine runs (the decode differs
per path); and the measured choice (auto) at M >= 128: right answers, the same bits call after
call."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from fp8_data import TOLERANCE, e4m3, scale

from bitpress import ops
from bitpress.fp8 import reference
from bitpress.testing import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = r"""
import sys, torch
sys.path.insert(0, HERE)
from fp8_data import TOLERANCE, e4m3, isa_ok, scale
from bitpress import ops
from bitpress._core import ext
from bitpress.fp8 import reference
from bitpress.testing import rel_err

torch.manual_seed(0)
bad = []
for isa in ["amx", "avx512", "avx2", "scalar"]:
    if not isa_ok(isa):
        continue
    ext.C.set_cpu_isa(isa)
    for M, K, N in [(1, 64, 16), (5, 300, 77), (130, 520, 129), (129, 33, 1)]:
        for layout in ["tensor", "tensor1", "row"]:
            x = torch.randn(M + 3, K).to(torch.bfloat16)[::2][:M]  # non-contiguous rows
            if x.shape[0] < M:
                x = torch.randn(M, K).to(torch.bfloat16)
            w = e4m3((N, K))
            ws = scale(layout, N, K, weight=True)
            bias = torch.randn(N).to(torch.bfloat16) if N % 2 else None
            y = ops.fp8_weight_gemm(x, w, ws, bias, backend="cpu")
            ref = x.double() @ reference.dequantize_weight(w, ws).t()
            if bias is not None:
                ref = ref + bias.double()
            err = rel_err(y, ref)
            if not (y.dtype == torch.bfloat16 and err < TOLERANCE[torch.bfloat16]):
                bad.append((isa, M, K, N, layout, float(err)))
    # NaN weights reach the output column as NaN.
    w = e4m3((20, 64))
    w.view(torch.uint8)[3, 5] = 0x7F
    y = ops.fp8_weight_gemm(torch.randn(4, 64).bfloat16(), w, torch.ones(20, 1), backend="cpu")
    if not (y[:, 3].isnan().all() and not y[:, :3].isnan().any()):
        bad.append((isa, "nan"))
print("bad", bad)
"""


@pytest.mark.parametrize("path", ["dense", "fused"])
def test_forced_path_matches_reference(path):
    env = dict(os.environ, BITPRESS_FP8_CPU_PATH=path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    code = "HERE = " + repr(HERE) + "\n" + SCRIPT
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "bad []", out.stdout[-2000:]


@pytest.mark.parametrize("layout", ["tensor", "row", "block"])
@pytest.mark.parametrize("M", [128, 200])
def test_measured_choice(M, layout):
    """At M >= 128 the first call of a shape measures both paths; every call answers within the
    tolerance and repeated calls give the same bits."""
    K, N = 264, 136 + M % 7
    x = torch.randn(M, K).to(torch.bfloat16)
    w = e4m3((N, K))
    ws = scale(layout, N, K, weight=True)
    ys = [ops.fp8_weight_gemm(x, w, ws, backend="cpu") for _ in range(3)]
    ref = x.double() @ reference.dequantize_weight(w, ws).t()
    assert rel_err(ys[0], ref) < TOLERANCE[torch.bfloat16]
    assert torch.equal(ys[1].view(torch.int16), ys[2].view(torch.int16))
