"""Floor 1: writing output directories (shards, index, side files, model card)."""

from surgery.writer.card import render_card
from surgery.writer.output import OutputDir
from surgery.writer.shards import (
    PlannedTensor,
    ShardWriter,
    parse_size,
    plan_shards,
    shard_names,
    write_index,
)

__all__ = [
    "OutputDir",
    "PlannedTensor",
    "ShardWriter",
    "parse_size",
    "plan_shards",
    "render_card",
    "shard_names",
    "write_index",
]
