"""TIES merging and DARE (drop and rescale), with TIES-style or linear combination."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Weights
from surgery.expr.node import PIECE_ELEMENTS, Node, thread_buffer
from surgery.expr.weights import weights_label
from surgery.methods.schedule import (
    Depth,
    ModelScheduled,
    Schedule,
    Scheduled,
    describe_per_model,
    in_unit_interval,
    per_model_schedules,
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

Empty = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
Piece = tuple[int, Callable[[], list[torch.Tensor]]]


def _empty(device: torch.device) -> Empty:
    return lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class Cut:
    """Which entries of one task vector the trim keeps, from the bit patterns of |τ| (ordered
    like the magnitudes, as they are non-negative): all above ``bits``, and those equal to it
    at flat indices below ``tie_limit`` (the lowest indices first, so that exactly k are kept).
    Where each entry goes depends on nothing but its value and index, so blocks of a tensor
    can be trimmed in any order."""

    bits: int
    tie_limit: int

    def apply(self, tau: torch.Tensor, start: int, scratch: torch.Tensor) -> None:
        """Zero the entries the trim drops in ``tau``, a flat block at flat index ``start``
        of the task vector, in place (``scratch``: a flat buffer like ``tau``)."""
        n = tau.numel()
        split = min(max(self.tie_limit - start, 0), n)  # ties kept before here, dropped after
        if split:
            _zero_below(tau[:split], self.bits, scratch[:split])
        if split < n:
            _zero_below(tau[split:], self.bits + 1, scratch[split:n])


def _zero_below(tau: torch.Tensor, limit: int, scratch: torch.Tensor) -> None:
    """Zero the entries of ``tau`` whose magnitude bits are below ``limit``, in place.

    Those are the entries with |τ| ≤ the float whose bits are limit − 1, which is what
    ``hardshrink`` zeroes, in one pass (it writes +0, as the mask below does). When that float
    is not finite (a cut at infinity or NaN), a mask from the bits instead: the sign bit of
    (limit − 1 − bits) is set exactly where bits ≥ limit (no overflow, both are non-negative),
    and spread by an arithmetic shift it keeps them."""
    if limit <= 0:
        return  # every magnitude's bits are at least 0
    ints = _INT_VIEW[tau.element_size()]
    below = _float_of_bits(limit - 1, tau.dtype)
    if math.isfinite(below):
        torch.hardshrink(tau, below, out=tau)
        return
    mask = torch.abs(tau, out=scratch).view(ints)
    mask.neg_().add_(limit - 1).bitwise_right_shift_(8 * tau.element_size() - 1)
    tau.view(ints).bitwise_and_(mask)


@functools.lru_cache(maxsize=256)
def _float_of_bits(bits: int, dtype: torch.dtype) -> float:
    """The float of ``dtype`` whose bit pattern is ``bits`` (cached: a cut's limits recur in
    every block of its tensor, and a one-element tensor per block costs more than the
    arithmetic on a small one)."""
    return torch.tensor([bits], dtype=_INT_VIEW[dtype.itemsize]).view(dtype).item()


def magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """|τ| viewed as signed integers of its width: their order is the order of |τ|."""
    return tau.abs().view(_INT_VIEW[tau.element_size()])


def magnitude_pieces(ctx: EvalContext, nodes: Sequence[Node], name: str) -> list[Piece]:
    """:func:`find_cuts`'s pieces of the task vectors |θ_i − θ₀| (``nodes``: θ₀ first) of a
    tensor that is not a scalar: each piece's rows read, converted to the compute dtype and
    subtracted into a buffer of the calling thread (each piece is scanned before the next is
    read), as the magnitudes' bits."""
    dtype = ctx.compute_dtype

    def read(rows: tuple[int, int]) -> list[torch.Tensor]:
        theta0, *thetas = ctx.piece(nodes, name, rows, reuse=True)
        buf = thread_buffer("magnitude-read", (len(nodes), theta0.numel()), dtype,
                            theta0.device)
        base_block = buf[0].copy_(theta0.reshape(-1))
        return [buf[i].copy_(t.reshape(-1)).sub_(base_block).abs_().view(
            _INT_VIEW[dtype.itemsize]) for i, t in enumerate(thetas, 1)]

    row = math.prod(nodes[0].spec(name).shape) // nodes[0].spec(name).shape[0]
    return [(rows[0] * row, lambda rows=rows: read(rows)) for rows in ctx.piece_rows(nodes, name)]


def _serial_map(fn: Callable, xs: Sequence) -> list:
    return [fn(x) for x in xs]


