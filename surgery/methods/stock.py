"""Model Stock: interpolate between the base and the average of fine-tunes by their angle."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pydantic import Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Weights
from surgery.expr.node import thread_buffer
from surgery.methods.soup import Params

MODEL_STOCK_REF = "Model Stock, arXiv 2403.19522"

# Up to this many entries a tensor's angle is computed from the whole tensor in float32, as
# mergekit does (bit for bit); above, from float64 sums over pieces of it.
EXACT_ELEMENTS = 4 * 1024 * 1024
# Entries per float32 partial sum of a larger tensor's dot products (see task_gram).
GRAM_CHUNK = 4096


def stock_ratio(cos: torch.Tensor, count: int) -> torch.Tensor:
    """t = N cos θ / (1 + (N − 1) cos θ) for N fine-tunes, 0 where the denominator's
    magnitude is below 1e-6 (no finite t: the base is kept)."""
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos),
                       (count * cos) / torch.where(singular, torch.ones_like(denominator),
                                                   denominator))


def stock_cosine(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over pairs i < j of τ_i·τ_j / max(‖τ_i‖‖τ_j‖, 1e-6), each clamped to [−1, 1],
    along the last dimension, with a trailing dimension of 1 (τ_i = θ_i − θ₀)."""
    offsets = [t - base for t in models]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def task_gram(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """τ_i·τ_j (τ_i = θ_i − θ₀, θ₀ = ``values[0]``) as a float64 matrix: float32 products
    summed over chunks of ``GRAM_CHUNK`` entries, the chunks' sums added in float64 (as
    accurate as float64 throughout to about 1e-6 of the result, at float32's speed).

    The chunks lie in a buffer of the calling thread laid out chunk by chunk ([chunks, T,
    GRAM_CHUNK], contiguous whatever size the buffer grew to): a batched product's rounding
    depends on the memory layout, so a layout that depended on the pieces a thread saw
    before would make the result depend on which thread took the piece."""
    theta0, *thetas = (v.reshape(-1) for v in values)
    m, count, device = theta0.numel(), len(thetas), theta0.device
    whole = m - m % GRAM_CHUNK
    shape = (whole // GRAM_CHUNK, GRAM_CHUNK)
    base = thread_buffer("stock-base", shape, torch.float32, device)
    base.copy_(theta0[:whole].view(shape))
    chunks = thread_buffer(f"stock-taus-{count}", (shape[0], count, GRAM_CHUNK),
                           torch.float32, device)
    for i, t in enumerate(thetas):
        # Convert, then subtract in place: twice as fast as one mixed-dtype subtraction.
        chunks[:, i].copy_(t[:whole].view(shape)).sub_(base)
    gram = torch.bmm(chunks, chunks.transpose(1, 2)).double().sum(dim=0)
    rest = torch.stack([t[whole:].float() - theta0[whole:].float() for t in thetas])
    return gram + (rest @ rest.T).double()


def _interpolate(t: torch.Tensor, base: torch.Tensor, models: Sequence[torch.Tensor],
                 empty: Callable[[torch.Tensor], torch.Tensor] = torch.empty_like
                 ) -> torch.Tensor:
    """t·mean(models) + (1 − t)·base, with mergekit's operations in its order (the sum of
    the models left to right, divided by their count, times t, plus (1 − t)·base), into two
    tensors from ``empty`` (in place: fresh memory for every intermediate costs about 4x as
    much on a 256K-entry block on the CPU)."""
    if torch.result_type(models[0], t) != models[0].dtype:  # float32 t, lower compute dtype
        average = models[0]
        for m in models[1:]:
            average = average + m
        return t * (average / len(models)) + (1 - t) * base
    out = empty(models[0])
    if len(models) > 1:
        torch.add(models[0], models[1], out=out)
    else:
        out.copy_(models[0])
    for m in models[2:]:
        out.add_(m)
    out.div_(len(models)).mul_(t)
    return out.add_(torch.mul(base, 1 - t, out=empty(base)))


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
    t = stock_ratio(stock_cosine(base, models), len(models))
    return _interpolate(t, base, models).reshape(shape)


def model_stock(base: Weights, models: Sequence[Weights], filter_wise: bool = False) -> Weights:
    """Model Stock (arXiv 2403.19522), per tensor: the base moved towards the average of the
    fine-tunes by t = N cos θ / (1 + (N − 1) cos θ), θ the mean angle between their task
    vectors (see :func:`model_stock_tensors`). Needs at least two fine-tunes.

    Computed in blocks of rows. Up to ``EXACT_ELEMENTS`` entries (4M) the per-tensor angle is
    computed from the whole tensor as mergekit does, so results agree bit for bit; above, cos θ
    comes from dot products summed over pieces of the tensor (:func:`task_gram`: float32 over
    4096 entries, float64 beyond), which rounds differently from (and no worse than)
    mergekit's float32 reductions.
    ``filter_wise`` angles are per row and always mergekit's."""
    if len(models) < 2:
        raise UsageError(f"model_stock: needs at least two fine-tuned models (got {len(models)})")
    nodes = [base.node, *(m.node for m in models)]
    count = len(models)

    def ratio(name: str, ctx: EvalContext) -> torch.Tensor | None:
        shape = nodes[0].spec(name).shape
        if filter_wise and len(shape) >= 2:
            return None  # per row: each block holds whole rows
        if ctx.rows is None:  # the whole tensor: mergekit's steps
            ts = [ctx.to_compute(ctx.value(n, name)).reshape(-1) for n in nodes]
            return stock_ratio(stock_cosine(ts[0], ts[1:]), count)
        if math.prod(shape) <= EXACT_ELEMENTS:  # gathered whole: mergekit's steps
            parts = list(zip(*(v for _, v in ctx.pieces(nodes, name)), strict=True))
            ts = [torch.cat([p.reshape(-1).to(torch.float32) for p in ps]) for ps in parts]
            return stock_ratio(stock_cosine(ts[0], ts[1:]), count)
        grams = ctx.map(lambda rows: task_gram(ctx.piece(nodes, name, rows, reuse=True)),
                        ctx.piece_rows(nodes, name))
        dots = torch.stack(grams).sum(dim=0)
        norms = dots.diagonal().sqrt()
        cosines = [(dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
                   for i in range(count) for j in range(i + 1, count)]
        cos = torch.stack(cosines).mean().reshape(1).to(torch.float32)
        return stock_ratio(cos, count)

    def fn(name: str, ts: list[torch.Tensor], ctx: EvalContext, t: torch.Tensor | None
           ) -> torch.Tensor:
        if t is None:
            return model_stock_tensors(ts[0], ts[1:], filter_wise=True)
        shape = ts[0].shape
        flat = [x.reshape(-1) for x in ts]
        return _interpolate(t.to(flat[0].device), flat[0], flat[1:], ctx.empty_like
                            ).reshape(shape)

    def ratio_bytes(name: str) -> int:
        n = math.prod(nodes[0].spec(name).shape)
        return 2 * len(nodes) * n * 4 if n <= EXACT_ELEMENTS else 0

    return Weights(ElementwiseNode(nodes, fn, "model_stock", {"filter_wise": filter_wise},
                                   MODEL_STOCK_REF, rowwise=True, statistic=ratio,
                                   statistic_bytes=ratio_bytes))


class ModelStockParams(Params):
    base: str
    models: list[str] = Field(min_length=2)
    filter_wise: bool = Field(False, description="one angle per row instead of per tensor")
