"""Speculative decoding: the fused verification op ``spec_verify`` (and, later, the generator).

Layers: :mod:`~bitpress.speculative.reference` (plain torch) -> :mod:`~bitpress.speculative.ops`.
"""

from bitpress.speculative.ops import spec_verify

__all__ = ["spec_verify"]
