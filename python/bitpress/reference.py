"""The plain-PyTorch reference of every op (``bitpress.reference.<op>``), filled from the op
registry: each feature's ``reference`` module defines them (``bitpress.int4.reference``,
``bitpress.speculative.reference``), and adding an op edits nothing here."""

from bitpress import ops as _ops  # noqa: F401  (every op registers itself)
from bitpress._core import registry

globals().update({name: spec.reference for name, spec in registry.ops().items()})
__all__ = sorted(registry.ops())


def __dir__() -> list[str]:
    return __all__
