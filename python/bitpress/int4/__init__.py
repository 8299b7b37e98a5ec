"""INT4 weight-only quantization (GPTQ / AWQ-style groups).

Layers of this package, each importing only those before it:

1. :mod:`~bitpress.int4.packing`, :mod:`~bitpress.int4.quantized` (the interchange
   ``QuantizedWeight``), :mod:`~bitpress.int4.layout` (the kernel layouts ``Int4CpuTiles`` and
   ``Int4MmaTiles``), :mod:`~bitpress.int4.reference` (plain torch): torch and core only;
2. :mod:`~bitpress.int4.ops`: ``int4_dequantize``, ``int4_gemm``, ``int4_gemm_repack``;
3. :mod:`~bitpress.int4.format_gptq`, :mod:`~bitpress.int4.format_awq` (checkpoint tensor
   formats), :mod:`~bitpress.int4.rtn`, :mod:`~bitpress.int4.gptq` (quantizers),
   :mod:`~bitpress.int4.modules` (``Int4Linear``), :mod:`~bitpress.int4.config`
   (``Int4Config`` and its ``quantize_`` handler);
4. :mod:`~bitpress.int4.checkpoint`: the GPTQ checkpoint format of ``bitpress.checkpoint``;
   :mod:`~bitpress.int4.format_pack_quantized`: compressed-tensors "pack-quantized" layers;
   :mod:`~bitpress.int4.hostile`: what the hostile-input suite (``tests/hostile``) feeds the ops
   and the format.
"""

from bitpress.int4 import (
    checkpoint,  # noqa: F401  (registers the GPTQ checkpoint format)
    format_pack_quantized,  # noqa: F401  (registers the compressed-tensors INT4 scheme)
    hostile,  # noqa: F401  (registers the ops' and format's hostile specs)
)
from bitpress.int4.config import Int4Config
from bitpress.int4.layout import Int4CpuTiles, Int4Layout, Int4MmaTiles, Int4PackedWeight
from bitpress.int4.modules import Int4Linear
from bitpress.int4.quantized import QuantizedWeight

__all__ = [
    "Int4Config",
    "Int4CpuTiles",
    "Int4Layout",
    "Int4Linear",
    "Int4MmaTiles",
    "Int4PackedWeight",
    "QuantizedWeight",
]
