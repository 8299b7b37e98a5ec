"""2:4 semi-structured sparsity: at most 2 nonzeros in every 4 consecutive weights along K.

Layers of this package, each importing only those before it:

1. :mod:`~bitpress.sparse24.layout` (the interchange format and the kernel layouts,
   ``Sparse24Layout``), :mod:`~bitpress.sparse24.reference` (plain torch): torch and core only;
2. :mod:`~bitpress.sparse24.ops`: ``sparse24_compress``, ``sparse24_gemm``,
   ``sparse24_int4_gemm``;
3. :mod:`~bitpress.sparse24.hostile`: what the hostile-input suite (``tests/hostile``) feeds the
   ops;
4. :mod:`~bitpress.sparse24.prune` (magnitude, Wanda, SparseGPT), :mod:`~bitpress.sparse24.modules`
   (``Sparse24Linear``, ``Sparse24Int4Linear``), :mod:`~bitpress.sparse24.config`
   (``Sparse24Config`` and the ``sparsify_`` handler);
5. checkpoint formats: :mod:`~bitpress.sparse24.format_bitmask` (compressed-tensors
   "sparse-24-bitmask" and dense 2:4 checkpoints), :mod:`~bitpress.sparse24.format_marlin24`
   (compressed-tensors / vLLM "marlin-24").
"""

from bitpress.sparse24 import (
    format_bitmask,  # noqa: F401  (registers the compressed-tensors scheme)
    format_marlin24,  # noqa: F401  (registers the compressed-tensors scheme)
    hostile,  # noqa: F401  (registers the ops' hostile specs)
    layout_mma,
    layout_mma_int4,
    ops,  # noqa: F401  (registers the 2:4 ops)
)
from bitpress.sparse24.config import Sparse24Config
from bitpress.sparse24.layout import READERS, READERS_INT4, Sparse24Layout
from bitpress.sparse24.modules import Sparse24Int4Linear, Sparse24Linear

# The reference reads weights in the mma.sp layouts back through their converters (layout.py
# imports neither, so that the layouts stay independent of each other).
READERS[Sparse24Layout.MMA] = layout_mma.from_mma
READERS_INT4[Sparse24Layout.MMA] = layout_mma_int4.from_mma_int4

__all__ = ["Sparse24Config", "Sparse24Int4Linear", "Sparse24Layout", "Sparse24Linear"]
