"""LiNeS: layer-increasing network scaling of a task vector."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Node, Reduction, Weights
from surgery.expr.node import check_compatible, is_mergeable
from surgery.methods.schedule import Depth
from surgery.methods.soup import Params

LINES_REF = "LiNeS: post-training layer scaling, arXiv 2410.17146"


class L1Ratio(Reduction):
    """Multi-task LiNeS α = (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁) / T over the whole model, streamed.

    Inputs: base, merged, then the T fine-tuned models. Sums are kept in float64.
    """

    def __init__(self, base: Node, merged: Node, tasks: Sequence[Node]) -> None:
        self.inputs = (base, merged, *tasks)
        self.tasks = len(tasks)
        self.sum_norm = 0.0
        self.merged_norm = 0.0

    def names(self) -> list[str]:
        first = self.inputs[0]
        return [n for n in first.names() if is_mergeable(first.spec(n).dtype)]

    def update(self, name: str, tensors: list[torch.Tensor]) -> None:
        theta0, merged, *thetas = (t.double() for t in tensors)
        total = torch.zeros_like(theta0)
        for theta in thetas:
            total += theta - theta0
        self.sum_norm += float(total.abs().sum())
        self.merged_norm += float((merged - theta0).abs().sum())

    def finalize(self) -> float:
        if self.merged_norm == 0.0:
            raise UsageError("lines: the merged task vector is zero, so the multi-task alpha "
                             "(an L1-norm ratio) is undefined")
        return self.sum_norm / self.merged_norm / self.tasks


class LinesNode(ElementwiseNode):
    """θ₀ + λ(l)·τ with α either fixed or read from an :class:`L1Ratio` reduction."""

    def __init__(self, base: Node, model: Node, alpha: float | L1Ratio, beta: float,
                 depth: Depth, params: dict) -> None:
        self.alpha = alpha
        self.beta = beta
        self.depth = depth
        super().__init__([base, model], self._scale, "lines", params, LINES_REF,
                         rowwise=True)

    def reductions(self) -> list[Reduction]:
        return [self.alpha] if isinstance(self.alpha, L1Ratio) else []

    def factor(self, name: str) -> float:
        """λ(l) = α + β·l/(L−1) for block l; α for non-block tensors."""
        alpha = self.alpha.value if isinstance(self.alpha, L1Ratio) else self.alpha
        if self.depth.layer(name) is None:
            return alpha
        return alpha + self.beta * self.depth.fraction(name)

    def _scale(self, name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        theta0 = ts[0]
        return theta0 + (ts[1] - theta0) * self.factor(name)


def lines(base: Weights, model: Weights, alpha: float | None = None, beta: float | None = None,
          *, c: float | None = None, tasks: Sequence[Weights] | None = None,
          layer_pattern: str | None = None) -> Weights:
    """LiNeS (arXiv 2410.17146): θ = θ₀ + λ(l)·τ with τ = model − base and
    λ(l) = α + β·l/(L−1) for block l of L; non-block tensors get α.

    Forms: ``alpha`` and ``beta`` given; single task ``c`` (α = c, β = 1 − c: the last block
    keeps its full update, the first is scaled by c); multi-task with ``tasks`` (the T
    fine-tuned models whose merge ``model`` is) and ``beta``: α = (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁)/T,
    computed by a streaming reduction pass before the write pass. Block indices follow the
    naming conventions of :mod:`surgery.names`, or ``layer_pattern`` (a regex whose first
    group is the index); L comes from config.json, else from the names.
    """
    depth = Depth.of(base.node, layer_pattern)
    a: float | L1Ratio
    if c is not None:
        if alpha is not None or beta is not None or tasks is not None:
            raise UsageError("lines: c sets alpha = c and beta = 1 - c; give c alone")
        a, b = float(c), 1.0 - float(c)
        params: dict = {"c": float(c)}
    elif tasks is not None:
        if alpha is not None:
            raise UsageError("lines: alpha is computed from tasks (the L1-norm ratio); "
                             "give beta only")
        if beta is None:
            raise UsageError("lines: beta is required with tasks")
        if not tasks:
            raise UsageError("lines: tasks is empty; list the fine-tuned models merged")
        a, b = L1Ratio(base.node, model.node, [t.node for t in tasks]), float(beta)
        params = {"alpha": "L1 ratio / T", "beta": b, "tasks": len(tasks)}
    else:
        if alpha is None or beta is None:
            raise UsageError("lines: give alpha and beta, or c, or tasks with beta")
        a, b = float(alpha), float(beta)
        params = {"alpha": a, "beta": b}
    params["layers"] = depth.num_layers
    node = LinesNode(base.node, model.node, a, b, depth, params)
    if tasks:
        check_compatible((base.node, *(t.node for t in tasks)), "lines")
    return Weights(node)


class LinesParams(Params):
    base: str
    model: str = Field(description="the fine-tuned or merged model whose task vector is scaled")
    alpha: float | None = Field(None, description="factor of the first block and non-block")
    beta: float | None = Field(None, description="added factor at the last block")
    c: float | None = Field(None, description="single task: alpha = c, beta = 1 - c")
    tasks: list[str] | None = Field(None, description="multi-task: the merged fine-tunes")
    layer_pattern: str | None = Field(None, description="regex capturing the block index")

