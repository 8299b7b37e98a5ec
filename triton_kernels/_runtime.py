"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


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


def poison_outputs() -> bool:
    from bitpress import _ext

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


__all__ = ["for_device", "jit_function", "new_output", "triton"]
