"""FP8 E4M3 (``torch.float8_e4m3fn``): scaled quantization, W8A8 and weight-only GEMMs.

Layers of this package, each importing only those before it:

1. :mod:`~bitpress.fp8.reference` (plain torch): torch only;
2. :mod:`~bitpress.fp8.cases` (selftest cases), :mod:`~bitpress.fp8.ops`: ``fp8_quantize``,
   ``fp8_gemm``, ``fp8_weight_gemm``;
3. :mod:`~bitpress.fp8.hostile`: what the hostile-input suite (``tests/hostile``) feeds the ops.
"""

from bitpress.fp8 import hostile  # noqa: F401  (registers the ops and their hostile specs)
