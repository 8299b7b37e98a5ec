"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from bitpress._core import ext as _ext


def jit_function(kernel) -> JITFunction:
    """The compilable JITFunction of a kernel (also when TRITON_INTERPRET=1 wrapped it)."""
    if isinstance(kernel, JITFunction):
        return kernel
    return _jit_of(kernel.fn)


@functools.cache
def _jit_of(fn) -> JITFunction:
    return JITFunction(fn)


@functools.cache
def _interpreted_of(fn) -> InterpretedFunction:
    return InterpretedFunction(fn)


def for_device(kernel, device: torch.device):
    """The kernel to launch for tensors on ``device``: interpreted on the CPU, compiled on CUDA."""
    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        return _interpreted_of(kernel.fn)
    return kernel


@contextlib.contextmanager
def interpretable(device: torch.device, module: str):
    """Make the @triton.jit functions a kernel calls runnable by the interpreter (CPU tensors).

    Under the interpreter a kernel runs as Python, and its calls to @triton.jit functions (the
    helpers of its own ``module``, tl.sum / tl.max / tl.argmax / tl.cumsum / tl.philox ...)
    resolve through module globals. When triton was imported before TRITON_INTERPRET=1 was set
    (pytest sets it per test) those are compiled-mode JITFunctions, which the interpreter cannot
    call: for the duration of a CPU launch they are swapped for interpreted versions. Reduction
    combine functions stay: the interpreter recognizes them by identity. Not thread-safe (it
    patches modules), like the interpreter itself.
    """
    import triton.language as tl
    import triton.language.random as tl_random
    import triton.language.standard as tl_standard

    saved = []
    if device.type == "cpu":
        for mod in (tl, tl_standard, tl_random, sys.modules[module]):
            for name, f in list(vars(mod).items()):
                if (
                    isinstance(f, JITFunction)
                    and "combine" not in name
                    and not name.startswith("_elementwise")
                ):
                    saved.append((mod, name, f))
                    setattr(mod, name, _interpreted_of(f.fn))
    try:
        yield
    finally:
        for mod, name, f in reversed(saved):
            setattr(mod, name, f)


def launch(kernel, grid, device: torch.device, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` for tensors on ``device``: compiled on CUDA,
    under the Triton interpreter on the CPU (see :func:`interpretable`)."""
    fn = for_device(kernel, device)
    with interpretable(device, kernel.fn.__module__):
        return fn[grid](*args, **kwargs)


def keep_compilable(namespace: dict, names) -> None:
    """Importing a kernel module with TRITON_INTERPRET=1 makes ``@triton.jit`` return
    interpreted functions, which a compiled kernel cannot call: turn the named helpers back into
    JITFunctions (CPU launches swap them again, see :func:`interpretable`)."""
    for name in names:
        if isinstance(namespace[name], InterpretedFunction):
            namespace[name] = JITFunction(namespace[name].fn)


def poison_outputs() -> bool:

    return bool(_ext.C.set_poison_outputs(False)) and not _ext.C.set_poison_outputs(True)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or NaN / most-negative filled when output poisoning is on (tests)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs():
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(dtype).min)
    return out


__all__ = [
    "for_device",
    "interpretable",
    "jit_function",
    "keep_compilable",
    "launch",
    "new_output",
    "triton",
]
