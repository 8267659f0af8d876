"""Block pruning: choose blocks by hidden-state scores and write the model without them
(through the layer-surgery node, surgery.methods.layers.drop_layers)."""

from surgery.prune.run import PruneResult, prune

__all__ = ["PruneResult", "prune"]
