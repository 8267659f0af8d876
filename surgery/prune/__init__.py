"""Block pruning: choose blocks by hidden-state scores and write the model without them."""

from surgery.prune.drop import DropBlocksNode, drop_blocks
from surgery.prune.run import PruneResult, prune

__all__ = ["DropBlocksNode", "PruneResult", "drop_blocks", "prune"]
