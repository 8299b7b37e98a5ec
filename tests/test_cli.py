"""python -m bitpress info / selftest."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from bitpress import selftest
from bitpress._core import ext as _ext
from bitpress._core import registry


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "bitpress", *args], capture_output=True, text=True, check=False
    )


def test_info():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    for key in ("bitpress", "torch", "CPU features", "CUDA kernels", "backends"):
        assert key in res.stdout
    for name, spec in registry.ops().items():  # every registered op, with its feature
        assert re.search(rf"^op {name} +\[{spec.feature}\] cpu: cpu > ", res.stdout, re.M), name
    assert _ext.C.cpu_features().split(",")[0] in res.stdout
    if _ext.with_cuda():
        assert "sm_80" in res.stdout and "sm_90a" in res.stdout


def test_selftest_passes():
    res = _run("selftest")
    assert res.returncode == 0, res.stdout + res.stderr
    ops = registry.ops()
    assert ops
    for op in ops:  # every registered op runs on the CPU kernel
        assert re.search(rf"\| {op} +\| cpu ", res.stdout), op
    assert " 0 failed" in res.stdout


def test_selftest_reports_failure(capsys):
    """A case whose reference disagrees with the kernel must fail and give exit status 1."""
    case = selftest.default_cases()[1]
    wrong = selftest.Case(
        case.op, "wrong reference", case.make, lambda *a: case.ref(*a) + 1, 0.0, 0
    )
    assert selftest.main([wrong]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 failed" in out


def test_selftest_reports_exceptions(capsys):
    def make(device, gen, backend):
        return (torch.zeros(1, 1), torch.zeros(1, 1), None, None, 8, None)  # qweight not int32

    bad = selftest.Case("int4_dequantize", "bad input", make, lambda *a: a[0], 0.0, 0)
    assert selftest.main([bad]) == 1
    assert "TypeError" in capsys.readouterr().out
