"""``op: prune``: block pruning as a recipe step. The blocks are scored on calibration text
when the step is first needed (the model materialised once, as the fine-tune step does);
planning reads no weights, since dropping any n of L equal blocks gives the same names and
shapes (those of dropping the last n)."""

from __future__ import annotations

import threading
from typing import Any, Literal

import torch
from pydantic import Field

from surgery.data import read_records, subsample
from surgery.evaluate.layers import LayerScores, score_layers
from surgery.evaluate.metrics import load_model
from surgery.expr import EvalContext, Node, TensorSpec, Weights
from surgery.methods.layers import drop_layers
from surgery.methods.registry import Operation, Resolve
from surgery.methods.soup import Params
from surgery.names import count_layers
from surgery.prune.run import ANGULAR_REF, BI_REF, score_table
from surgery.train.model import materialise


class PruneParams(Params):
    model: str
    blocks: int = Field(ge=1, description="how many blocks to drop")
    data: str = Field(description="calibration JSONL")
    method: Literal["angular", "block_influence"] = "angular"
    max_samples: int | None = Field(None, ge=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=2)
    device: str = "auto"


class PruneNode(Node):
    """``model`` without the ``n`` blocks ``method`` finds most redundant on ``data``."""

    op = "prune"

    def __init__(self, model: Weights, p: PruneParams) -> None:
        super().__init__()
        self.model = model
        self.settings = p
        self.inputs = (model.node,)
        self.reference = ANGULAR_REF if p.method == "angular" else BI_REF
        self.records = subsample(read_records(p.data), p.max_samples, p.seed)
        count = count_layers(model.names, model.config)
        self.layout = drop_layers(model, range(count - p.blocks, count)).node
        self._chosen: tuple[LayerScores, list[int], Node] | None = None
        self._lock = threading.Lock()

    @property
    def chosen(self) -> tuple[LayerScores, list[int], Node]:
        with self._lock:
            if self._chosen is None:
                p = self.settings
                net, tokenizer = load_model(materialise(self.model), "perplexity", p.device)
                scores = score_layers(net, tokenizer, self.records, p.blocks, p.batch_size,
                                      p.max_length)
                del net
                dropped = scores.drop(p.method)
                self._chosen = (scores, dropped, drop_layers(self.model, dropped).node)
            return self._chosen

    def params(self) -> dict[str, Any]:
        """With the blocks dropped: asking for them (provenance) scores the blocks."""
        return {"blocks": self.settings.blocks, "method": self.settings.method,
                "data": self.settings.data, "dropped": self.chosen[1]}

    def card_sections(self) -> dict[str, str]:
        scores, dropped, _ = self.chosen
        return {"Block pruning": score_table(scores, self.settings.method, dropped,
                                             self.settings.data)}

    def _list_names(self) -> list[str]:
        return self.layout.names()

    def spec(self, name: str) -> TensorSpec:
        return self.layout.spec(name)

    def _current(self) -> Node:
        """The chosen graph once scored; before (planning), the same-shaped layout."""
        return self._chosen[2] if self._chosen else self.layout

    def config(self) -> dict:
        return self._current().config()

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        return self._current().input_names(name)

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        return ctx.value(self.chosen[2], name)


def _build_prune(p: PruneParams, get: Resolve) -> Weights:
    return Weights(PruneNode(get(p.model), p))


PRUNE_OPERATIONS: dict[str, Operation] = {
    "prune": Operation("prune", "Drop the n most redundant blocks, scored on calibration "
                       "text (angular distance or block influence)", ANGULAR_REF, PruneParams,
                       ("model",), _build_prune),
}
