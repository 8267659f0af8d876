"""Entry-wise choices between a base and one other model: NearSwap (take the other model's
value where the two are close) and Arcee Fusion (take it where it matters most), as
mergekit 0.1.5 has them."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from pydantic import Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Weights
from surgery.methods.schedule import Depth, Schedule, Scheduled
from surgery.methods.soup import Params

NEARSWAP_REF = "NearSwap (alchemonaut, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)"
ARCEE_FUSION_REF = "Arcee Fusion (arcee.ai; mergekit's arcee_fusion)"

# Arcee Fusion's quartiles come from at most this many entries of a tensor (drawn with
# replacement above it), as mergekit's.
QUANTILE_SAMPLE = 1_000_000


def nearswap_tensors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap of ``b`` into ``a``: w = clamp(t / max(|a − b|, 1e-6), 0, 1) per entry,
    result = w·b + (1 − w)·a. Entries within t of each other take b's value; farther ones move
    towards b by t / |a − b|."""
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def nearswap(base: Weights, model: Weights, t: Scheduled,
             layer_pattern: str | None = None) -> Weights:
    """NearSwap (mergekit's ``nearswap``), per entry: see :func:`nearswap_tensors`.
    ``t`` ≥ 0 may be a schedule; t = 0 gives the base."""
    depth = Depth.of(base.node, layer_pattern)
    ts = Schedule("nearswap: t", t, base.node, depth,
                  check=lambda v: None if v >= 0 else "is negative")

    def fn(name: str, tensors: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        return nearswap_tensors(tensors[0], tensors[1], ts(name))

    return Weights(ElementwiseNode([base.node, model.node], fn, "nearswap",
                                   {"t": ts.describe()}, NEARSWAP_REF, rowwise=True))


def fusion_seed(seed: int, name: str) -> int:
    """The seed of the generator that samples tensor ``name``'s entries for its quartiles
    (tensors of more than ``QUANTILE_SAMPLE`` entries)."""
    digest = hashlib.sha256(f"{seed}\0arcee_fusion\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def arcee_fusion_tensors(base: torch.Tensor, model: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Arcee Fusion of ``model`` into ``base``, as mergekit's ``arcee_fusion``:

    importance = |θ − θ₀| · KL(p ‖ q) per row, p = softmax(θ) + 1e-8, q = softmax(θ₀) + 1e-8
    over the last dimension, KL = Σ p log(p/q); threshold = median + 1.5 (Q3 − Q1) of the
    importances (quantiles as the sorted values at ⌊q (n − 1)⌋, from a sample of
    ``QUANTILE_SAMPLE`` entries drawn with replacement by ``generator`` when larger);
    θ = θ₀ + (θ − θ₀)·[importance ≥ threshold]."""
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        pick = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator,
                             device=flat.device)
        flat = flat[pick]
    ordered, _ = torch.sort(flat)
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at.to(ordered.device)]
    threshold = median + 1.5 * (q3 - q1)
    mask = (importance >= threshold).float()
    return base + (model - base) * mask


def arcee_fusion(base: Weights, model: Weights) -> Weights:
    """Arcee Fusion (mergekit's ``arcee_fusion``), per tensor: the model's updates whose
    importance is an upper outlier (see :func:`arcee_fusion_tensors`) are added to the base.
    Tensors of more than 10⁶ entries estimate the quartiles from a sample drawn by a
    generator seeded from (recipe seed, tensor name), where mergekit uses torch's global
    generator; up to 10⁶ entries the result is mergekit's bit for bit."""
    def fn(name: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        if ts[0].dim() == 0:
            raise UsageError(f"arcee_fusion: tensor {name!r} is a scalar (no softmax axis)")
        generator = None
        if ts[0].numel() > QUANTILE_SAMPLE:
            generator = torch.Generator(device=ts[0].device)
            generator.manual_seed(fusion_seed(ctx.seed, name))
        return arcee_fusion_tensors(ts[0], ts[1], generator)

    return Weights(ElementwiseNode([base.node, model.node], fn, "arcee_fusion", {},
                                   ARCEE_FUSION_REF))


class NearswapParams(Params):
    base: str
    model: str
    t: Scheduled = Field(description="distance below which the model's value is taken, >= 0")
    layer_pattern: str | None = Field(None, description="regex capturing the block index")


class ArceeFusionParams(Params):
    base: str
    model: str
