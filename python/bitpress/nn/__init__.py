"""Drop-in modules."""

from bitpress.nn.int4 import Int4Linear

__all__ = ["Int4Linear"]
