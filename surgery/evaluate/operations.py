"""Recipe operations that need held-out data. They live on this floor, not in
``surgery.methods.registry``, because building their scorer needs the evaluator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from surgery.evaluate.metrics import check_architecture
from surgery.evaluate.scoring import CheckpointScorer
from surgery.expr import Weights
from surgery.methods.coefficient_search import LINES_REF, CoefficientSearchNode
from surgery.methods.greedy_soup import GreedySoupNode
from surgery.methods.layer_scaling import lines
from surgery.methods.registry import Operation, Resolve
from surgery.methods.soup import SOUP_REF, Params


class GreedySoupParams(Params):
    models: list[str] = Field(min_length=1)
    data: str = Field(description="held-out JSONL file")
    metric: Literal["perplexity", "exact_match", "accuracy"] = "perplexity"
    accept: Literal[">", ">="] = ">"
    max_samples: int | None = Field(None, ge=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    device: str = "auto"


class LinesSearchParams(Params):
    base: str
    model: str
    tasks: list[str] | None = Field(None, description="fine-tunes merged into model: search beta")
    grid: list[float] = Field(min_length=1, description="values of c (or beta with tasks)")
    data: str = Field(description="validation JSONL file")
    metric: Literal["perplexity", "exact_match", "accuracy"] = "perplexity"
    max_samples: int | None = Field(None, ge=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    layer_pattern: str | None = None


def _build_lines_search(p: LinesSearchParams, get: Resolve) -> Weights:
    scorer = CheckpointScorer(p.data, p.metric, max_samples=p.max_samples, seed=p.seed,
                              batch_size=p.batch_size, device=p.device)
    base, model = get(p.base), get(p.model)
    check_architecture(model.config, p.metric, f"model {p.model!r}")
    if p.tasks is None:
        def build(v: float) -> Weights:
            return lines(base, model, c=v, layer_pattern=p.layer_pattern)
        parameter = "c"
    else:
        tasks = [get(t) for t in p.tasks]

        def build(v: float) -> Weights:
            return lines(base, model, beta=v, tasks=tasks, layer_pattern=p.layer_pattern)
        parameter = "beta"
    return Weights(CoefficientSearchNode(build, p.grid, scorer, parameter,
                                         scorer.higher_is_better))


def _build_greedy_soup(p: GreedySoupParams, get: Resolve) -> Weights:
    scorer = CheckpointScorer(p.data, p.metric, max_samples=p.max_samples, seed=p.seed,
                              batch_size=p.batch_size, device=p.device)
    for m in p.models:
        check_architecture(get(m).config, p.metric, f"model {m!r}")
    return Weights(GreedySoupNode({m: get(m) for m in p.models}, scorer, p.accept,
                                  scorer.higher_is_better))


DATA_OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("greedy_soup", "Greedy soup: add ingredients while the held-out score improves",
                  SOUP_REF, GreedySoupParams, ("models",), _build_greedy_soup),
        Operation("lines_search", "LiNeS with c (or beta) chosen on validation data",
                  LINES_REF, LinesSearchParams, ("base", "model", "tasks"),
                  _build_lines_search),
    )
}
