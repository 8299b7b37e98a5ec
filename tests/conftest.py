"""Test harness: markers, output poisoning, the Triton interpreter switch and the shared
backend x device fixture.

Markers (pyproject.toml): ``gpu`` tests are skipped without a CUDA GPU, with the reason;
``slow`` tests run in CI too; ``interpreter`` tests run Triton kernels on CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1 for the test) and must run in CI; ``op(name)`` names the
op whose backends the ``backend_device`` fixture runs (or a module-level ``OP = name``).

Hypothesis (the hostile-input suite, ``tests/hostile``): profile ``ci`` (the default: fixed
example counts, no deadline, derandomized so that CI is reproducible) or ``dev`` (10x the
examples, random seeds, failures shrunk), chosen by ``HYPOTHESIS_PROFILE``; a failure prints
its example and the ``@reproduce_failure`` blob to replay it.

Layout: ``tests/<feature>/`` (int4, speculative), one file per op; core and CLI tests at the
top. Test files are imported by basename (no ``__init__.py``): every basename is unique, and
the helpers (``backend_matrix``, ``int4/int4_data``, ``int4/tiny_llama``) are importable from
the tests next to them.
"""

from __future__ import annotations

import os

import pytest
import torch
from backend_matrix import backend_device_params
from hypothesis import HealthCheck, Phase, settings

from bitpress._core import ext as _ext
from bitpress.testing import poisoned_outputs

_HYPOTHESIS_COMMON = dict(
    deadline=None,  # kernels compile / the interpreter warms up on first use
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# ci: no shrinking (it can take minutes on a kernel failure): the failing example is printed as
# drawn, and dev shrinks it.
settings.register_profile(
    "ci",
    max_examples=30,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    **_HYPOTHESIS_COMMON,
)
settings.register_profile("dev", max_examples=300, **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "op(name): the op whose backends the backend_device fixture runs"
    )


def pytest_generate_tests(metafunc):
    """``backend_device``: every (backend, device) registered for the test's op (module ``OP`` or
    ``@pytest.mark.op``), as a :class:`backend_matrix.BackendDevice`."""
    if "backend_device" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("op")
    op = marker.args[0] if marker else getattr(metafunc.module, "OP", None)
    if op is None:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: backend_device needs OP = '<op>' in the module "
            "or @pytest.mark.op('<op>')"
        )
    metafunc.parametrize("backend_device", backend_device_params(op))


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
