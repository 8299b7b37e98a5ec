"""Backend choice: the one place where a backend is chosen or forced.

Backends
--------
``cuda``       CUDA C++ kernels in bitpress._C (CUDA tensors; needs a CUDA build and a GPU).
``triton``     Triton kernels in bitpress.triton_kernels (CUDA tensors; CPU tensors under the
               Triton interpreter when ``TRITON_INTERPRET=1``, which is how tests run them).
``cpu``        C++ kernels in bitpress._C (CPU tensors; AVX-512 / AVX2 / scalar at run time).
``reference``  plain PyTorch from bitpress.reference (any device; slow, the ground truth).

By default each call takes the best backend for the device of its input, in the order
cuda > triton > reference for CUDA tensors and cpu > reference for CPU tensors, skipping backends
that do not implement the op. A backend can be forced, for every op, in three equivalent ways:

* ``BITPRESS_BACKEND=triton`` in the environment (read at import),
* ``bitpress.set_backend("triton")`` (``None`` returns to the default),
* ``with bitpress.use_backend("triton"): ...`` (restores the previous choice on exit).

A forced backend that cannot run the op on the given device raises an error naming the op, the
backend and the device; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator

import torch

from bitpress import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")
_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_state = threading.local()
_global_forced: str | None = None


def _validate(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"bitpress: backend must be one of {BACKENDS} or None, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force ``name`` for every op in every thread; ``None`` restores the default choice."""
    global _global_forced
    _global_forced = _validate(name)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` in this thread inside the ``with`` block."""
    prev = getattr(_state, "forced", _Unset)
    _state.forced = _validate(name)
    try:
        yield
    finally:
        if prev is _Unset:
            del _state.forced
        else:
            _state.forced = prev


class _Unset:
    pass


def forced_backend() -> str | None:
    """The backend forced now (context manager > set_backend > BITPRESS_BACKEND), or None."""
    local = getattr(_state, "forced", _Unset)
    if local is not _Unset:
        return local
    return _global_forced


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_available(name: str, device: torch.device | str) -> bool:
    """Whether backend ``name`` can run on ``device`` on this machine."""
    dev = torch.device(device).type
    if name == "reference":
        return True
    if name == "cpu":
        return dev == "cpu"
    if name == "cuda":
        return dev == "cuda" and _ext.with_cuda() and torch.cuda.is_available()
    if name == "triton":
        if not _have_triton():
            return False
        return (dev == "cuda" and torch.cuda.is_available()) or (
            dev == "cpu" and triton_interpret()
        )
    return False


def available_backends() -> list[str]:
    """Backends this machine can run, for any device it has, best first."""
    devices = ["cuda"] if torch.cuda.is_available() else []
    devices.append("cpu")
    return [b for b in BACKENDS if any(backend_available(b, d) for d in devices)]


# op name -> backend -> implementation
_IMPLS: dict[str, dict[str, Callable]] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register the implementation of ``op`` on ``backend``."""
    _validate(backend)

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def implementations(op: str) -> dict[str, Callable]:
    return dict(_IMPLS.get(op, {}))


def select(op: str, device: torch.device | str, backend: str | None = None) -> tuple[str, Callable]:
    """The (backend, implementation) that runs ``op`` on ``device``.

    ``backend`` overrides the forced and default choice for this call.
    """
    impls = _IMPLS.get(op, {})
    dev = torch.device(device)
    name = _validate(backend) or forced_backend()
    if name is not None:
        if name not in impls:
            raise NotImplementedError(
                f"bitpress.{op}: the {name!r} backend does not implement this op "
                f"(it has: {sorted(impls)})"
            )
        if not backend_available(name, dev):
            hint = (
                " (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"
                if (name == "triton" and dev.type == "cpu")
                else ""
            )
            raise RuntimeError(
                f"bitpress.{op}: backend {name!r} cannot run on device {dev} on this machine{hint}"
            )
        return name, impls[name]
    for name in _DEFAULT_ORDER.get(dev.type, ("reference",)):
        if name in impls and backend_available(name, dev):
            return name, impls[name]
    raise RuntimeError(f"bitpress.{op}: no backend can run on device {dev}")


if os.environ.get("BITPRESS_BACKEND"):
    set_backend(os.environ["BITPRESS_BACKEND"])
