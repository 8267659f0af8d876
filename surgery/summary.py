"""What a checkpoint holds, summarised by block: parameter counts, dtypes, naming pattern."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from surgery.checkpoint import Checkpoint
from surgery.names import BLOCK_PATTERN, block_label, count_layers, label_order, tensor_kind


@dataclass
class GroupSummary:
    label: str
    tensors: int = 0
    params: int = 0
    bytes: int = 0
    dtypes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)


@dataclass
class CheckpointSummary:
    source: str
    architecture: str | None
    layer_prefix: str | None
    layers: int
    tied_embeddings: bool
    total_params: int
    total_bytes: int
    groups: list[GroupSummary]


def _prefix(names: list[str]) -> str | None:
    """The text before the block index, e.g. ``model.layers.`` (the detected pattern)."""
    for name in names:
        m = BLOCK_PATTERN.search(name)
        if m:
            return name[: m.start(1)]
    return None


def summarize(ck: Checkpoint) -> CheckpointSummary:
    names = ck.names
    groups: dict[str, GroupSummary] = {}
    for name in names:
        info = ck.info(name)
        label = block_label(name)
        g = groups.setdefault(label, GroupSummary(label))
        g.tensors += 1
        g.params += info.numel
        g.bytes += info.nbytes
        g.dtypes[str(info.dtype).removeprefix("torch.")] += info.numel
        g.kinds[tensor_kind(name).value] += info.numel
    order = sorted(groups.values(), key=lambda g: label_order(g.label))
    has_head = any(n.endswith("lm_head.weight") for n in names)
    tied = bool(ck.config.get("tie_word_embeddings", not has_head)) and not has_head
    archs = ck.config.get("architectures") or [None]
    return CheckpointSummary(
        source=ck.source, architecture=archs[0], layer_prefix=_prefix(names),
        layers=count_layers(names, ck.config), tied_embeddings=tied,
        total_params=sum(g.params for g in order), total_bytes=ck.total_bytes, groups=order)
