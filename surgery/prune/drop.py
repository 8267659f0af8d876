"""Dropping whole blocks as a lazy node: the remaining blocks are renumbered contiguously and
config.json's layer count (and per-layer lists such as ``layer_types``) follow."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from surgery.errors import UsageError
from surgery.expr import EvalContext, Node, Weights
from surgery.expr.node import TensorSpec
from surgery.names import BLOCK_PATTERN, count_layers

_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class DropBlocksNode(Node):
    op = "drop_blocks"

    def __init__(self, source: Node, blocks: Iterable[int]) -> None:
        super().__init__()
        self.inputs = (source,)
        self.total = count_layers(source.names(), source.config())
        self.dropped = sorted(set(blocks))
        bad = [b for b in self.dropped if not 0 <= b < self.total]
        if bad:
            raise UsageError(f"drop_blocks: block {bad[0]} is outside 0..{self.total - 1}")
        if len(self.dropped) >= self.total:
            raise UsageError(f"drop_blocks: dropping {len(self.dropped)} of {self.total} blocks "
                             "leaves none")
        kept = [b for b in range(self.total) if b not in self.dropped]
        self.new_index = {old: new for new, old in enumerate(kept)}
        self.source_of: dict[str, str] = {}
        for name in source.names():
            match = BLOCK_PATTERN.search(name)
            if match is None:
                self.source_of[name] = name
                continue
            old = int(match.group(1))
            if old in self.new_index:
                renamed = name[:match.start(1)] + str(self.new_index[old]) + name[match.end(1):]
                self.source_of[renamed] = name

    def params(self) -> dict[str, Any]:
        return {"blocks": self.dropped}

    def _list_names(self) -> list[str]:
        return list(self.source_of)

    def spec(self, name: str) -> TensorSpec:
        return self.inputs[0].spec(self.source_of[name])

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        return [(self.inputs[0], self.source_of[name])]

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        return ctx.value(self.inputs[0], self.source_of[name])

    def config(self) -> dict:
        config = self.inputs[0].config()
        remaining = self.total - len(self.dropped)
        for key in _COUNT_KEYS:
            if isinstance(config.get(key), int):
                config[key] = remaining
        for key, value in list(config.items()):
            if isinstance(value, list) and len(value) == self.total and key.startswith("layer"):
                config[key] = [v for i, v in enumerate(value) if i not in self.dropped]
        return config


def drop_blocks(model: Weights, blocks: Iterable[int]) -> Weights:
    """Remove the given blocks (0-based) and renumber the rest contiguously."""
    return Weights(DropBlocksNode(model.node, blocks))
