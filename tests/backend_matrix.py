"""The backend x device matrix of an op, built from its registrations in
:mod:`bitpress._core.backends`, so that a new op or backend is tested everywhere it runs.

For each backend registered for ``op`` (its :class:`~bitpress.backends.Capability`):

* a backend that runs on CPU tensors (``cpu``, ``reference``): ``(backend, cpu)``;
* a backend that runs on CPU tensors under the Triton interpreter (``triton``):
  ``(backend, cpu)`` marked ``interpreter`` (the harness sets ``TRITON_INTERPRET=1``);
* a compiled backend that runs on CUDA tensors (``cuda``, ``triton``): ``(backend, cuda)``
  marked ``gpu`` (skipped without a GPU, with the reason). The reference on CUDA is left out
  (it is what the others are compared with), unless ``reference_on_gpu``.

Tests take it as the ``backend_device`` fixture (``tests/conftest.py``), naming their op with a
module-level ``OP = "<op>"`` or ``@pytest.mark.op("<op>")``, or build parameter lists with
:func:`backend_device_params` where a case table is crossed with the backends.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import pytest
import torch

import bitpress  # noqa: F401  (every op registers its backends)
from bitpress._core import backends

HAVE_TRITON = importlib.util.find_spec("triton") is not None


class BackendDevice(NamedTuple):
    backend: str
    device: torch.device


def backend_device_params(
    op: str, *, exclude: tuple[str, ...] = (), reference_on_gpu: bool = False
) -> list:
    """``pytest.param(BackendDevice(backend, device), marks=..., id="backend-device")`` for every
    (backend, device) pair registered for ``op`` that a machine can run (see module docstring)."""
    caps = backends.capabilities(op)
    if not caps:
        raise LookupError(f"no backend is registered for op {op!r}")
    params = []
    for backend, cap in caps.items():
        if backend in exclude:
            continue
        runs_on = set(cap.devices)
        if "any" in runs_on:
            runs_on |= {"cpu", "cuda"}
        if "cpu" in runs_on:
            params.append(
                pytest.param(BackendDevice(backend, torch.device("cpu")), id=f"{backend}-cpu")
            )
        elif cap.interpreter:
            marks = [pytest.mark.interpreter]
            if not HAVE_TRITON:
                marks.append(pytest.mark.skip(reason="triton is not installed"))
            params.append(
                pytest.param(
                    BackendDevice(backend, torch.device("cpu")),
                    marks=marks,
                    id=f"{backend}-interpreter",
                )
            )
        if "cuda" in runs_on and (backend != "reference" or reference_on_gpu):
            params.append(
                pytest.param(
                    BackendDevice(backend, torch.device("cuda")),
                    marks=pytest.mark.gpu,
                    id=f"{backend}-cuda",
                )
            )
    return params
