"""Grid search of one scaling coefficient on held-out data, e.g. LiNeS's c (single task,
α = c, β = 1 − c) or β (multi-task), arXiv 2410.17146.

The method enters as ``build: coefficient -> Weights``, so any scaling (LiNeS, task-arithmetic
λ) plugs in; ``score`` evaluates a model on validation data.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from surgery.engine.stream import StreamOptions, pending_reductions, resolve_reductions
from surgery.errors import UsageError
from surgery.expr import EvalContext, Node, TensorSpec, Weights

LINES_REF = "LiNeS: layer-increasing network scaling, arXiv 2410.17146"


@dataclass
class CoefficientSearch:
    parameter: str
    grid: list[float]
    scores: list[float]
    best: float
    best_score: float
    higher_is_better: bool
    weights: Weights

    def to_json(self) -> dict[str, Any]:
        return {"parameter": self.parameter, "grid": self.grid, "scores": self.scores,
                "chosen": self.best, "chosen_score": self.best_score,
                "higher_is_better": self.higher_is_better}

    def card_section(self) -> str:
        rows = [f"| {self.parameter} | score |", "|---:|---:|"]
        rows += [f"| {c:g} | {s:.6g}{' (chosen)' if c == self.best else ''} |"
                 for c, s in zip(self.grid, self.scores, strict=True)]
        return (f"`{self.parameter}` = {self.best:g} chosen from a grid of {len(self.grid)} "
                "values on validation data.\n\n" + "\n".join(rows))

    def save(self, path: str, **options: Any) -> Any:
        """Write the chosen model with the search recorded in its provenance and model card."""
        return self.weights.save(
            path, extra_provenance={"coefficient_search": self.to_json()},
            extra_sections={f"Search over {self.parameter}": self.card_section()}, **options)


def search_coefficient(build: Callable[[float], Weights], grid: Sequence[float],
                       score: Callable[[Weights], float], *, parameter: str = "c",
                       higher_is_better: bool = True) -> CoefficientSearch:
    """Score ``build(v)`` for each v of ``grid``; the best wins, the first on ties."""
    values = [float(v) for v in grid]
    if not values:
        raise UsageError(f"{parameter}: the search grid is empty")
    scores = [score(build(v)) for v in values]
    sign = 1.0 if higher_is_better else -1.0
    best_i = max(range(len(values)), key=lambda i: (sign * scores[i], -i))
    return CoefficientSearch(parameter, values, scores, values[best_i], scores[best_i],
                             higher_is_better, build(values[best_i]))


class CoefficientSearchNode(Node):
    """The model ``build(v)`` for the grid value v that scores best, searched on first use.

    Names, shapes and reads come from ``build(grid[0])`` (every grid value builds the same
    tensors from the same inputs), so planning never runs the search; the first tensor
    computed does, then the chosen graph's own statistics are resolved once.
    """

    op = "coefficient_search"
    reference = LINES_REF

    def __init__(self, build: Callable[[float], Weights], grid: Sequence[float],
                 score: Callable[[Weights], float], parameter: str,
                 higher_is_better: bool) -> None:
        super().__init__()
        if not grid:
            raise UsageError(f"{parameter}: the search grid is empty")
        self.build = build
        self.grid = [float(v) for v in grid]
        self.score = score
        self.parameter = parameter
        self.higher_is_better = higher_is_better
        self.inputs = (build(self.grid[0]).node,)
        self._result: CoefficientSearch | None = None
        self._lock = threading.Lock()

    @property
    def result(self) -> CoefficientSearch:
        with self._lock:
            if self._result is None:
                found = search_coefficient(self.build, self.grid, self.score,
                                           parameter=self.parameter,
                                           higher_is_better=self.higher_is_better)
                chosen = found.weights.node
                if pending_reductions(chosen):
                    resolve_reductions(chosen, StreamOptions(device=torch.device("cpu")))
                self._result = found
            return self._result

    def params(self) -> dict[str, Any]:
        return self.result.to_json() if self._result else {"grid": self.grid}

    def card_sections(self) -> dict[str, str]:
        return {f"Search over {self.parameter}": self.result.card_section()}

    def _list_names(self) -> list[str]:
        return self.inputs[0].names()

    def spec(self, name: str) -> TensorSpec:
        return self.inputs[0].spec(name)

    def config(self) -> dict:
        return self.inputs[0].config()

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        return ctx.value(self.result.weights.node, name)
