"""Naming conventions: the block (layer) index and the kind of a tensor, read from its name.

Layer indices come from the first match of a block pattern (``layers.N.``, ``h.N.``,
``layer.N.``, ``blocks.N.``, ``block.N.``, ``resblocks.N.``). A bare ``.N.`` is never taken as a
layer, so MoE names such as ``experts.7.`` do not count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import Enum

BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block|resblocks)\.(\d+)\.")


class TensorKind(str, Enum):
    """Coarse role of a tensor, used by filters and method defaults."""

    EMBEDDING = "embedding"
    NORM = "norm"
    ATTENTION = "attention"
    MLP = "mlp"
    HEAD = "head"
    BIAS = "bias"
    OTHER = "other"


_NORM = re.compile(r"(norm|ln_\d|ln_f|layernorm|layer_norm)", re.IGNORECASE)
_EMBED = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)")
_HEAD = re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|cls|pooler)(\.|$)")
_ATTN = re.compile(r"(attn|attention|self_attn|q_proj|k_proj|v_proj|o_proj|query|key|value|c_attn)")
_MLP = re.compile(
    r"(mlp|feed_forward|ffn|intermediate|gate_proj|up_proj|down_proj|c_fc|fc\d|(^|\.)output\.dense)"
)


def layer_index(name: str, pattern: re.Pattern[str] | None = None) -> int | None:
    """Return the 0-based block index of ``name``, or None for a non-block tensor.

    ``pattern`` overrides the default conventions; its first group must capture the index.
    """
    match = (pattern or BLOCK_PATTERN).search(name)
    return int(match.group(1)) if match else None


def tensor_kind(name: str) -> TensorKind:
    """Classify a tensor by its name. Norms are checked before attention and MLP, since
    names like ``post_attention_layernorm`` hold both words; biases of norms stay norms."""
    if _NORM.search(name):
        return TensorKind.NORM
    if _EMBED.search(name):
        return TensorKind.EMBEDDING
    if _HEAD.search(name):
        return TensorKind.HEAD
    if name.endswith(".bias"):
        return TensorKind.BIAS
    if _ATTN.search(name):
        return TensorKind.ATTENTION
    if _MLP.search(name):
        return TensorKind.MLP
    return TensorKind.OTHER


def count_layers(names: Iterable[str], config: dict | None = None,
                 pattern: re.Pattern[str] | None = None) -> int:
    """Number of blocks L: from config.json when it says, else one more than the largest index."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if config and isinstance(config.get(key), int):
            return int(config[key])
    indices = [i for i in (layer_index(n, pattern) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def block_label(name: str) -> str:
    """``block N`` for a tensor of block N, else ``non-block`` (the grouping of summaries)."""
    idx = layer_index(name)
    return f"block {idx}" if idx is not None else "non-block"


def label_order(label: str) -> tuple[bool, int]:
    """Sort key for :func:`block_label` labels: blocks by index, then the non-block group."""
    return (label == "non-block", int(label.split()[-1]) if label != "non-block" else 0)
