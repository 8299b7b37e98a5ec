"""Argument checks shared by the Python paths of every op (fakes, Triton, reference).

The compiled backends check their arguments in C++ (``csrc/torch/glue.h``) with the same
messages: ``<op>: <argument> must be <expected>, got <what>``. A wrong dtype raises TypeError,
anything else RuntimeError, as TORCH_CHECK_TYPE / TORCH_CHECK do.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fail(op: str, msg: str, exc: type[Exception] = RuntimeError) -> None:
    raise exc(f"{op}: {msg}")


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        allowed = " or ".join(dtype_name(d) for d in dtypes)
        fail(op, f"{name} must be {allowed}, got {dtype_name(t.dtype)}", TypeError)


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, shape: str) -> None:
    if t.dim() != dim:
        fail(op, f"{name} must be {dim}-D {shape}, got shape {list(t.shape)}")


def check_size(op: str, name: str, t: torch.Tensor, d: int, expected: int, what: str) -> None:
    if t.shape[d] != expected:
        fail(op, f"{name}.size({d}) must be {expected} ({what}), got shape {list(t.shape)}")


def check_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        fail(op, f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