# The one-pass selection estimates the k-th largest from a sample of pieces spread over the
# tensor (rows of a weight matrix can differ): about this many entries of that many pieces.
SAMPLE_PIECES = 4
SAMPLE_ENTRIES = 1 << 18


def sample_pieces(count: int) -> list[int]:
    """Which of ``count`` pieces estimate the k-th largest: up to ``SAMPLE_PIECES`` of them,
    evenly spread, the first among them."""
    return sorted({i * count // SAMPLE_PIECES for i in range(min(SAMPLE_PIECES, count))})


def sample_bracket(sample: torch.Tensor, k: int, n: int) -> tuple[int, int]:
    """[lo, hi): values of a sample of ``n`` non-negative integers that should hold their
    k-th largest: the sample's order statistics five standard deviations of the sampled
    rank (√(m·p·(1−p)) for m sampled and p = k/n) on either side of where it would be, and
    m/512 more for a sample that is not quite like the whole. hi is 2³¹ − 1 when nothing need
    be above."""
    m = sample.numel()
    p = k / n
    rank = p * m  # of the k-th largest among the sampled, from the top
    margin = 5 * math.sqrt(m * p * (1 - p)) + m / 512 + 2
    top, bottom = int(rank - margin), math.ceil(rank + margin)  # ranks from the top
    hi = _kth_largest(sample, top) + 1 if top >= 1 else (1 << 31) - 1
    lo = _kth_largest(sample, bottom) if bottom < m else 0
    return lo, min(hi, (1 << 31) - 1)


def keep_all(n: int) -> Cut:
    """The cut that keeps every entry of an n-entry task vector."""
    return Cut(0, n)


def keep_none(width: int = 32) -> Cut:
    """The cut that zeroes every entry (of magnitudes ``width`` bits wide): every magnitude's
    bits are below the largest signed value of that width, and no tie is kept."""
    return Cut((1 << (width - 1)) - 1, 0)


def find_cuts(pieces: Sequence[Piece], k: int | Sequence[int], n: int, width: int = 32,
              map_: Callable[[Callable, Sequence], list] = _serial_map) -> list[Cut]:
    """For each of several task vectors, the cut keeping its k entries of largest magnitude
    (``pieces``: (flat start, read) of consecutive pieces of the vectors, ``read()`` giving
    the flat magnitude bits of each vector there, valid until the thread's next ``read()``;
    ``n`` entries in all, ``width`` bits each; ``map_`` may share the pieces among threads).
    ``k`` is one count for all vectors or one per vector; a vector with k ≥ n gets
    :func:`keep_all`, one with k ≤ 0 :func:`keep_none`, and the pieces are read only when
    some vector has 0 < k < n.

    For float32 magnitudes of several pieces, one pass: a sample of the pieces (see
    :func:`sample_pieces`) brackets the k-th largest (:func:`sample_bracket`), and the pass
    counts the entries above the bracket while it collects those within, among which the k-th
    largest then lies (found exactly, with the indices of its ties); when the bracket missed
    it, or holds too many entries (see ``NEAR_LIMIT``), :func:`radix_cuts` reads them
    again."""
    if isinstance(k, int):
        if not 0 < k < n:
            raise ValueError(f"find_cuts: one k for all vectors must be in (0, {n}), got {k}")
    else:
        ks = list(k)
        active = [i for i, ki in enumerate(ks) if 0 < ki < n]
        if len(active) < len(ks):
            def subset(read: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
                values = read()
                return [values[i] for i in active]

            found = iter(find_cuts([(start, lambda read=read: subset(read))
                                    for start, read in pieces], [ks[i] for i in active], n,
                                   width, map_) if active else [])
            return [next(found) if 0 < ki < n else keep_all(n) if ki >= n
                    else keep_none(width) for ki in ks]
    if width == 32 and len(pieces) > 1:
        cuts = _one_pass_cuts(pieces, k, n, map_)
        if cuts is not None:
            return cuts
    return radix_cuts(pieces, k, n, width, map_)


def _kth(k: int | Sequence[int], v: int) -> int:
    """Vector v's count of entries to keep."""
    return k if isinstance(k, int) else k[v]


# A piece with more than this share of its entries within the bracket (tensors of a few
# distinct values) sends the selection to the radix passes, which hold nothing per entry.
NEAR_LIMIT = 1 / 16


class _TooMany(Exception):
    """A piece has too many entries within the bracket."""


def _one_pass_cuts(pieces: Sequence[Piece], k: int | Sequence[int], n: int,
                   map_: Callable[[Callable, Sequence], list]) -> list[Cut] | None:
    sampled = sample_pieces(len(pieces))
    kept = {i: [b.clone() for b in pieces[i][1]()] for i in sampled}  # read() reuses buffers
    size = sum(kept[i][0].numel() for i in sampled)
    stride = max(size // SAMPLE_ENTRIES, 1)
    brackets = [sample_bracket(torch.cat([kept[i][v][::stride] for i in sampled]), _kth(k, v),
                               n) for v in range(len(kept[0]))]

    def scan(i: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        out = []
        for flat, (lo, hi) in zip(kept.pop(i, None) or pieces[i][1](), brackets, strict=True):
            above, near, values = _bracket(flat, lo, hi)
            if len(near) > NEAR_LIMIT * len(flat):
                raise _TooMany
            out.append((above, near, values))
        return out

    rest = [i for i in range(len(pieces)) if i not in kept]
    try:
        scanned = {i: scan(i) for i in sampled}
        scanned.update(zip(rest, map_(scan, rest), strict=True))
    except _TooMany:
        return None
    per_piece = [scanned.pop(i) for i in range(len(pieces))]
    cuts = []
    for v in range(len(brackets)):
        # The k-th largest is among the entries near the estimate when fewer than k are
        # above them and at least k are above or near; it is the rank-th largest of those.
        rank = _kth(k, v) - sum(p[v][0] for p in per_piece)
        bits = torch.cat([p[v][2] for p in per_piece])
        if not 0 < rank <= len(bits):
            return None
        threshold = _kth_largest(bits, rank)
        tie_limit = n
        if threshold:
            # Of the entries equal to it, the lowest indices are kept: find the last kept.
            ties = rank - int((bits > threshold).sum())
            for (start, _), (_, index, values) in zip(pieces, (p[v] for p in per_piece),
                                                      strict=True):
                equal = index[values == threshold]
                if ties <= len(equal):
                    tie_limit = start + int(equal[ties - 1]) + 1
                    break
                ties -= len(equal)
        cuts.append(Cut(threshold, tie_limit))
    return cuts


def _kth_largest(values: torch.Tensor, rank: int) -> int:
    """The rank-th largest of the flat ``values`` (rank ≥ 1): by numpy's partition on the
    CPU, 15x faster than torch's kthvalue there."""
    at = values.numel() - rank
    if values.device.type == "cpu":
        return int(np.partition(values.numpy(), at)[at])
    return int(torch.kthvalue(values, at + 1).values)


def _bracket(flat: torch.Tensor, lo: int, hi: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Of the non-negative integers ``flat``: how many are ≥ ``hi``, and the flat indices (as
    int32) and values of those in [lo, hi) (``lo`` < ``hi``). On the CPU with numpy, whose
    comparisons into reused masks and whose nonzero run several times faster than torch's."""
    if flat.device.type != "cpu":
        return _bracket_torch(flat, lo, hi)
    values = flat.numpy()
    masks = thread_buffer("bracket", (2, len(values)), torch.bool, flat.device).numpy()
    top = np.greater_equal(values, hi, out=masks[0])
    near = np.greater_equal(values, lo, out=masks[1])
    np.not_equal(near, top, out=near)  # lo ≤ value < hi, as every value ≥ hi is ≥ lo
    index = np.flatnonzero(near)
    return (int(np.count_nonzero(top)), torch.from_numpy(index.astype(np.int32)),
            torch.from_numpy(values[index]))


def _bracket_torch(flat: torch.Tensor, lo: int, hi: int
                   ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """:func:`_bracket` in torch, on any device."""
    top = flat >= hi
    near = torch.nonzero((flat >= lo) & ~top).flatten()
    return int(top.sum()), near.int(), flat[near]


def radix_cuts(pieces: Sequence[Piece], k: int | Sequence[int], n: int, width: int = 32,
               map_: Callable[[Callable, Sequence], list] = _serial_map) -> list[Cut]:
    """For each of several task vectors, the cut keeping its k entries of largest magnitude,
    by radix selection on 16-bit digits of the magnitude bits, highest first (arguments as
    :func:`find_cuts`). Each pass reads all pieces, counts the digits of the entries that
    match the digits found so far and picks the digit of the k-th largest. When only some of
    the entries equal to the k-th largest are kept, one more pass finds the flat index below
    which they are."""
    prefix: list[int] = []  # the digits found so far, as one number, per vector
    rank: list[int] = []  # how many entries matching the prefix are kept, per vector
    tied: list[int] = []  # how many entries match the prefix, per vector
    known = 0  # how many high bits the prefix holds
    while known < width:
        shift = max(width - known - 16, 0)
        bins = 1 << (width - known - shift)

        def count(piece: Piece, known: int = known, shift: int = shift, bins: int = bins,
                  prefix: list[int] = prefix) -> list[torch.Tensor]:
            out = []
            for i, flat in enumerate(piece[1]()):
                if known:
                    flat = flat[(flat >> (width - known)) == prefix[i]]
                digits = (flat >> shift) & (bins - 1)
                out.append(torch.bincount(digits, minlength=bins))
            return out

        per_piece = map_(count, pieces)
        hists = [torch.stack(h).sum(0) for h in zip(*per_piece, strict=True)]
        if not known:
            prefix, tied = [0] * len(hists), [0] * len(hists)
            rank = [_kth(k, v) for v in range(len(hists))]
        for i, h in enumerate(hists):
            above = h.flip(0).cumsum(0).flip(0)  # matching entries with this digit or higher
            digit = int(torch.nonzero(above >= rank[i]).max())
            rank[i] -= int(above[digit + 1]) if digit + 1 < len(above) else 0
            tied[i] = int(h[digit])
            prefix[i] = (prefix[i] << (width - known - shift)) | digit
        known = width - shift
    # -1: every entry equal to the k-th largest is kept (or it is 0, and keeping changes
    # nothing); 0: not yet known.
    limits = [-1 if r == t or p == 0 else 0 for p, r, t in zip(prefix, rank, tied, strict=True)]
    if any(lim == 0 for lim in limits):
        # Some of the entries equal to the k-th largest are kept, the lowest indices first:
        # count them piece by piece and find the rank-th in the piece where it lies.
        def equal(piece: Piece) -> list[int]:
            return [int((flat == prefix[i]).sum()) if limits[i] == 0 else 0
                    for i, flat in enumerate(piece[1]())]

        counts = map_(equal, pieces)
        for i, lim in enumerate(limits):
            if lim:
                continue
            seen = 0
            for (start, read), c in zip(pieces, counts, strict=True):
                if seen + c[i] >= rank[i]:
                    at = torch.nonzero(read()[i] == prefix[i]).flatten()[rank[i] - seen - 1]
                    limits[i] = start + int(at) + 1
                    break
                seen += c[i]
    return [Cut(p, n if lim < 0 else lim) for p, lim in zip(prefix, limits, strict=True)]


def task_vector_blocks(ts: list[torch.Tensor], dtype: torch.dtype, empty: Empty | None = None
                       ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(flat start, θ₀ block, stacked τ_i = θ_i − θ₀ blocks [T, b]) over consecutive flat
    blocks of a base ``ts[0]`` and models ``ts[1:]`` in any float dtype, computed in ``dtype``
    into buffers from ``empty`` (reused: each block is valid until the next is yielded)."""
    theta0, thetas = ts[0].reshape(-1), [t.reshape(-1) for t in ts[1:]]
    n = theta0.numel()
    empty = empty or _empty(theta0.device)
    size = min(BLOCK, n)
    scratch = empty((len(thetas), size), dtype)
    base_buf = empty((size,), dtype)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        base_block = base_buf[:stop - start].copy_(theta0[start:stop])
        taus = scratch[:, :stop - start]
        for i, theta in enumerate(thetas):
            # Convert, then subtract in place: twice as fast as one mixed-dtype subtraction.
            taus[i].copy_(theta[start:stop]).sub_(base_block)
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
    mag = magnitude_bits(tau).reshape(-1)
    (cut,) = find_cuts([(s, lambda s=s: [mag[s:s + BLOCK]]) for s in range(0, n, BLOCK)], k, n,
                       8 * tau.element_size())
    out = tau.clone().reshape(-1)
    cut.apply(out, 0, torch.empty_like(out))
    return out.reshape(tau.shape)


def elect(contributions: torch.Tensor, consensus: Consensus) -> torch.Tensor:
    """The elected sign per entry, ±1, from stacked weighted task vectors [T, ...]:
    sign of their sum (``sum``) or of their sign count (``count``); +1 where that is 0."""
    score = contributions.sum(0) if consensus == "sum" else contributions.sign().sum(0)
    return torch.where(score >= 0, 1.0, -1.0).to(contributions.dtype)


def disjoint_merge(taus: torch.Tensor, weights: torch.Tensor, consensus: Consensus,
                   normalize: bool, work: torch.Tensor | None = None) -> torch.Tensor:
    """TIES steps 2 and 3 on stacked (already trimmed or dropped) task vectors [T, ...].

    m_i = [sign(τ_i) = s], merged = Σ w_i m_i τ_i / Σ w_i m_i (0 where no input agrees), or the
    numerator alone with ``normalize=False``. With weights of 1 and ``sum`` consensus (the
    usual case) ``taus`` is overwritten and the result is written in ``work``, a buffer of
    at least [3, b] for the b entries of each τ_i.
    """
    if consensus == "sum" and bool((weights == 1).all()):
        flat = taus.reshape(len(taus), -1)
        if work is None:
            work = torch.empty((3, flat.shape[1]), dtype=taus.dtype, device=taus.device)
        merged = _disjoint_sum(flat, normalize, work[:, :flat.shape[1]])
        return merged.reshape(taus.shape[1:])
    w = weights.reshape(-1, *([1] * (taus.dim() - 1)))
    weighted = taus * w
    s = elect(weighted, consensus)
    agree = (taus.sign() == s).to(taus.dtype)
    merged = (weighted * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        merged /= torch.where(divisor == 0, 1.0, divisor)
    return merged


def _disjoint_sum(taus: torch.Tensor, normalize: bool, work: torch.Tensor) -> torch.Tensor:
    """:func:`disjoint_merge` for weights of 1 and ``sum`` consensus, in place on ``taus``
    [T, b] (``work``: [3, b]): s = sign(Σ τ_i) (+1 for 0), |τ_i| of the agreeing entries are
    max(s·τ_i, 0), and the merged entry is s times their sum (divided by their count with
    ``normalize``)."""
    s, merged, count = work
    torch.sum(taus, 0, out=s)
    s.sign_().add_(0.5).sign_()  # -1, 0, +1 -> -1, +1, +1
    taus.mul_(s).clamp_(min=0)
    torch.sum(taus, 0, out=merged)
    if normalize:
        torch.sum(taus.sign_(), 0, out=count)
        merged.div_(count.clamp_(min=1))
    return merged.mul_(s)


def _stack_weights(schedules: list[Schedule], name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([s(name) for s in schedules], dtype=like.dtype, device=like.device)


def _prepare(op: str, base: Weights, models: Sequence[Weights], density: ModelScheduled,
             weights: Sequence[Scheduled] | None, lambda_: Scheduled,
             layer_pattern: str | None) -> tuple[list[Schedule], list[Schedule], Schedule]:
    """Per-model density and weight schedules and the shared lambda."""
    if not models:
        raise UsageError(f"{op}: needs at least one fine-tuned model")
    depth = Depth.of(base.node, layer_pattern)
    dens = per_model_schedules(f"{op}: density", density, model_labels(models), base.node,
                               depth, check=in_unit_interval)
    ws = per_model_weights(op, weights, len(models), base.node, depth)
    lam = Schedule(f"{op}: lambda", lambda_, base.node, depth)
    return dens, ws, lam


def model_labels(models: Sequence[Weights]) -> list[str]:
    return [weights_label(m) for m in models]


def _params(density: list[Schedule], ws: list[Schedule], lam: Schedule, **extra: object
            ) -> dict:
    return {"density": describe_per_model(density), "weights": [w.describe() for w in ws],
            "lambda": lam.describe(), **extra}


def ties(base: Weights, models: Sequence[Weights], density: ModelScheduled,
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
    each weight and ``lambda_`` may be schedules (see :mod:`surgery.methods.schedule`), and
    ``density`` may differ between models (a :class:`~surgery.methods.schedule.PerModel`:
    model i keeps its own k_i = ⌊density_i·n⌋), as mergekit's per-model ``density``.
    """
    dens, ws, lam = _prepare("ties", base, models, density, weights, lambda_, layer_pattern)

    nodes = [base.node, *(m.node for m in models)]

    def n_of(name: str) -> int:
        return math.prod(nodes[0].spec(name).shape)

    def cuts(name: str, ctx: EvalContext) -> list[Cut]:
        # The whole-tensor statistic: each task vector's cut, from pieces of the inputs.
        n = n_of(name)
        ks = [int(d(name) * n) for d in dens]
        if all(k >= n for k in ks):
            return []
        width = 8 * ctx.compute_dtype.itemsize
        if not any(0 < k < n for k in ks):  # nothing to select: no piece is read
            return find_cuts([], ks, n, width)
        return find_cuts(magnitude_pieces(ctx, nodes, name), ks, n, width, ctx.map)

    def cut_bytes(name: str) -> int:
        # The sampled pieces, kept as float32, and what the scan collects: an int32 index
        # and value for at most NEAR_LIMIT of each task vector's entries, and their values
        # once more, concatenated.
        return len(models) * (SAMPLE_PIECES * PIECE_ELEMENTS * 4
                              + int(NEAR_LIMIT * n_of(name)) * 12)

    def fn(name: str, ts: list[torch.Tensor], ctx: EvalContext, cuts: list[Cut]
           ) -> torch.Tensor:
        # Inputs come as stored (bf16 typically) and are converted block by block.
        dtype = ctx.compute_dtype
        w = torch.tensor([s(name) for s in ws], dtype=dtype, device=ts[0].device)
        scale = lam(name)
        first = ctx.rows[0] * (ts[0].numel() // max(ctx.rows[1], 1)) if ctx.rows else 0
        out = ctx.empty((ts[0].numel(),), dtype)
        work = ctx.empty((3, min(BLOCK, ts[0].numel())), dtype)
        for start, base_block, taus in task_vector_blocks(ts, dtype, ctx.empty):
            for i, cut in enumerate(cuts):
                cut.apply(taus[i], first + start, work[0])
            merged = disjoint_merge(taus, w, consensus, normalize, work)
            if scale != 1:
                merged.mul_(scale)
            torch.add(base_block, merged, out=out[start:start + taus.shape[1]])
        return out.reshape(ts[0].shape)

    return Weights(ElementwiseNode(
        [base.node, *(m.node for m in models)], fn, "ties",
        _params(dens, ws, lam, consensus=consensus, normalize=normalize), TIES_REF,
        rowwise=True, convert=False, statistic=cuts, statistic_bytes=cut_bytes))


# DARE's drops are a hash of each entry's position, not draws from a generator's sequence:
# counter-based like Philox, so any block of a tensor can be computed alone, on any thread, and
# the CPU and a GPU drop the same entries. Entry j of model i's task vector in tensor ``name``
# is kept iff the top 31 bits of h(j mod 2³², key) fall below density·2³¹, where h is Chris
# Wellons's lowbias32 integer hash (without its last xorshift, which leaves the top bits as they
# are) of the low half of j xor a 32-bit key from SHA-256 of (seed, model, name, j div 2³²).
_MIX1 = 0x7FEB352D
_MIX2 = 0x846CA68B - (1 << 32)  # as a signed 32-bit number
_RAMPS: dict[torch.device, torch.Tensor] = {}


def dare_key(seed: int, name: str, model: int, high: int = 0) -> int:
    """The 32-bit key (as a signed number) of model ``model``'s drops in tensor ``name``, for
    the flat indices j with j div 2³² = ``high``."""
    digest = hashlib.sha256(f"{seed}\0dare:{model}\0{name}\0{high}".encode()).digest()
    return int.from_bytes(digest[:4], "little", signed=True)


def keep_threshold(density: float) -> int:
    """Entries whose 31-bit hash is below this are kept: the kept fraction is this / 2³¹,
    ``density`` to within 5e-10."""
    return round(density * (1 << 31))


def _ramp(n: int, device: torch.device) -> torch.Tensor:
    ramp = _RAMPS.get(device)
    if ramp is None or len(ramp) < n:
        ramp = torch.arange(max(n, BLOCK), dtype=torch.int32, device=device)
        _RAMPS[device] = ramp
    return ramp[:n]


# The hash's first step folds into the key over an aligned span of 2¹⁶ positions, whose high
# 16 bits are the same throughout (see drop_entries); the rest of it runs over up to
# HASH_STEP entries at a time (several whole spans), in two int32 buffers (1 MB).
HASH_SPAN = 1 << 16
HASH_STEP = 1 << 17


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def drop_entries(tau: torch.Tensor, start: int, density: float, key: Callable[[int], int],
                 scratch: torch.Tensor | None = None) -> None:
    """Zero in place the entries of ``tau`` (a flat block at flat index ``start`` of one
    task vector) that DARE drops, ``key(high)`` giving the keys (see :func:`dare_key`).
    ``scratch``: two int32 buffers [2, ≥ min(n, HASH_STEP)].

    Within a span of positions j whose high 16 bits agree, the hash's first step
    x ^= x >>> 16 (x = j ^ key) xors the same constant into every entry, so it folds into the
    key: the step costs one xor of the position ramp per span (two off a span's start), and
    the other steps run over several spans at once."""
    n = tau.numel()
    if scratch is None:
        scratch = torch.empty((2, min(n, HASH_STEP)), dtype=torch.int32, device=tau.device)
    ints = _INT_VIEW[tau.element_size()]
    flat = tau.reshape(-1)
    limit = keep_threshold(density)
    keys: dict[int, int] = {}
    done = 0
    while done < n:
        # Whole spans from a span's start, as many as fit; else up to the next span's start.
        offset = (start + done) % HASH_SPAN
        if offset or n - done < HASH_SPAN or scratch.shape[1] < HASH_SPAN:
            m = min(n - done, HASH_SPAN - offset, scratch.shape[1])
        else:
            m = min((n - done) // HASH_SPAN, scratch.shape[1] // HASH_SPAN) * HASH_SPAN
        x, t = scratch[0, :m], scratch[1, :m]
        for at in range(0, m, HASH_SPAN):  # a span never crosses a multiple of 2³²
            high, low = divmod(start + done + at, 1 << 32)
            k = keys.get(high)
            if k is None:
                k = keys[high] = key(high) & 0xFFFFFFFF
            # j = (low − offset) | (offset + i); x ^ (x >>> 16) = j ^ key ^ (its high 16 bits)
            folded = _signed32((low - offset) ^ k ^ (((low >> 16) ^ (k >> 16)) & 0xFFFF))
            span = x[at:at + HASH_SPAN]
            if offset:
                torch.add(_ramp(len(span), tau.device), offset, out=span).bitwise_xor_(folded)
            else:
                torch.bitwise_xor(_ramp(len(span), tau.device), folded, out=span)
        (_keep_mask_numpy if x.device.type == "cpu" else _keep_mask)(x, t, limit)
        block = flat[done:done + m].view(ints)
        block.bitwise_and_(x if ints == torch.int32 else x.to(ints))
        done += m


def _keep_mask(x: torch.Tensor, t: torch.Tensor, limit: int) -> None:
    """The rest of the hash of the int32 ``x`` and the keep mask from it, in place: -1 where
    the top 31 bits fall below ``limit``, else 0 (``t``: scratch like ``x``)."""
    # x *= M1; x ^= x >>> 15 (>>> : logical shift, an arithmetic one masked); x *= M2
    x.mul_(_MIX1)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=t).bitwise_and_(0x1FFFF))
    x.mul_(_MIX2)
    # (x >>> 1) − limit is negative exactly for the kept entries: its sign, spread by an
    # arithmetic shift, is the mask that keeps them.
    x.bitwise_right_shift_(1).bitwise_and_(0x7FFFFFFF).sub_(limit).bitwise_right_shift_(31)


def _keep_mask_numpy(x: torch.Tensor, t: torch.Tensor, limit: int) -> None:
    """:func:`_keep_mask` on the CPU, in numpy: its unsigned 32-bit integers shift logically,
    which saves the two masks torch's arithmetic shifts need, and its calls cost less."""
    xu, tu = x.numpy().view(np.uint32), t.numpy().view(np.uint32)
    np.multiply(xu, _MIX1, out=xu)
    np.bitwise_xor(xu, np.right_shift(xu, 15, out=tu), out=xu)
    np.multiply(xu, _MIX2 & 0xFFFFFFFF, out=xu)
    xi = np.right_shift(xu, 1, out=xu).view(np.int32)
    np.right_shift(np.subtract(xi, limit, out=xi), 31, out=xi)


def drop_and_rescale(tau: torch.Tensor, density: float, rescale: Rescale,
                     key: Callable[[int], int]) -> torch.Tensor:
    """DARE on one whole task vector: keep each entry with probability ``density`` (drop
    with p = 1 − density; which, from ``key`` as :func:`drop_entries`), then rescale survivors
    by 1/density (``inverse_density``) or so that ‖τ‖₁ is unchanged (``l1``, as mergekit; no
    rescale when either norm is below 1e-7)."""
    if density >= 1.0:
        return tau
    dropped = tau.clone()
    drop_entries(dropped, 0, density, key)
    if rescale == "inverse_density":
        return dropped / density
    before, after = tau.abs().sum(), dropped.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return dropped
    return dropped * (before / after)


def _dare(op: str, base: Weights, models: Sequence[Weights], density: ModelScheduled,
          weights: Sequence[Scheduled] | None, lambda_: Scheduled, rescale: Rescale,
          consensus: Consensus | None, normalize: bool, layer_pattern: str | None) -> Weights:
    dens, ws, lam = _prepare(op, base, models, density, weights, lambda_, layer_pattern)

    def combine(taus: torch.Tensor, w: torch.Tensor, work: torch.Tensor | None = None
                ) -> torch.Tensor:
        if consensus is not None:
            return disjoint_merge(taus, w, consensus, normalize, work)
        flat = taus.reshape(len(taus), -1)
        out = work[0, :flat.shape[1]] if work is not None else None
        merged = torch.sum(flat.mul_(w.reshape(-1, 1)), 0, out=out).reshape(taus.shape[1:])
        if normalize:
            total = w.sum()
            merged /= total if total.abs() >= 1e-8 else 1.0
        return merged

    def keys(ctx: EvalContext, name: str) -> list[Callable[[int], int]]:
        return [lambda high, i=i: dare_key(ctx.seed, name, i, high)
                for i in range(len(models))]

    def whole(name: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        # The l1 rescale needs the norms of whole task vectors.
        theta0 = ts[0]
        taus = torch.stack([drop_and_rescale(t - theta0, d(name), rescale, key)
                            for t, d, key in zip(ts[1:], dens, keys(ctx, name), strict=True)])
        return theta0 + combine(taus, _stack_weights(ws, name, theta0)) * lam(name)

    def blockwise(name: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        # Inverse-density rescale is entry by entry: blocks of the stored inputs, converted
        # block by block, each entry dropped by the hash of its position. Every combination
        # is homogeneous in the τ_i, so a 1/density rescale shared by all models is applied
        # once, to the result; densities that differ rescale each τ_i before the combination.
        dtype = ctx.compute_dtype
        ds = [d(name) for d in dens]
        shared = ds[0] if all(d == ds[0] for d in ds) else None
        w = torch.tensor([s(name) for s in ws], dtype=dtype, device=ts[0].device)
        scale = lam(name)
        n = ts[0].numel()
        first = ctx.rows[0] * (n // max(ctx.rows[1], 1)) if ctx.rows else 0
        model_keys = keys(ctx, name)
        out = ctx.empty((n,), dtype)
        work = ctx.empty((3, min(BLOCK, n)), dtype)
        bits = ctx.empty((2, min(HASH_STEP, n)), torch.int32)
        for start, base_block, taus in task_vector_blocks(ts, dtype, ctx.empty):
            for tau, d, key in zip(taus, ds, model_keys, strict=True):
                if d < 1.0:
                    drop_entries(tau, first + start, d, key, bits)
                    if shared is None:
                        tau.div_(d)
            merged = combine(taus, w, work)
            if shared is not None and shared < 1.0:
                merged.div_(shared)
            if scale != 1:
                merged.mul_(scale)
            torch.add(base_block, merged, out=out[start:start + taus.shape[1]])
        return out.reshape(ts[0].shape)

    extra: dict[str, object] = {"rescale": rescale, "normalize": normalize}
    if consensus is not None:
        extra["consensus"] = consensus
    by_entry = rescale == "inverse_density"
    return Weights(ElementwiseNode([base.node, *(m.node for m in models)],
                                   blockwise if by_entry else whole, op,
                                   _params(dens, ws, lam, **extra), DARE_REF,
                                   rowwise=by_entry, convert=not by_entry))


def dare_linear(base: Weights, models: Sequence[Weights], density: ModelScheduled,
                weights: Sequence[Scheduled] | None = None, lambda_: Scheduled = 1.0,
                rescale: Rescale = "inverse_density", normalize: bool = False,
                layer_pattern: str | None = None) -> Weights:
    """DARE with task-arithmetic combination (arXiv 2311.03099):

    τ̃_i = drop_and_rescale(θ_i − θ₀), each entry dropped with p = 1 − density and survivors
    scaled by 1/(1 − p); θ = θ₀ + λ Σ w_i τ̃_i (divided by Σ w_i with ``normalize=True``).
    Which entries are dropped is a hash of (recipe seed, model index, tensor name, entry
    position): see :func:`drop_entries`. ``density`` may differ between models (a
    :class:`~surgery.methods.schedule.PerModel`), as mergekit's per-model ``density``.
    """
    return _dare("dare_linear", base, models, density, weights, lambda_, rescale, None,
                 normalize, layer_pattern)


def dare_ties(base: Weights, models: Sequence[Weights], density: ModelScheduled,
              weights: Sequence[Scheduled] | None = None, lambda_: Scheduled = 1.0,
              rescale: Rescale = "inverse_density", consensus: Consensus = "sum",
              normalize: bool = False, layer_pattern: str | None = None) -> Weights:
    """DARE with TIES sign election (arXiv 2311.03099, 2306.01708): the dropped and rescaled
    τ̃_i go through TIES's election and disjoint merge (no magnitude trim). The default is the
    weighted sum of agreeing entries (``normalize=False``, as mergekit's ``dare_ties``), since
    the rescale already keeps each τ̃_i unbiased. ``density`` may be per model, as for
    :func:`dare_linear`.
    """
    return _dare("dare_ties", base, models, density, weights, lambda_, rescale, consensus,
                 normalize, layer_pattern)


class _TaskVectorMergeParams(Params):
    base: str
    models: list[str] = Field(min_length=1)
    density: ModelScheduled = Field(description="fraction of each task vector kept, in (0, 1]")
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
