"""The public namespace of every op: ``bitpress.ops.<name>``.

Each op is defined in its feature's ``ops`` module (``bitpress.int4.ops``,
``bitpress.speculative.ops``) with its contract, argument check, fake and backends, and registers
itself there (:func:`bitpress._core.registry.register_op`). This namespace is filled from the
registry: adding an op to a feature edits nothing here (only a new feature adds its ``ops``
module to the import below).
"""

from bitpress._core import registry
from bitpress.fp8 import ops as _fp8_ops  # noqa: F401  (registers the fp8 ops)
from bitpress.int4 import ops as _int4_ops  # noqa: F401  (registers the int4 ops)
from bitpress.sparse24 import ops as _sparse24_ops  # noqa: F401  (registers the 2:4 ops)
from bitpress.speculative import ops as _speculative_ops  # noqa: F401  (registers spec_verify)

globals().update({name: spec.fn for name, spec in registry.ops().items()})
__all__ = sorted(registry.ops())


def __dir__() -> list[str]:
    return __all__
