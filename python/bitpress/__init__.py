"""bitpress: compiled kernels for compressed LLM inference.

Layout: one package per feature (:mod:`bitpress.int4`, :mod:`bitpress.fp8`,
:mod:`bitpress.sparse24`, :mod:`bitpress.speculative`), over a shared core. Layers, each
importing only those below it (no import circles, and no function-local import of a bitpress
module):

1. core (:mod:`bitpress._core`): the compiled extension, backend choice with per-op
   capabilities, the registries (ops, ``quantize_`` handlers, checkpoint formats), argument
   checks;
2. layouts and references of each feature (``<feature>.layout``, ``<feature>.reference``):
   only torch and core;
3. ops (``<feature>.ops``; :mod:`bitpress.ops` re-exports every op): the public function, its
   argument check, fake, backends and registry entry;
4. modules and quantizers (``Int4Linear``, RTN, GPTQ, ``Int4Config``);
5. checkpoints (:mod:`bitpress.checkpoint`, with each feature's format),
   :func:`bitpress.quantize_`, and :func:`bitpress.compress` (:mod:`bitpress.pipeline`: distill,
   prune, recover, quantize);
6. the CLI (``python -m bitpress``: info, selftest, demo: the compression report,
   :mod:`bitpress.report`).

The backend choice is documented in :mod:`bitpress.backends`.
"""

from bitpress import (  # noqa: F401  (features register here)
    compressed_tensors,  # the compressed-tensors format; its schemes register with features
    fp8,
    int4,
    ops,
    reference,
    sparse24,
    speculative,
)
from bitpress._core import ext as _ext  # noqa: F401  (loads bitpress._C: the torch ops)
from bitpress.backends import available_backends, set_backend, use_backend
from bitpress.checkpoint import from_pretrained, save_pretrained
from bitpress.fp8 import Fp8Config, Fp8Linear
from bitpress.int4 import Int4Config, Int4Linear
from bitpress.pipeline import DistillConfig, RecoverConfig, compress
from bitpress.quantize import quantize_, sparsify_
from bitpress.sparse24 import Sparse24Config, Sparse24Int4Linear, Sparse24Linear
from bitpress.speculative.generator import generate

__version__ = "0.1.0"

__all__ = [
    "DistillConfig",
    "Fp8Config",
    "Fp8Linear",
    "Int4Config",
    "Int4Linear",
    "RecoverConfig",
    "Sparse24Config",
    "Sparse24Int4Linear",
    "Sparse24Linear",
    "__version__",
    "available_backends",
    "compress",
    "from_pretrained",
    "generate",
    "ops",
    "quantize_",
    "reference",
    "save_pretrained",
    "set_backend",
    "sparsify_",
    "use_backend",
]
