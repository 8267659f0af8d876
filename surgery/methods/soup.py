"""Linear / uniform soups and task arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Weights

SOUP_REF = "Model soups, arXiv 2203.05482"
TASK_ARITHMETIC_REF = "Editing models with task arithmetic, arXiv 2212.04089"


def _weights(op: str, weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UsageError(f"{op}: weights has {len(weights)} values for {count} models")
    return [float(w) for w in weights]


def linear(models: Sequence[Weights], weights: Sequence[float] | None = None,
           normalize: bool = True) -> Weights:
    """Weighted average of models (model soups, arXiv 2203.05482).

    θ = Σ wᵢ θᵢ / Σ wᵢ, or the raw weighted sum Σ wᵢ θᵢ with ``normalize=False``.
    Equal weights (the default) give the uniform soup.
    """
    ws = _weights("linear", weights, len(models))
    total = sum(ws)
    if normalize and abs(total) < 1e-12:
        raise UsageError("linear: weights sum to 0, so they cannot be normalised; "
                         "set normalize: false or change the weights")

    def fn(_: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        acc = ctx.empty_like(ts[0]).zero_()
        for t, w in zip(ts, ws, strict=True):
            acc.addcmul_(t, torch.tensor(w, dtype=acc.dtype, device=acc.device))
        if normalize:
            acc.div_(torch.tensor(total, dtype=acc.dtype, device=acc.device))
        return acc

    return Weights(ElementwiseNode([m.node for m in models], fn, "linear",
                                   {"weights": ws, "normalize": normalize}, SOUP_REF,
                                   rowwise=True))


def task_arithmetic(base: Weights, models: Sequence[Weights],
                    weights: Sequence[float] | None = None, lambda_: float = 1.0,
                    normalize: bool = False) -> Weights:
    """Task arithmetic (arXiv 2212.04089): θ = θ₀ + λ Σ wᵢ τᵢ with τᵢ = θᵢ − θ₀.

    Defaults λ = 1 and no normalisation; ``normalize=True`` divides Σ wᵢ τᵢ by Σ wᵢ.
    """
    if not models:
        raise UsageError("task_arithmetic: needs at least one fine-tuned model")
    ws = _weights("task_arithmetic", weights, len(models))
    # Σ wᵢ in float32, as the weighted deltas are summed (mergekit's divisor agrees bit for bit).
    total = float(torch.tensor(ws, dtype=torch.float32).sum())
    divisor = total if abs(total) >= 1e-8 else 1.0

    def fn(_: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        theta0 = ts[0]
        acc = torch.sub(ts[1], theta0, out=ctx.empty_like(theta0)).mul_(ws[0])
        delta = ctx.empty_like(theta0) if len(ts) > 2 else None
        for t, w in zip(ts[2:], ws[1:], strict=True):
            acc.add_(torch.sub(t, theta0, out=delta).mul_(w))
        if normalize:
            acc.div_(divisor)
        if lambda_ != 1.0:
            acc.mul_(lambda_)
        return torch.add(theta0, acc, out=delta if delta is not None else acc)

    return Weights(ElementwiseNode([base.node, *(m.node for m in models)], fn, "task_arithmetic",
                                   {"weights": ws, "lambda": lambda_, "normalize": normalize},
                                   TASK_ARITHMETIC_REF, rowwise=True))


class Params(BaseModel):
    """Base of recipe parameter models: unknown keys are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LinearParams(Params):
    models: list[str] = Field(min_length=1)
    weights: list[float] | None = None
    normalize: bool = True


class TaskArithmeticParams(Params):
    base: str
    models: list[str] = Field(min_length=1)
    weights: list[float] | None = None
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False
