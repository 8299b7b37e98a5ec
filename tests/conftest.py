"""Test harness: markers, output poisoning, and the Triton interpreter switch.

Markers (pyproject.toml): ``gpu`` tests are skipped without a CUDA GPU, with the reason;
``slow`` tests run in CI too; ``interpreter`` tests run Triton kernels on CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1 for the test) and must run in CI.
"""

from __future__ import annotations

import pytest
import torch

from bitpress import _ext
from bitpress.testing import poisoned_outputs


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and _ext.with_cuda():
        return
    reason = (
        "needs a CUDA GPU (none on this machine)"
        if not torch.cuda.is_available()
        else "bitpress._C was built without CUDA"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every op output starts as NaN / INT_MIN: an element a kernel forgets is caught."""
    with poisoned_outputs(True):
        yield


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    if request.node.get_closest_marker("interpreter"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
