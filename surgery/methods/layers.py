"""Layer surgery: drop blocks, keep the first n, stack or interleave block ranges of models.

The output's blocks are renumbered 0..L'-1; the non-block tensors (embeddings, final norm, head)
come from the first model; config.json's layer count and per-layer lists are rewritten.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from pydantic import Field

from surgery.errors import ShapeMismatchError, UsageError
from surgery.expr import EvalContext, Node, TensorSpec, Weights
from surgery.methods.soup import Params
from surgery.names import BLOCK_PATTERN, TensorKind, count_layers, layer_index, tensor_kind

LAYER_SURGERY_REF = "Sorted Fine-Tuning (sub-model extraction), arXiv 2309.08968"
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Config lists with one entry per block, reordered with the blocks (other list-valued keys, such
# as MoE index lists, are left alone).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "block_types")


def rename_block(name: str, index: int) -> str:
    """``name`` with its block index replaced by ``index``."""
    match = BLOCK_PATTERN.search(name)
    if match is None:
        raise ValueError(f"{name!r} is not a block tensor")
    return f"{name[:match.start(1)]}{index}{name[match.end(1):]}"


def _blocks(node: Node) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in node.names():
        idx = layer_index(name)
        if idx is not None:
            out.setdefault(idx, []).append(name)
    return out


def _layer_count(node: Node) -> int:
    return count_layers(node.names(), node.config())


class LayerMapNode(Node):
    """Output block j is block ``sources[j][1]`` of model ``sources[j][0]``, renamed to j."""

    op = "layer_map"
    reference = LAYER_SURGERY_REF

    def __init__(self, sources: Sequence[tuple[Node, int]], op: str,
                 params: dict | None = None, head: Node | None = None) -> None:
        super().__init__()
        self.op = op
        self._params = params or {}
        if not sources:
            raise UsageError(f"{op}: the result would have no blocks")
        self.inputs = tuple(dict.fromkeys([*(node for node, _ in sources),
                                           *([head] if head is not None else [])]))
        # ``head``: the model whose non-block tensors other than embeddings (final norm, head)
        # the result takes, as mergekit's frankenmerges take them from the last slice.
        self.head = head if head is not self.inputs[0] else None
        self.sources = list(sources)
        first = self.inputs[0]
        ref_names = {rename_block(n, 0): first.spec(n).shape
                     for n in _blocks(first).get(sources[0][1], [])}
        self._origin: dict[str, tuple[Node, str]] = {}
        for j, (node, layer) in enumerate(self.sources):
            block = _blocks(node).get(layer, [])
            got = {rename_block(n, 0): node.spec(n).shape for n in block}
            if got != ref_names:
                raise ShapeMismatchError(
                    f"{op}: block {layer} of {_label(node)} differs in tensors or shapes from "
                    f"block {sources[0][1]} of {_label(first)}")
            for n in block:
                self._origin[rename_block(n, j)] = (node, n)
        if self.head is not None:
            for n in first.names():
                if layer_index(n) is None and tensor_kind(n) != TensorKind.EMBEDDING:
                    if n not in self.head.names() or \
                            self.head.spec(n).shape != first.spec(n).shape:
                        raise ShapeMismatchError(
                            f"{op}: head_from: {_label(self.head)} has no tensor {n!r} of "
                            f"the shape {_label(first)} has")
                    self._origin[n] = (self.head, n)

    def params(self) -> dict:
        return dict(self._params)

    def _list_names(self) -> list[str]:
        out: list[str] = []
        blocks_done = False
        for name in self.inputs[0].names():
            if layer_index(name) is None:
                out.append(name)
            elif not blocks_done:
                out.extend(n for n in self._origin if layer_index(n) is not None)
                blocks_done = True
        return out

    def _source(self, name: str) -> tuple[Node, str]:
        return self._origin.get(name) or (self.inputs[0], name)

    def spec(self, name: str) -> TensorSpec:
        node, src = self._source(name)
        return node.spec(src)

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        return [self._source(name)]

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        node, src = self._source(name)
        return ctx.value(node, src)

    def config(self) -> dict:
        config = self.inputs[0].config()
        if not config:
            return config
        for key in LAYER_COUNT_KEYS:
            if isinstance(config.get(key), int):
                config[key] = len(self.sources)
        for key in PER_LAYER_KEYS:
            if isinstance(config.get(key), list):
                config[key] = [copy.deepcopy(_per_layer(node, key, layer))
                               for node, layer in self.sources]
        return config


def _per_layer(node: Node, key: str, layer: int) -> object:
    values = node.config().get(key)
    if not isinstance(values, list) or layer >= len(values):
        raise UsageError(f"config.json of {_label(node)}: {key} has no entry for block {layer}")
    return values[layer]


def _label(node: Node) -> str:
    ckpts = node.checkpoints()
    return ckpts[0].source if ckpts else f"result of {node.op}"


def _check_layers(op: str, param: str, layers: Iterable[int], count: int) -> list[int]:
    out = list(layers)
    for i in out:
        if i < 0 or i >= count:
            raise UsageError(f"{op}: {param}: block {i} is past the end (the model has "
                             f"{count} blocks, 0-{count - 1})")
    return out


def drop_layers(model: Weights, layers: Iterable[int]) -> Weights:
    """Remove the given blocks (a list or a ``range``) and renumber the rest contiguously.

    θ' = blocks [b for b in 0..L−1 if b ∉ layers] of θ, non-block tensors unchanged
    (layer surgery; sub-model extraction as in arXiv 2309.08968).
    """
    count = _layer_count(model.node)
    param = "range" if isinstance(layers, range) else "layers"
    drop = set(_check_layers("drop_layers", param, layers, count))
    keep = [i for i in range(count) if i not in drop]
    return Weights(LayerMapNode([(model.node, i) for i in keep], "drop_layers",
                                {"layers": sorted(drop)}))


def keep_first_layers(model: Weights, n: int) -> Weights:
    """Sub-model extraction (Sorted Fine-Tuning, arXiv 2309.08968): keep blocks 0..n−1 with
    the embeddings, final norm and head."""
    count = _layer_count(model.node)
    if n < 1 or n > count:
        raise UsageError(f"keep_first_layers: n: {n} is outside 1..{count} (the model has "
                         f"{count} blocks)")
    return Weights(LayerMapNode([(model.node, i) for i in range(n)], "keep_first_layers",
                                {"n": n}))


def stack_layers(slices: Sequence[tuple[Weights, int, int]],
                 head_from: int | None = None) -> Weights:
    """Concatenate block ranges ``[start, end)`` of models, in order (interleave by listing
    alternating ranges). Non-block tensors and config come from the first slice's model, except
    that ``head_from`` (an index into ``slices``) picks the model whose final norm and head
    (the non-block tensors other than embeddings) are taken, as mergekit takes them from the
    last slice."""
    if head_from is not None and not 0 <= head_from < len(slices):
        raise UsageError(f"stack_layers: head_from: {head_from} is not an index of ranges "
                         f"(0-{len(slices) - 1})")
    sources: list[tuple[Node, int]] = []
    for i, (model, start, end) in enumerate(slices):
        count = _layer_count(model.node)
        if not 0 <= start < end <= count:
            raise UsageError(f"stack_layers: ranges[{i}]: [{start}, {end}) is not a block range "
                             f"of a model with {count} blocks (0 <= start < end <= {count})")
        sources += [(model.node, b) for b in range(start, end)]
    params: dict = {"ranges": [[s, e] for _, s, e in slices]}
    if head_from is not None:
        params["head_from"] = head_from
    head = slices[head_from][0].node if head_from is not None else None
    return Weights(LayerMapNode(sources, "stack_layers", params, head))


class DropLayersParams(Params):
    model: str
    layers: list[int] | None = Field(None, description="blocks to drop")
    range: tuple[int, int] | None = Field(None, description="[start, end) of blocks to drop")

    def blocks(self) -> list[int] | range:
        if (self.layers is None) == (self.range is None):
            raise UsageError("drop_layers: give exactly one of layers or range")
        if self.layers is not None:
            return self.layers
        start, end = self.range  # type: ignore[misc]
        return range(start, end)


class KeepFirstLayersParams(Params):
    model: str
    n: int


class StackLayersParams(Params):
    models: list[str] = Field(min_length=1)
    ranges: list[tuple[int, int]] = Field(min_length=1, description="[start, end) per model")
    head_from: int | None = Field(None, description="index of the range whose model gives "
                                  "the final norm and head (default: the first)")
