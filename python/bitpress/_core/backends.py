"""Backend choice: the one place where a backend is chosen or forced.

Backends
--------
``cuda``       CUDA C++ kernels in bitpress._C (CUDA tensors; needs a CUDA build whose compiled
               images fit the GPU).
``triton``     Triton kernels in bitpress.triton_kernels (CUDA tensors; CPU tensors under the
               Triton interpreter when ``TRITON_INTERPRET=1``, which is how tests run them).
``cpu``        C++ kernels in bitpress._C (CPU tensors; AMX / AVX-512 / AVX2 / scalar at run time).
``reference``  plain PyTorch (any device; slow, the ground truth).

Each op's implementation on a backend is registered with a :class:`Capability`: the device
types it runs on, the CUDA compute capabilities (a kernel compiled only for sm_90a must not run on
an sm_80 device), the dtypes of its main input and the CPU features it needs. By default a call
takes the first backend, in the order cuda > triton > reference for CUDA tensors and
cpu > reference for CPU tensors, whose capability covers the call. A backend can be forced, for
every op, in three equivalent ways:

* ``BITPRESS_BACKEND=triton`` in the environment (read at import),
* ``bitpress.set_backend("triton")`` (``None`` returns to the default),
* ``with bitpress.use_backend("triton"): ...`` (restores the previous choice on exit),

or for one call with the op's ``backend=`` argument. A forced backend that cannot serve the call
raises an error naming the op, the backend and why; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from bitpress._core import ext

BACKENDS = ("cuda", "triton", "cpu", "reference")
# Meta tensors (shape propagation, torch.compile tracing) go to the compiled op, whose meta kernel
# is the op's fake: shapes and dtypes are checked, nothing is computed.
_DEFAULT_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
    "meta": ("cpu", "reference"),
}

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


# --------------------------------------------------------------------------------------------
# What a call needs and what a backend offers
# --------------------------------------------------------------------------------------------


class Device(NamedTuple):
    """The facts of a device that capabilities test: its type and, on CUDA, its compute
    capability (major, minor). A tuple: it keys the cache of choices cheaply."""

    type: str
    cc: tuple[int, int] | None = None

    @staticmethod
    def of(device: torch.device | str) -> Device:
        hit = _DEVICES.get(device)
        if hit is not None:
            return hit
        dev = device if isinstance(device, torch.device) else torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available():
            return _cuda_device(dev.index if dev.index is not None else torch.cuda.current_device())
        out = _DEVICES[device] = Device(dev.type)
        return out


# Non-CUDA devices by their torch.device (or string): a call's device costs one dict lookup.
_DEVICES: dict = {}


@functools.cache
def _cuda_device(index: int) -> Device:
    return Device("cuda", tuple(torch.cuda.get_device_capability(index)))


def cuda_image_fits(cc: tuple[int, int], archs: list[str]) -> bool:
    """Whether one of the compiled ``archs`` (``sm_80``, ``sm_90a``, ``compute_90`` for PTX) runs
    on a device of compute capability ``cc``: a cubin ``sm_XY`` runs on ``X.y`` with ``y >= Y``
    (``sm_XYa`` only on ``X.Y`` itself), PTX ``compute_XY`` is JIT-compiled for any ``cc >= XY``."""
    for a in archs:
        kind, _, num = a.partition("_")
        arch_specific = num.endswith("a")
        num = num.rstrip("af")
        if not num.isdigit():
            continue
        major, minor = int(num[:-1]), int(num[-1])
        if kind == "compute" and cc >= (major, minor):
            return True
        if (
            kind == "sm"
            and cc[0] == major
            and (cc[1] == minor or (cc[1] > minor and not arch_specific))
        ):
            return True
    return False


def _cpu_features() -> frozenset[str]:
    return frozenset(f for f in ext.C.cpu_features().split(",") if f)


@dataclasses.dataclass(frozen=True)
class Capability:
    """What one backend implementation of one op supports.

    devices : device types it runs on (``"any"``: every device).
    dtypes : dtypes of the op's main input it accepts (None: any; the op's own check then
        reports a wrong dtype).
    min_cc : lowest CUDA compute capability (CUDA devices).
    compiled_cuda : needs a CUDA image in bitpress._C that fits the device (the ``cuda`` backend).
    cpu_features : CPU features it needs (names of ``bitpress._C.cpu_features()``).
    interpreter : runs on CPU tensors under the Triton interpreter (``triton`` backend).
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None = None
    min_cc: tuple[int, int] | None = None
    compiled_cuda: bool = False
    cpu_features: tuple[str, ...] = ()
    interpreter: bool = False

    def refusal(self, device: Device, dtype: torch.dtype | None = None) -> str | None:
        """None when this implementation can serve a call on ``device`` with main input dtype
        ``dtype``; otherwise the reason, as a phrase."""
        if device.type == "cpu" and self.interpreter:
            if not _have_triton():
                return "triton is not installed"
            if not triton_interpret():
                return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        elif device.type not in self.devices and "any" not in self.devices:
            return f"it runs on {' or '.join(self.devices)} tensors, not {device.type}"
        if device.type == "cuda":
            if not torch.cuda.is_available() and device.cc is None:
                return "no CUDA device is available"
            if self.interpreter and not _have_triton():
                return "triton is not installed"
            if self.compiled_cuda:
                if not ext.with_cuda():
                    return "bitpress._C was built without CUDA kernels"
                if device.cc is not None and not cuda_image_fits(device.cc, ext.cuda_archs()):
                    return (
                        f"bitpress._C has no CUDA image for sm_{device.cc[0]}{device.cc[1]} "
                        f"(compiled: {', '.join(ext.cuda_archs())})"
                    )
            if self.min_cc is not None and device.cc is not None and device.cc < self.min_cc:
                return (
                    f"it needs compute capability {self.min_cc[0]}.{self.min_cc[1]} or newer, "
                    f"the device has {device.cc[0]}.{device.cc[1]}"
                )
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"it takes {names} inputs, not {str(dtype).removeprefix('torch.')}"
        missing = [f for f in self.cpu_features if f not in _cpu_features()]
        if device.type == "cpu" and missing:
            return f"this CPU lacks {', '.join(missing)}"
        return None


