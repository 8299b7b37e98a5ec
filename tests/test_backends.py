"""Backend choice: defaults, the three ways to force one, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from int4_data import make_int4

import bitpress
from bitpress import backends, ops


def test_available_backends():
    avail = bitpress.available_backends()
    assert "cpu" in avail and "reference" in avail
    assert ("cuda" in avail) == (torch.cuda.is_available() and bitpress._ext.with_cuda())
    assert list(avail) == [b for b in backends.BACKENDS if b in avail]  # best first


def test_default_is_cpu_kernel_for_cpu_tensors():
    assert backends.select("int4_dequantize", "cpu")[0] == "cpu"


def test_set_backend_and_context_manager():
    try:
        bitpress.set_backend("reference")
        assert backends.select("int4_dequantize", "cpu")[0] == "reference"
        with bitpress.use_backend("cpu"):
            assert backends.select("int4_dequantize", "cpu")[0] == "cpu"
            with bitpress.use_backend(None):  # None inside a block: the default choice
                assert backends.select("int4_dequantize", "cpu")[0] == "cpu"
        assert backends.select("int4_dequantize", "cpu")[0] == "reference"
    finally:
        bitpress.set_backend(None)
    assert backends.select("int4_dequantize", "cpu")[0] == "cpu"


def test_forced_backend_is_used():
    """Forcing a backend really runs it: the reference path accepts what only it would."""
    d = make_int4(16, 8, 8, torch.float16)
    calls = []
    impls = backends._IMPLS["int4_dequantize"]
    orig = impls["reference"]
    impls["reference"] = lambda *a: calls.append(1) or orig(*a)
    try:
        with bitpress.use_backend("reference"):
            ops.int4_dequantize(*d.args())
    finally:
        impls["reference"] = orig
    assert calls == [1]


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        bitpress.set_backend("tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.int4_dequantize(*make_int4(8, 1, 8).args(), backend="tpu")


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    d = make_int4(8, 1, 8)
    with pytest.raises(
        RuntimeError, match="backend 'triton' cannot run on device cpu.*TRITON_INTERPRET=1"
    ):
        ops.int4_dequantize(*d.args(), backend="triton")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on device cpu"):
        ops.int4_dequantize(*d.args(), backend="cuda")


def test_environment_variable():
    code = (
        "import bitpress.backends as b; "
        "print(b.forced_backend(), b.select('int4_dequantize', 'cpu')[0])"
    )
    env = dict(os.environ, BITPRESS_BACKEND="reference")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["reference", "reference"]
