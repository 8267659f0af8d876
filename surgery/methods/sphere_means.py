"""Interpolations on the hypersphere beyond two-model SLERP, as mergekit 0.1.5 has them:
NuSLERP (two models, optionally around a base, row-wise or flattened), Multi-SLERP (a
barycentre of many models in a tangent space) and the Karcher mean (iterated on the sphere)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Weights
from surgery.methods.schedule import Depth, Scheduled, per_model_weights
from surgery.methods.soup import Params

NUSLERP_REF = "Shoemake 1985 (SLERP); mergekit's nuslerp"
MULTISLERP_REF = "Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea)"
KARCHER_REF = "Karcher mean on the hypersphere, arXiv 2603.04972"


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False,
                    flatten: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """SLERP from ``v0`` (t = 0) to ``v1`` (t = 1) along the last dimension, as mergekit's
    ``nuslerp``: u = v/max(‖v‖, 1e-7), cos Ω = u₀·u₁ clamped to [−1, 1],
    result = (sin((1−t)Ω) v₀ + sin(tΩ) v₁)/sin Ω, and (1−t)v₀ + t v₁ where 1 − cos²Ω ≤ eps².
    ``flatten`` (default): one vector per tensor; else one per row (``row_wise``: per column,
    the first dimension)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(models: Sequence[Weights], weights: Sequence[Scheduled] | None = None,
            base: Weights | None = None, row_wise: bool = False, flatten: bool = True,
            layer_pattern: str | None = None) -> Weights:
    """NuSLERP (mergekit's ``nuslerp``): SLERP between two models at t = w₁/(w₀ + w₁)
    (t = 1/2 when |w₀ + w₁| < 1e-6), per tensor; with a ``base``, between the task vectors:
    θ = θ₀ + slerp(t, θ_a − θ₀, θ_b − θ₀). See :func:`nuslerp_tensors` for the formula,
    ``flatten`` (default, the whole tensor as one vector) and ``row_wise``."""
    if len(models) != 2:
        raise UsageError(f"nuslerp: needs exactly two models (got {len(models)})")
    depth = Depth.of(models[0].node, layer_pattern)
    ws = per_model_weights("nuslerp", weights, 2, models[0].node, depth)
    inputs = [m.node for m in models] + ([base.node] if base is not None else [])

    def fn(name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        w0, w1 = ws[0](name), ws[1](name)
        total = w0 + w1
        t = 0.5 if abs(total) < 1e-6 else w1 / total
        if base is None:
            return nuslerp_tensors(t, ts[0], ts[1], row_wise, flatten)
        theta0 = ts[2]
        return theta0 + nuslerp_tensors(t, ts[0] - theta0, ts[1] - theta0, row_wise, flatten)

    return Weights(ElementwiseNode(inputs, fn, "nuslerp",
                                   {"weights": [w.describe() for w in ws], "base": base is not None,
                                    "row_wise": row_wise, "flatten": flatten}, NUSLERP_REF,
                                   rowwise=not flatten and not row_wise))


def multislerp_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                       base: torch.Tensor | None = None, normalize_weights: bool = True,
                       eps: float = 1e-8) -> torch.Tensor:
    """Multi-SLERP, barycentric interpolation on the hypersphere (as mergekit's
    ``multislerp``), of the tensors (minus ``base`` when given), each flattened:

    u_i = v_i/(‖v_i‖ + eps); m = Σ w_i u_i / ‖Σ w_i u_i‖ (w normalised to sum 1 by default);
    tangents t_i = u_i − (u_i·m) m; τ = Σ w_i t_i; on the sphere r = m cos‖τ‖ + τ sin‖τ‖/‖τ‖
    (‖τ‖ + eps); result = r · Σ w_i ‖v_i‖ (+ base). When ‖Σ w_i u_i‖ < eps two models fall
    back to Σ w_i v_i and more are an error. One tensor is returned as it is."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise UsageError("multislerp: the weighted sum of the unit vectors is zero "
                             "(antipodal inputs with balancing weights); change the weights")
        out = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    length = torch.norm(tangent) + eps
    out = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return out + base if base is not None else out


def multislerp(models: Sequence[Weights], weights: Sequence[Scheduled] | None = None,
               base: Weights | None = None, normalize_weights: bool = True, eps: float = 1e-8,
               layer_pattern: str | None = None) -> Weights:
    """Multi-SLERP of any number of models, per tensor (see :func:`multislerp_tensors`), with
    an optional ``base`` as the sphere's centre. Weights default to 1 each."""
    if not models:
        raise UsageError("multislerp: needs at least one model")
    if not eps > 0:
        raise UsageError(f"multislerp: eps must be positive (got {eps!r})")
    depth = Depth.of(models[0].node, layer_pattern)
    ws = per_model_weights("multislerp", weights, len(models), models[0].node, depth)
    inputs = [m.node for m in models] + ([base.node] if base is not None else [])
    count = len(models)

    def fn(name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        return multislerp_tensors(ts[:count], [w(name) for w in ws],
                                  ts[count] if base is not None else None, normalize_weights,
                                  eps)

    return Weights(ElementwiseNode(inputs, fn, "multislerp",
                                   {"weights": [w.describe() for w in ws], "base": base is not None,
                                    "normalize_weights": normalize_weights, "eps": eps},
                                   MULTISLERP_REF))


def karcher_tensors(tensors: Sequence[torch.Tensor], alphas: Sequence[float],
                    max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Fréchet) mean on the unit sphere, scaled back, as mergekit's
    ``karcher``: u_i = v_i/‖v_i‖ (inputs with ‖v_i‖ ≤ tol left out); m starts at the
    normalised Σ ᾱ_i u_i (ᾱ: α over the kept inputs, normalised); then up to ``max_iter``
    times: g = Σ ᾱ_i θ_i/sin θ_i (u_i − cos θ_i m), θ_i = arccos(m·u_i) (terms with
    θ_i < tol skipped), stop when ‖g‖ < tol, else m ← cos‖g‖ m + sin‖g‖ g/‖g‖,
    renormalised. Result: (Σ α_i ‖v_i‖) · m."""
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else t / n for t, n in zip(tensors, norms,
                                                                              strict=True)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    kept = [units[i] for i in valid]
    mean = torch.zeros_like(kept[0])
    for a, u in zip(weights, kept, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = kept[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, kept, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        length = torch.linalg.vector_norm(tangent)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    scale = alphas[0] * norms[0]
    for a, n in zip(alphas[1:], norms[1:], strict=True):
        scale = scale + a * n
    return scale * mean


def karcher(models: Sequence[Weights], max_iter: int = 10, tol: float = 1e-5) -> Weights:
    """The Karcher mean of the models on the hypersphere, equal weights, per tensor (see
    :func:`karcher_tensors`; mergekit's ``karcher``, whose inputs are every model, the base
    included when it has one)."""
    if not models:
        raise UsageError("karcher: needs at least one model")
    if max_iter < 1:
        raise UsageError(f"karcher: max_iter must be at least 1 (got {max_iter})")
    if not tol > 0:
        raise UsageError(f"karcher: tol must be positive (got {tol!r})")
    alphas = [1.0 / len(models)] * len(models)

    def fn(name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        return karcher_tensors(ts, alphas, max_iter, tol)

    return Weights(ElementwiseNode([m.node for m in models], fn, "karcher",
                                   {"max_iter": max_iter, "tol": tol}, KARCHER_REF))


class NuslerpParams(Params):
    models: list[str] = Field(min_length=2, max_length=2)
    weights: list[Scheduled] | None = Field(None, description="one per model; t = w1/(w0+w1)")
    base: str | None = Field(None, description="interpolate the task vectors from this model")
    row_wise: bool = Field(False, description="per column vector instead of per row")
    flatten: bool = Field(True, description="the whole tensor as one vector")
    layer_pattern: str | None = Field(None, description="regex capturing the block index")


class MultislerpParams(Params):
    models: list[str] = Field(min_length=1)
    weights: list[Scheduled] | None = Field(None, description="one per model (default 1)")
    base: str | None = Field(None, description="the sphere's centre (default: the origin)")
    normalize_weights: bool = Field(True, description="weights divided by their sum")
    eps: float = Field(1e-8, gt=0, description="added to norms")
    layer_pattern: str | None = Field(None, description="regex capturing the block index")


class KarcherParams(Params):
    models: list[str] = Field(min_length=1)
    max_iter: int = Field(10, ge=1, description="most iterations of the mean")
    tol: float = Field(1e-5, gt=0, description="stop when the tangent step is below this")
