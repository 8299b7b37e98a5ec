"""The plain-PyTorch reference of every op (``bitpress.reference.<op>``), re-exported from the
feature packages (``bitpress.int4.reference``, ``bitpress.speculative.reference``)."""

from bitpress.int4.reference import int4_dequantize, int4_gemm, int4_gemm_repack
from bitpress.speculative.reference import spec_verify

__all__ = ["int4_dequantize", "int4_gemm", "int4_gemm_repack", "spec_verify"]
