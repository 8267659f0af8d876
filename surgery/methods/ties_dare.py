"""TIES merging and DARE (drop and rescale), with TIES-style or linear combination."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Weights
from surgery.methods.schedule import (
    Depth,
    Schedule,
    Scheduled,
    in_unit_interval,
    per_model_weights,
)
from surgery.methods.soup import Params

TIES_REF = "TIES-merging, arXiv 2306.01708"
DARE_REF = "DARE (Language models are Super Mario), arXiv 2311.03099"

Consensus = Literal["sum", "count"]
Rescale = Literal["inverse_density", "l1"]


# Task vectors are processed in flat blocks of this many elements, small enough that a block's
# conversions and intermediates stay in the CPU's cache between operations.
BLOCK = 256 * 1024
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Cut:
    """Which entries of one task vector the trim keeps, from the bit patterns of |τ| (ordered
    like the magnitudes, as they are non-negative): all above ``bits``, and the first
    ``keep_tied`` equal to it in order of flat index. :meth:`drop` is called on consecutive
    blocks in order and counts the tied entries it keeps."""

    bits: int
    keep_tied: int

    def drop(self, mag_bits: torch.Tensor) -> torch.Tensor:
        """The mask of entries trimmed away in the next block, ``mag_bits`` (flat)."""
        drop = mag_bits <= self.bits
        if self.keep_tied:
            tied = torch.nonzero(mag_bits == self.bits).flatten()[:self.keep_tied]
            drop[tied] = False
            self.keep_tied -= len(tied)
        return drop


def magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """|τ| viewed as signed integers of its width: their order is the order of |τ|."""
    return tau.abs().view(_INT_VIEW[tau.element_size()])


def find_cuts(blocks: Callable[[], Iterator[list[torch.Tensor]]], k: int
              ) -> list[Cut]:
    """For each of several task vectors, the cut keeping its k entries of largest magnitude,
    by radix selection on 16-bit digits of the magnitude bits, highest first: ``blocks()``
    yields the magnitude bits of each vector over consecutive blocks and is called
    once per digit (twice for float32). Each pass counts the digits of the entries that match
    the digits found so far and picks the digit of the k-th largest; entries equal to it are
    kept in order of flat index, lowest first, until exactly k are."""
    prefix: list[int] = []  # the digits found so far, as one number, per vector
    rank: list[int] = []  # how many entries matching the prefix are kept, per vector
    known = 0  # how many high bits the prefix holds
    width = 0
    while not width or known < width:
        hists: list[torch.Tensor] = []
        for bits in blocks():
            width = 8 * bits[0].element_size()
            shift = max(width - known - 16, 0)
            counts = []
            for i, b in enumerate(bits):
                flat = b.reshape(-1)
                if known:
                    flat = flat[(flat >> (width - known)) == prefix[i]]
                digits = (flat >> shift) & ((1 << (width - known - shift)) - 1)
                counts.append(torch.bincount(digits, minlength=1 << (width - known - shift)))
            hists = counts if not hists else [h.add_(c) for h, c in zip(hists, counts,
                                                                         strict=True)]
        shift = max(width - known - 16, 0)
        if not known:
            prefix, rank = [0] * len(hists), [k] * len(hists)
        for i, h in enumerate(hists):
            above = h.flip(0).cumsum(0).flip(0)  # matching entries with this digit or higher
            digit = int(torch.nonzero(above >= rank[i]).max())
            rank[i] -= int(above[digit + 1]) if digit + 1 < len(above) else 0
            prefix[i] = (prefix[i] << (width - known - shift)) | digit
        known = width - shift
    return [Cut(p, r) for p, r in zip(prefix, rank, strict=True)]


def _flat_blocks(t: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), BLOCK):
        yield start, flat[start:start + BLOCK]


def task_vector_blocks(ts: list[torch.Tensor], dtype: torch.dtype
                       ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(flat start, θ₀ block, stacked τ_i = θ_i − θ₀ blocks [T, b]) over consecutive flat
    blocks of a base ``ts[0]`` and models ``ts[1:]`` in any float dtype, computed in ``dtype``
    (the τ blocks reuse one buffer: each is valid until the next is yielded)."""
    theta0, thetas = ts[0].reshape(-1), [t.reshape(-1) for t in ts[1:]]
    n = theta0.numel()
    scratch = torch.empty((len(thetas), min(BLOCK, n)), dtype=dtype, device=theta0.device)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        base_block = theta0[start:stop].to(dtype)
        taus = scratch[:, :stop - start]
        for i, theta in enumerate(thetas):
            torch.sub(theta[start:stop], base_block, out=taus[i])
        yield start, base_block, taus


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density·n⌋ entries of largest |τ|, zero the rest.

    The threshold is the k-th largest |τ|, found by radix selection (no sort, see
    :func:`find_cuts`). Entries equal to the threshold are kept in order of flat index, lowest
    first, until exactly k are.
    """
    n = tau.numel()
    k = int(density * n)
    if k >= n:
        return tau
    if k == 0:
        return torch.zeros_like(tau)
    mag = magnitude_bits(tau)
    (cut,) = find_cuts(lambda: ([b] for _, b in _flat_blocks(mag)), k)
    drop = torch.cat([cut.drop(b) for _, b in _flat_blocks(mag)])
    return tau.masked_fill(drop.reshape(tau.shape), 0.0)


def elect(contributions: torch.Tensor, consensus: Consensus) -> torch.Tensor:
    """The elected sign per entry, ±1, from stacked weighted task vectors [T, ...]:
    sign of their sum (``sum``) or of their sign count (``count``); +1 where that is 0."""
    score = contributions.sum(0) if consensus == "sum" else contributions.sign().sum(0)
    return torch.where(score >= 0, 1.0, -1.0).to(contributions.dtype)


def disjoint_merge(taus: torch.Tensor, weights: torch.Tensor, consensus: Consensus,
                   normalize: bool) -> torch.Tensor:
    """TIES steps 2 and 3 on stacked (already trimmed or dropped) task vectors [T, ...].

    m_i = [sign(τ_i) = s], merged = Σ w_i m_i τ_i / Σ w_i m_i (0 where no input agrees), or the
    numerator alone with ``normalize=False``.
    """
    ones = bool((weights == 1).all())  # weights of 1 (the usual case) multiply nothing
    w = weights.reshape(-1, *([1] * (taus.dim() - 1)))
    weighted = taus if ones else taus * w
    s = elect(weighted, consensus)
    agree = (taus.sign() == s).to(taus.dtype)
    merged = (weighted * agree).sum(0)
    if normalize:
        divisor = agree.sum(0) if ones else (w * agree).sum(0)
        divisor[divisor == 0] = 1
        merged /= divisor
    return merged


def _stack_weights(schedules: list[Schedule], name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([s(name) for s in schedules], dtype=like.dtype, device=like.device)


def _prepare(op: str, base: Weights, models: Sequence[Weights], density: Scheduled,
             weights: Sequence[Scheduled] | None, lambda_: Scheduled,
             layer_pattern: str | None) -> tuple[Schedule, list[Schedule], Schedule]:
    if not models:
        raise UsageError(f"{op}: needs at least one fine-tuned model")
    depth = Depth.of(base.node, layer_pattern)
    dens = Schedule(f"{op}: density", density, base.node, depth, check=in_unit_interval)
    ws = per_model_weights(op, weights, len(models), base.node, depth)
    lam = Schedule(f"{op}: lambda", lambda_, base.node, depth)
    return dens, ws, lam


def _params(density: Schedule, ws: list[Schedule], lam: Schedule, **extra: object) -> dict:
    return {"density": density.describe(), "weights": [w.describe() for w in ws],
            "lambda": lam.describe(), **extra}


def ties(base: Weights, models: Sequence[Weights], density: Scheduled,
         weights: Sequence[Scheduled] | None = None, lambda_: Scheduled = 1.0,
         consensus: Consensus = "sum", normalize: bool = True,
         layer_pattern: str | None = None) -> Weights:
    """TIES merging (arXiv 2306.01708), per tensor:

    1. trim: τ̂_i keeps the k = ⌊density·n⌋ entries of τ_i = θ_i − θ₀ of largest magnitude
       (k-th value selection; ties at the threshold kept by lower flat index);
    2. elect: s = sign(Σ w_i τ̂_i), +1 where the sum is 0 (``consensus="count"``: the sign
       of Σ sign(w_i τ̂_i));
    3. disjoint merge: m_i = [sign(τ̂_i) = s], merged = Σ w_i m_i τ̂_i / Σ w_i m_i (0 where no
       input agrees; ``normalize=False`` keeps the weighted sum); θ = θ₀ + λ·merged.

    With equal weights this is the paper's disjoint mean and mergekit's ``ties``. ``density``,
    each weight and ``lambda_`` may be schedules (see :mod:`surgery.methods.schedule`).
    """
    dens, ws, lam = _prepare("ties", base, models, density, weights, lambda_, layer_pattern)

    nodes = [base.node, *(m.node for m in models)]
    # The cuts of the tensor being computed: a row-wise node gets its rows block by block,
    # in order, and the cuts count the tied entries kept so far.
    current: dict[str, list[Cut]] = {}

    def cuts_of(name: str, ctx: EvalContext, k: int) -> list[Cut]:
        if ctx.rows is None or ctx.rows[0] == 0 or name not in current:
            dtype = ctx.compute_dtype

            def blocks() -> Iterator[list[torch.Tensor]]:
                for _, (theta0, *thetas) in ctx.pieces(nodes, name):
                    base_block = theta0.reshape(-1).to(dtype)
                    yield [magnitude_bits(t.reshape(-1).to(dtype) - base_block) for t in thetas]

            current.clear()
            current[name] = find_cuts(blocks, k) if 0 < k < n_of(name) else []
        return current[name]

    def n_of(name: str) -> int:
        return math.prod(nodes[0].spec(name).shape)

    def fn(name: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        # Inputs come as stored (bf16 typically) and are converted block by block.
        dtype = ctx.compute_dtype
        k = int(dens(name) * n_of(name))
        cuts = cuts_of(name, ctx, k)
        w = torch.tensor([s(name) for s in ws], dtype=dtype, device=ts[0].device)
        scale = lam(name)
        out = ctx.empty((ts[0].numel(),), dtype)
        for start, base_block, taus in task_vector_blocks(ts, dtype):
            for i, cut in enumerate(cuts):
                taus[i].masked_fill_(cut.drop(magnitude_bits(taus[i])), 0.0)
            if k == 0:
                taus.zero_()
            merged = disjoint_merge(taus, w, consensus, normalize)
            torch.add(base_block, merged if scale == 1 else merged * scale,
                      out=out[start:start + taus.shape[1]])
        return out.reshape(ts[0].shape)

    return Weights(ElementwiseNode(
        [base.node, *(m.node for m in models)], fn, "ties",
        _params(dens, ws, lam, consensus=consensus, normalize=normalize), TIES_REF,
        rowwise=True, convert=False))


def drop_and_rescale(tau: torch.Tensor, density: float, rescale: Rescale,
                     generator: torch.Generator) -> torch.Tensor:
    """DARE on one task vector: keep each entry with probability ``density`` (drop with
    p = 1 − density), then rescale survivors by 1/density (``inverse_density``) or so that
    ‖τ‖₁ is unchanged (``l1``, as mergekit; no rescale when either norm is below 1e-7)."""
    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) < density
    dropped = tau * keep
    if rescale == "inverse_density":
        return dropped / density
    before, after = tau.abs().sum(), dropped.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return dropped
    return dropped * (before / after)


def _dare(op: str, base: Weights, models: Sequence[Weights], density: Scheduled,
          weights: Sequence[Scheduled] | None, lambda_: Scheduled, rescale: Rescale,
          consensus: Consensus | None, normalize: bool, layer_pattern: str | None) -> Weights:
    dens, ws, lam = _prepare(op, base, models, density, weights, lambda_, layer_pattern)

    def combine(taus: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if consensus is not None:
            return disjoint_merge(taus, w, consensus, normalize)
        merged = (taus * w.reshape(-1, *([1] * (taus.dim() - 1)))).sum(0)
        if normalize:
            total = w.sum()
            merged /= total if total.abs() >= 1e-8 else 1.0
        return merged

    def whole(name: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        # The l1 rescale needs the norms of whole task vectors.
        theta0 = ts[0]
        d = dens(name)
        taus = torch.stack([
            drop_and_rescale(t - theta0, d, rescale, ctx.generator(name, f"dare:{i}"))
            for i, t in enumerate(ts[1:])])
        return theta0 + combine(taus, _stack_weights(ws, name, theta0)) * lam(name)

    # The generators of the tensor being computed and the row they have drawn up to: a
    # row-wise node gets its rows block by block, in order.
    drawn: dict[str, tuple[int, list[torch.Generator]]] = {}

    def blockwise(name: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        # Inverse-density rescale is entry by entry: blocks of the stored inputs, each
        # model's draws taken block after block from its generator (the same sequence as
        # one draw for the whole tensor).
        dtype = ctx.compute_dtype
        d = dens(name)
        first, count = ctx.rows or (0, 0)
        if first == 0 or name not in drawn:
            drawn.clear()
            drawn[name] = (0, [ctx.generator(name, f"dare:{i}") for i in range(len(ts) - 1)])
        row, gens = drawn[name]
        if row != first:
            raise RuntimeError(f"{op}: tensor {name!r}: rows from {first} asked for, "
                               f"draws are at row {row}")
        drawn[name] = (first + count, gens)
        w = torch.tensor([s(name) for s in ws], dtype=dtype, device=ts[0].device)
        scale = lam(name)
        out = ctx.empty((ts[0].numel(),), dtype)
        for start, base_block, taus in task_vector_blocks(ts, dtype):
            if d < 1.0:
                for tau, gen in zip(taus, gens, strict=True):
                    tau.mul_(torch.rand(tau.shape, generator=gen, device=tau.device) < d)
                    tau.div_(d)
            merged = combine(taus, w)
            torch.add(base_block, merged if scale == 1 else merged * scale,
                      out=out[start:start + taus.shape[1]])
        return out.reshape(ts[0].shape)

    extra: dict[str, object] = {"rescale": rescale, "normalize": normalize}
    if consensus is not None:
        extra["consensus"] = consensus
    by_entry = rescale == "inverse_density"
    return Weights(ElementwiseNode([base.node, *(m.node for m in models)],
                                   blockwise if by_entry else whole, op,
                                   _params(dens, ws, lam, **extra), DARE_REF,
                                   rowwise=by_entry, convert=not by_entry))


def dare_linear(base: Weights, models: Sequence[Weights], density: Scheduled,
                weights: Sequence[Scheduled] | None = None, lambda_: Scheduled = 1.0,
                rescale: Rescale = "inverse_density", normalize: bool = False,
                layer_pattern: str | None = None) -> Weights:
    """DARE with task-arithmetic combination (arXiv 2311.03099):

    τ̃_i = drop_and_rescale(θ_i − θ₀), each entry dropped with p = 1 − density and survivors
    scaled by 1/(1 − p); θ = θ₀ + λ Σ w_i τ̃_i (divided by Σ w_i with ``normalize=True``).
    Drops are drawn from a generator seeded by (recipe seed, tensor name, model index).
    """
    return _dare("dare_linear", base, models, density, weights, lambda_, rescale, None,
                 normalize, layer_pattern)


def dare_ties(base: Weights, models: Sequence[Weights], density: Scheduled,
              weights: Sequence[Scheduled] | None = None, lambda_: Scheduled = 1.0,
              rescale: Rescale = "inverse_density", consensus: Consensus = "sum",
              normalize: bool = False, layer_pattern: str | None = None) -> Weights:
    """DARE with TIES sign election (arXiv 2311.03099, 2306.01708): the dropped and rescaled
    τ̃_i go through TIES's election and disjoint merge (no magnitude trim). The default is the
    weighted sum of agreeing entries (``normalize=False``, as mergekit's ``dare_ties``), since
    the rescale already keeps each τ̃_i unbiased.
    """
    return _dare("dare_ties", base, models, density, weights, lambda_, rescale, consensus,
                 normalize, layer_pattern)


class _TaskVectorMergeParams(Params):
    base: str
    models: list[str] = Field(min_length=1)
    density: Scheduled = Field(description="fraction of each task vector kept, in (0, 1]")
    weights: list[Scheduled] | None = Field(None, description="one per model (default 1)")
    lambda_: Scheduled = Field(1.0, alias="lambda", description="scale of the merged vector")
    layer_pattern: str | None = Field(None, description="regex capturing the block index")


class TiesParams(_TaskVectorMergeParams):
    consensus: Consensus = "sum"
    normalize: bool = Field(True, description="weighted mean of agreeing entries (else sum)")


class DareLinearParams(_TaskVectorMergeParams):
    rescale: Rescale = "inverse_density"
    normalize: bool = Field(False, description="divide by the sum of weights")


class DareTiesParams(DareLinearParams):
    consensus: Consensus = "sum"
