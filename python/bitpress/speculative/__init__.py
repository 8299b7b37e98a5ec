"""Speculative decoding: the fused verification op ``spec_verify``, the drafters, the batched
generator and draft distillation.

Layers: :mod:`~bitpress.speculative.reference` (plain torch) -> :mod:`~bitpress.speculative.ops`
-> :mod:`~bitpress.speculative.drafters` (uses :mod:`bitpress.int4` for the INT4 self-draft) ->
:mod:`~bitpress.speculative.generator` -> :mod:`~bitpress.speculative.distill`.
"""

from bitpress.speculative import hostile  # noqa: F401  (registers spec_verify's hostile spec)
from bitpress.speculative.distill import distill_draft
from bitpress.speculative.drafters import (
    Drafter,
    Int4SelfDrafter,
    LayerSkipDrafter,
    ModelDrafter,
    PromptLookupDrafter,
)
from bitpress.speculative.generator import (
    GenerationOutput,
    GenerationStats,
    SpeculativeGenerator,
    generate,
    make_drafter,
)
from bitpress.speculative.ops import spec_verify

__all__ = [
    "Drafter",
    "GenerationOutput",
    "GenerationStats",
    "Int4SelfDrafter",
    "LayerSkipDrafter",
    "ModelDrafter",
    "PromptLookupDrafter",
    "SpeculativeGenerator",
    "distill_draft",
    "generate",
    "make_drafter",
    "spec_verify",
]
