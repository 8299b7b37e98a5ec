"""bitpress: compiled kernels for compressed LLM inference.

Ops live in :mod:`bitpress.ops` (``torch.ops.bitpress.*`` underneath); the backend choice in
:mod:`bitpress.backends`.
"""

from bitpress import (
    _ext,  # noqa: F401  (loads bitpress._C: the torch ops)
    ops,
    reference,
)
from bitpress.backends import available_backends, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "ops",
    "reference",
    "set_backend",
    "use_backend",
]
