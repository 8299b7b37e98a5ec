"""The public namespace of every op: ``bitpress.ops.<name>``.

Each op is defined in its feature package (``bitpress.int4.ops``, ``bitpress.speculative.ops``)
with its contract, argument check, fake and backends; here it is only re-exported. The registry
(:func:`bitpress._core.registry.ops`) lists them all.
"""

from bitpress.int4.ops import int4_dequantize, int4_gemm, int4_gemm_repack
from bitpress.speculative.ops import spec_verify

__all__ = ["int4_dequantize", "int4_gemm", "int4_gemm_repack", "spec_verify"]
