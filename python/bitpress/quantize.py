"""``quantize_(model, config)``: swap the Linear layers of an existing model in place.

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
