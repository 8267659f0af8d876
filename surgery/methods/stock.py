"""Model Stock: interpolate between the base and the average of fine-tunes by their angle."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Weights
from surgery.methods.soup import Params

MODEL_STOCK_REF = "Model Stock, arXiv 2403.19522"


def model_stock_tensors(theta0: torch.Tensor, thetas: Sequence[torch.Tensor],
                        filter_wise: bool = False) -> torch.Tensor:
    """Model Stock on one tensor (arXiv 2403.19522, eq. 3 with k = N fine-tunes):

    τ_i = θ_i − θ₀; cos θ = the mean over pairs i < j of τ_i·τ_j / max(‖τ_i‖‖τ_j‖, 1e-6),
    each clamped to [−1, 1]; t = N cos θ / (1 + (N − 1) cos θ); θ = t·mean(θ_i) + (1 − t)·θ₀.
    Where |1 + (N − 1) cos θ| < 1e-6 there is no finite t and θ₀ is kept (t = 0).
    ``filter_wise``: one angle per row (a 1-D tensor is one row) instead of one per tensor.
    The steps are mergekit's ``model_stock``, so results agree with it bit for bit.
    """
    shape = theta0.shape
    if filter_wise:
        base = theta0.unsqueeze(0) if theta0.dim() == 1 else theta0
        models = [t.unsqueeze(0) if t.dim() == 1 else t for t in thetas]
    else:
        base = theta0.reshape(-1)
        models = [t.reshape(-1) for t in thetas]
    offsets = [t - base for t in models]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(models)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (count * cos) / torch.where(singular, torch.ones_like(denominator),
                                                denominator))
    average = models[0]
    for m in models[1:]:
        average = average + m
    average = average / count
    return (t * average + (1 - t) * base).reshape(shape)


def model_stock(base: Weights, models: Sequence[Weights], filter_wise: bool = False) -> Weights:
    """Model Stock (arXiv 2403.19522), per tensor: the base moved towards the average of the
    fine-tunes by t = N cos θ / (1 + (N − 1) cos θ), θ the mean angle between their task
    vectors (see :func:`model_stock_tensors`). Needs at least two fine-tunes."""
    if len(models) < 2:
        raise UsageError(f"model_stock: needs at least two fine-tuned models (got {len(models)})")

    def fn(name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        return model_stock_tensors(ts[0], ts[1:], filter_wise)

    return Weights(ElementwiseNode([base.node, *(m.node for m in models)], fn, "model_stock",
                                   {"filter_wise": filter_wise}, MODEL_STOCK_REF))


class ModelStockParams(Params):
    base: str
    models: list[str] = Field(min_length=2)
    filter_wise: bool = Field(False, description="one angle per row instead of per tensor")
