"""Grid search of one scaling coefficient on held-out data, e.g. LiNeS's c (single task,
α = c, β = 1 − c) or β (multi-task), arXiv 2410.17146.

The method enters as ``build: coefficient -> Weights``, so any scaling (LiNeS, task-arithmetic
λ) plugs in; ``score`` evaluates a model on validation data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from surgery.errors import UsageError
from surgery.expr import Weights

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
