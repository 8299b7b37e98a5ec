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
from bitpress.formats.checkpoint import from_pretrained, save_pretrained
from bitpress.nn import Int4Linear
from bitpress.quantize.api import Int4Config, quantize_

__version__ = "0.1.0"

__all__ = [
    "Int4Config",
    "Int4Linear",
    "__version__",
    "available_backends",
    "from_pretrained",
    "ops",
    "quantize_",
    "reference",
    "save_pretrained",
    "set_backend",
    "use_backend",
]