# The default capability of each backend; an op registers a narrower one where it needs to.
DEFAULT_CAPABILITY = {
    "cuda": Capability(devices=("cuda",), compiled_cuda=True),
    "triton": Capability(devices=("cuda",), interpreter=True),
    "cpu": Capability(devices=("cpu", "meta")),
    "reference": Capability(devices=("any",)),
}


@dataclasses.dataclass(frozen=True)
class Implementation:
    fn: Callable
    capability: Capability


# op name -> backend -> implementation
_IMPLS: dict[str, dict[str, Implementation]] = {}


def register(
    op: str, backend: str, capability: Capability | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: register the implementation of ``op`` on ``backend``, with what it supports
    (default: the backend's :data:`DEFAULT_CAPABILITY`)."""
    _validate(backend)
    cap = capability or DEFAULT_CAPABILITY[backend]

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = Implementation(fn, cap)
        return fn

    return deco


def implementations(op: str) -> dict[str, Callable]:
    return {b: impl.fn for b, impl in _IMPLS.get(op, {}).items()}


def default_order(device_type: str) -> tuple[str, ...]:
    """The backends the default choice tries for tensors of ``device_type``, best first."""
    return _DEFAULT_ORDER.get(device_type, ("reference",))


def capabilities(op: str) -> dict[str, Capability]:
    return {b: impl.capability for b, impl in _IMPLS.get(op, {}).items()}


def refusal(
    op: str, backend: str, device: torch.device | str | Device, dtype: torch.dtype | None = None
) -> str | None:
    """None when ``backend`` can run ``op`` for this call; otherwise why not."""
    impl = _IMPLS.get(op, {}).get(backend)
    if impl is None:
        has = sorted(_IMPLS.get(op, {}))
        return f"the {backend!r} backend does not implement this op (it has: {has})"
    dev = device if isinstance(device, Device) else Device.of(device)
    return impl.capability.refusal(dev, dtype)


def backend_available(name: str, device: torch.device | str, op: str | None = None) -> bool:
    """Whether backend ``name`` can run on ``device`` on this machine (for ``op``, when given;
    otherwise with the backend's default capability)."""
    dev = Device.of(device)
    if op is not None:
        return refusal(op, name, dev) is None
    return DEFAULT_CAPABILITY[name].refusal(dev) is None


def available_backends() -> list[str]:
    """Backends this machine can run, for any device it has, best first."""
    devices = ["cuda"] if torch.cuda.is_available() else []
    devices.append("cpu")
    return [b for b in BACKENDS if any(backend_available(b, d) for d in devices)]


def select(
    op: str,
    device: torch.device | str,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[str, Callable]:
    """The (backend, implementation) that runs ``op`` for a call on ``device`` whose main input
    has ``dtype``. ``backend`` overrides the forced and default choice for this call."""
    name = _validate(backend) or forced_backend()
    dev = Device.of(device)
    # The choice depends only on these (the registrations are made at import; the capabilities
    # read the environment only through TRITON_INTERPRET): cache it, a call costs ~1 us then.
    # TRITON_INTERPRET matters only where Triton may serve a CPU tensor: a forced triton.
    key = (op, dev, name, dtype, triton_interpret() if name == "triton" else None)
    hit = _SELECTED.get(key)
    # Valid while the implementation chosen is still the one registered (tests swap them).
    if hit is not None and _IMPLS.get(op, {}).get(hit[0]) is hit[1]:
        return hit[0], hit[1].fn
    chosen, impl = _select(op, dev, name, dtype)
    _SELECTED[key] = (chosen, impl)
    return chosen, impl.fn


_SELECTED: dict[tuple, tuple[str, Implementation]] = {}


def _select(op: str, dev: Device, name: str | None, dtype) -> tuple[str, Implementation]:
    impls = _IMPLS.get(op, {})
    if name is not None:
        why = refusal(op, name, dev, dtype)
        if why is not None:
            exc = NotImplementedError if name not in impls else RuntimeError
            raise exc(f"bitpress.{op}: backend {name!r} cannot serve this call: {why}")
        return name, impls[name]
    reasons = []
    for name in default_order(dev.type):
        if name not in impls:
            continue
        why = impls[name].capability.refusal(dev, dtype)
        if why is None:
            return name, impls[name]
        reasons.append(f"{name}: {why}")
    raise RuntimeError(
        f"bitpress.{op}: no backend can serve a call on {dev.type}"
        + (f" ({'; '.join(reasons)})" if reasons else "")
    )


if os.environ.get("BITPRESS_BACKEND"):
    set_backend(os.environ["BITPRESS_BACKEND"])
