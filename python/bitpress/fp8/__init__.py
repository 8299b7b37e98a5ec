"""FP8 E4M3 (``torch.float8_e4m3fn``): scaled quantization, W8A8 and weight-only GEMMs.

Layers of this package, each importing only those before it:

1. :mod:`~bitpress.fp8.reference` (plain torch): torch only;
2. :mod:`~bitpress.fp8.cases` (selftest cases), :mod:`~bitpress.fp8.ops`: ``fp8_quantize``,
   ``fp8_gemm``, ``fp8_weight_gemm``;
3. :mod:`~bitpress.fp8.hostile`: what the hostile-input suite (``tests/hostile``) feeds the ops;
   :mod:`~bitpress.fp8.modules` (``Fp8Linear``), :mod:`~bitpress.fp8.config` (``Fp8Config`` and
   its ``quantize_`` handler);
4. :mod:`~bitpress.fp8.format_compressed_tensors` (the compressed-tensors "float-quantized"
   scheme), :mod:`~bitpress.fp8.format_fp8_block` (``quant_method: "fp8"`` checkpoints).
"""

from bitpress.fp8 import (  # noqa: F401  (register the checkpoint formats)
    format_compressed_tensors,
    format_fp8_block,
    hostile,  # noqa: F401  (registers the ops and their hostile specs)
)
from bitpress.fp8.config import Fp8Config
from bitpress.fp8.modules import Fp8Linear

__all__ = ["Fp8Config", "Fp8Linear"]
