"""2:4 semi-structured sparsity: pruning (:mod:`.prune`)."""

from bitpress.sparse24.prune import check_24, magnitude_prune, sparsegpt_prune, wanda_prune

__all__ = ["check_24", "magnitude_prune", "sparsegpt_prune", "wanda_prune"]
