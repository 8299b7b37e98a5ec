"""``quantize_(model, config)`` / ``sparsify_(model, config)``: swap the Linear layers of an
existing model in place.

The handler is looked up by the config's type (``Int4Config`` -> :mod:`bitpress.int4.config`;
each feature registers its own with ``register_quantize_handler``), as torchao does.
"""

from __future__ import annotations

from torch import nn

from bitpress._core.registry import quantize_handler


def quantize_(model: nn.Module, config: object) -> nn.Module:
    """Replace the Linear layers of ``model`` in place, as ``config`` says; returns the model.

    ``config``: a bitpress config (``bitpress.Int4Config``, ...). Raises TypeError for any other
    object.
    """
    return quantize_handler(config)(model, config)


def sparsify_(model: nn.Module, config: object) -> nn.Module:
    """Prune the Linear layers of ``model`` in place and swap them for sparse modules, as
    ``config`` says (``bitpress.Sparse24Config``: 2:4 ``Sparse24Linear``); returns the model.

    The same dispatch by config type as :func:`quantize_`; ``quantize_(model, Int4Config(...))``
    afterwards turns the 2:4 layers into ``Sparse24Int4Linear``.
    """
    return quantize_handler(config)(model, config)
