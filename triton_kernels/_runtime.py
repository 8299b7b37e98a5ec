"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import sys

import torch
import triton
from triton.runtime.autotuner import Autotuner
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


def _is_compiled(fn) -> bool:
    # InterpretedFunction is not a JITFunction subclass today; test both ways to stay safe.
    return isinstance(fn, JITFunction) and not isinstance(fn, InterpretedFunction)


@functools.cache
def _compiled_autotuner(tuner: Autotuner) -> Autotuner:
    # The same autotuner (configs, key, pruning, hooks) around the compiled JITFunction, with its
    # own empty cache of tuned configs.
    out = copy.copy(tuner)
    out.fn = jit_function(tuner.fn)
    out.cache = {}
    knobs = getattr(getattr(triton, "knobs", None), "autotuning", None)
    out.cache_results = bool(getattr(knobs, "cache", False))
    return out


def for_device(kernel, device: torch.device):
    """The kernel to launch for tensors on ``device``: interpreted on the CPU, compiled on CUDA.

    ``@triton.jit`` decides at decoration time: a kernel module first imported while
    TRITON_INTERPRET=1 was set holds InterpretedFunctions (and autotuners around them), which
    would run a CUDA launch as Python on the host. On CUDA such a kernel is replaced by the
    JITFunction of the same function, an autotuner by a copy around that JITFunction.
    """
    if device.type == "cpu":
        if isinstance(kernel, Autotuner):  # no benchmarking under the interpreter
            kernel = kernel.fn
        return kernel if isinstance(kernel, InterpretedFunction) else _interpreted_of(kernel.fn)
    if isinstance(kernel, Autotuner):
        return kernel if _is_compiled(kernel.fn) else _compiled_autotuner(kernel)
    return kernel if _is_compiled(kernel) else jit_function(kernel)


def _module_of(kernel) -> str:
    fn = kernel
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn.__module__


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
                    _is_compiled(f)
                    and "combine" not in name
                    and not name.startswith("_elementwise")
                ):
                    saved.append((mod, name, f))
                    setattr(mod, name, _interpreted_of(f.fn))
    elif _TL_INTERPRETED:
        # triton itself was imported under TRITON_INTERPRET=1: its @jit library functions
        # (tl.sum, tl.cdiv, tl.rand ...) are InterpretedFunctions, which a compiled kernel cannot
        # call; for the duration of a CUDA launch they are their JITFunctions.
        for mod in (tl, tl_standard, tl_random, sys.modules[module]):
            for name, f in list(vars(mod).items()):
                if isinstance(f, InterpretedFunction):
                    saved.append((mod, name, f))
                    setattr(mod, name, _jit_of(f.fn))
    try:
        yield
    finally:
        for mod, name, f in reversed(saved):
            setattr(mod, name, f)


def launch(kernel, grid, device: torch.device, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` for tensors on ``device``: compiled on CUDA (an
    autotuner tunes there), under the Triton interpreter on the CPU (see :func:`interpretable`).
    Every launch of a bitpress Triton kernel goes through here."""
    fn = for_device(kernel, device)
    with interpretable(device, _module_of(kernel)):
        return fn[grid](*args, **kwargs)


# Whether triton.language's own @jit functions were decorated under the interpreter.
_TL_INTERPRETED = isinstance(getattr(triton.language.standard, "cdiv", None), InterpretedFunction)


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
