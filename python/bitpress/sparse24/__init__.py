"""2:4 semi-structured sparsity: at most 2 nonzeros in every 4 consecutive weights along K.

Layers of this package, each importing only those before it:

1. :mod:`~bitpress.sparse24.layout` (the interchange format and the kernel layouts,
   ``Sparse24Layout``), :mod:`~bitpress.sparse24.reference` (plain torch): torch and core only;
2. :mod:`~bitpress.sparse24.ops`: ``sparse24_compress``, ``sparse24_gemm``,
   ``sparse24_int4_gemm``;
3. :mod:`~bitpress.sparse24.hostile`: what the hostile-input suite (``tests/hostile``) feeds the
   ops.
"""

import importlib.util

from bitpress.sparse24 import (
    hostile,  # noqa: F401  (registers the ops' hostile specs)
    ops,  # noqa: F401  (registers the 2:4 ops)
)
from bitpress.sparse24.layout import READERS, READERS_INT4, Sparse24Layout

if importlib.util.find_spec("bitpress.sparse24.layout_mma") is not None:
    # The mma.sp layout ships with the CUDA kernel: the reference reads it back through it.
    from bitpress.sparse24 import layout_mma

    READERS[Sparse24Layout.MMA] = layout_mma.from_mma
if importlib.util.find_spec("bitpress.sparse24.layout_mma_int4") is not None:
    from bitpress.sparse24 import layout_mma_int4

    READERS_INT4[Sparse24Layout.MMA] = layout_mma_int4.from_mma_int4

__all__ = ["Sparse24Layout"]
