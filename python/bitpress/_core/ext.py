"""Loads the compiled extension bitpress._C, which registers the torch ops bitpress::*."""

from __future__ import annotations

import torch  # noqa: F401  (_C links against libtorch/libc10: load them first)

try:
    from bitpress import _C  # noqa: F401  (registers torch.ops.bitpress.*)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "bitpress: the compiled extension bitpress._C is missing or does not load "
        f"({e}). Build it with `make build` (or `pip install --no-build-isolation -e .`)."
    ) from e

C = _C


def with_cuda() -> bool:
    """Whether the CUDA kernels were compiled into bitpress._C."""
    return bool(_C.with_cuda())


def cuda_archs() -> list[str]:
    """The CUDA archs compiled into bitpress._C, e.g. ['sm_80', 'sm_90a']."""
    return [a for a in _C.cuda_archs().split(",") if a]
