"""Greedy soup (model soups, arXiv 2203.05482), with the held-out score passed in as a function.

Ingredients are ranked by their own held-out score, best first. The soup starts as the best
ingredient; each next ingredient is tried as the running mean soup·n/(n+1) + θ/(n+1), which is
the uniform mean of the kept ingredients plus the candidate, and kept only if the held-out score
improves strictly (``accept=">"``, default) or does not get worse (``accept=">="``). Every
decision is recorded. The search runs once, when the result is first needed (saving it, or
reading ``node.result``), so building and planning a recipe evaluate nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from surgery.errors import UsageError
from surgery.expr import EvalContext, Node, Weights
from surgery.expr.node import TensorSpec, check_compatible, is_mergeable
from surgery.methods.soup import SOUP_REF, linear

Score = Callable[[Weights], float]


@dataclass
class SoupDecision:
    step: int
    candidate: str
    ingredient_score: float
    soup_score: float
    kept: bool


@dataclass
class GreedySoupResult:
    decisions: list[SoupDecision]
    kept: list[str]
    score: float
    higher_is_better: bool
    accept: str

    def to_json(self) -> dict[str, Any]:
        return {"accept": self.accept, "higher_is_better": self.higher_is_better,
                "kept": self.kept, "score": self.score,
                "decisions": [asdict(d) for d in self.decisions]}

    def card_section(self) -> str:
        rows = ["| step | candidate | its own score | soup score | kept |",
                "|---:|---|---:|---:|---|"]
        rows += [f"| {d.step} | `{d.candidate}` | {d.ingredient_score:.6g} | "
                 f"{d.soup_score:.6g} | {'yes' if d.kept else 'no'} |" for d in self.decisions]
        direction = "higher" if self.higher_is_better else "lower"
        return (f"Greedy soup ({SOUP_REF}); accept rule `{self.accept}` ({direction} is "
                f"better). Kept {', '.join(f'`{k}`' for k in self.kept)}; final score "
                f"{self.score:.6g}.\n\n" + "\n".join(rows))


def _better(new: float, old: float, accept: str, higher_is_better: bool) -> bool:
    if not higher_is_better:
        new, old = -new, -old
    return new > old if accept == ">" else new >= old


def run_greedy_soup(models: Mapping[str, Weights], score: Score, accept: str = ">",
                    higher_is_better: bool = True) -> GreedySoupResult:
    """Run the greedy selection now; ``score`` evaluates a model on held-out data."""
    if accept not in (">", ">="):
        raise UsageError(f"greedy_soup: accept must be '>' or '>=', got {accept!r}")
    if not models:
        raise UsageError("greedy_soup: needs at least one model")
    own = {name: score(w) for name, w in models.items()}
    order = sorted(own, key=lambda n: -own[n] if higher_is_better else own[n])
    kept = [order[0]]
    best = own[order[0]]
    decisions = [SoupDecision(0, order[0], best, best, True)]
    for step, name in enumerate(order[1:], start=1):
        candidate = score(linear([models[k] for k in [*kept, name]]))
        keep = _better(candidate, best, accept, higher_is_better)
        decisions.append(SoupDecision(step, name, own[name], candidate, keep))
        if keep:
            kept.append(name)
            best = candidate
    return GreedySoupResult(decisions, kept, best, higher_is_better, accept)


class GreedySoupNode(Node):
    """The uniform mean of the ingredients the greedy search keeps (searched on first use)."""

    op = "greedy_soup"
    reference = SOUP_REF

    def __init__(self, models: Mapping[str, Weights], score: Score, accept: str = ">",
                 higher_is_better: bool = True) -> None:
        super().__init__()
        if accept not in (">", ">="):
            raise UsageError(f"greedy_soup: accept must be '>' or '>=', got {accept!r}")
        self.models = dict(models)
        self.inputs = tuple(w.node for w in self.models.values())
        check_compatible(self.inputs, "greedy_soup")
        self.score = score
        self.accept = accept
        self.higher_is_better = higher_is_better
        self._result: GreedySoupResult | None = None

    @property
    def result(self) -> GreedySoupResult:
        if self._result is None:
            self._result = run_greedy_soup(self.models, self.score, self.accept,
                                           self.higher_is_better)
        return self._result

    def _kept_nodes(self) -> list[Node]:
        names = self.result.kept if self._result is not None else list(self.models)
        return [self.models[n].node for n in names]

    def params(self) -> dict[str, Any]:
        return {"ingredients": list(self.models), **self.result.to_json()}

    def card_sections(self) -> dict[str, str]:
        return {"Greedy soup": self.result.card_section()}

    def _list_names(self) -> list[str]:
        return self.inputs[0].names()

    def spec(self, name: str) -> TensorSpec:
        return self.inputs[0].spec(name)

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        nodes = self._kept_nodes()
        if not is_mergeable(self.inputs[0].spec(name).dtype):
            return [(nodes[0], name)]
        return [(n, name) for n in nodes]

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        nodes = [self.models[n].node for n in self.result.kept]
        first = ctx.value(nodes[0], name)
        if not is_mergeable(first.dtype):
            return first
        acc = ctx.to_compute(first).clone()
        for n in nodes[1:]:
            acc.add_(ctx.to_compute(ctx.value(n, name)))
        return acc.div_(len(nodes))


def greedy_soup(models: Mapping[str, Weights], score: Score, accept: str = ">",
                higher_is_better: bool = True) -> Weights:
    """Greedy soup of named ``models`` under the held-out ``score`` (arXiv 2203.05482).

    Lazy: the search runs when the result is saved or ``.node.result`` is read; the decision log
    (candidate, its score, the soup's score, kept) goes into provenance and the model card.
    """
    return Weights(GreedySoupNode(models, score, accept, higher_is_better))
