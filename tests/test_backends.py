"""Backend choice: defaults, the three ways to force one, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import bitpress
from bitpress import backends, ops
from bitpress._core import backends as core_backends
from bitpress._core import registry
from bitpress._core.backends import Implementation


def _dequantize_args():
    """A small int4_dequantize call (the registry's selftest case, on the CPU)."""
    case = registry.op("int4_dequantize").cases()[1]
    return case.make(torch.device("cpu"), torch.Generator().manual_seed(0), "cpu")


def test_available_backends():
    avail = bitpress.available_backends()
    assert "cpu" in avail and "reference" in avail
    assert ("cuda" in avail) == (torch.cuda.is_available() and core_backends.ext.with_cuda())
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
    args = _dequantize_args()
    calls = []
    impls = core_backends._IMPLS["int4_dequantize"]
    orig = impls["reference"]
    impls["reference"] = Implementation(lambda *a: calls.append(1) or orig.fn(*a), orig.capability)
    try:
        with bitpress.use_backend("reference"):
            ops.int4_dequantize(*args)
    finally:
        impls["reference"] = orig
    assert calls == [1]


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        bitpress.set_backend("tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.int4_dequantize(*_dequantize_args(), backend="tpu")


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _dequantize_args()
    with pytest.raises(
        RuntimeError,
        match=r"bitpress.int4_dequantize: backend 'triton' cannot serve this call: "
        r"Triton runs on CPU tensors only under TRITON_INTERPRET=1",
    ):
        ops.int4_dequantize(*args, backend="triton")
    with pytest.raises(
        RuntimeError,
        match=r"bitpress.int4_dequantize: backend 'cuda' cannot serve this call: "
        r"it runs on cuda tensors, not cpu",
    ):
        ops.int4_dequantize(*args, backend="cuda")
    # A backend that does not implement the op at all.
    with pytest.raises(
        NotImplementedError,
        match=r"bitpress.int4_gemm_repack: backend 'triton' cannot serve this call: "
        r"the 'triton' backend does not implement this op",
    ):
        ops.int4_gemm_repack(torch.zeros(2, 8, dtype=torch.int32), backend="triton")


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
