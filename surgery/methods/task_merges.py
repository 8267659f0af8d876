"""Task-vector merges with a sparsification step other than TIES's trim or DARE's drops:
Model Breadcrumbs (drop the smallest and the largest updates) and DELLA (magnitude-ranked
random drops), each with a linear or a TIES-style combination, as mergekit 0.1.5 has them."""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Weights
from surgery.expr.node import PIECE_ELEMENTS
from surgery.methods.schedule import (
    Depth,
    ModelScheduled,
    Scheduled,
    describe_per_model,
    in_closed_unit_interval,
    per_model_schedules,
)
from surgery.methods.soup import Params
from surgery.methods.ties_dare import (
    _INT_VIEW,
    _MIX1,
    _MIX2,
    BLOCK,
    NEAR_LIMIT,
    SAMPLE_PIECES,
    Cut,
    _params,
    _prepare,
    _TaskVectorMergeParams,
    find_cuts,
    magnitude_pieces,
    model_labels,
)

BREADCRUMBS_REF = "Model Breadcrumbs, arXiv 2312.06795"
DELLA_REF = "DELLA-Merging (MagPrune), arXiv 2406.11617"

DellaRescale = Literal["l1", "inverse_probability", "none"]
DellaRng = Literal["hash", "torch"]
TieBreak = Literal["index", "torch_sort"]


def combine_task_vectors(base: torch.Tensor, deltas: torch.Tensor, weights: Sequence[float],
                         ties: bool, normalize: bool, lambda_: float) -> torch.Tensor:
    """θ₀ + λ·merged from the stacked sparsified task vectors ``deltas`` [T, ...] (overwritten),
    in mergekit's generalized task arithmetic, step for step (so results agree bit for bit):
    d_i = w_i·τ̃_i; linear: merged = Σ d_i (over Σ w_i with ``normalize``, a divisor below
    1e-8 counting as 1); ``ties``: s = sign(Σ d_i) (+1 at 0), m_i = [sign(d_i) = s],
    merged = Σ m_i d_i (over Σ m_i w_i with ``normalize``, 0 counting as 1)."""
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    while w.dim() < deltas.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if ties:
        sign = deltas.sign()
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        agree = sign == majority
        merged = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        merged /= divisor
    if lambda_ != 1:
        merged *= lambda_
    return base + merged


def l1_rescaled(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept`` (τ with entries dropped) scaled so that ‖kept‖₁ = ‖τ‖₁, as mergekit's l1
    rescale; unchanged when either norm is below 1e-7."""
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def _keep_top(tau: torch.Tensor, k: int) -> torch.Tensor:
    """τ with only its k entries of largest magnitude (ties at the cut: lower flat index
    first), the rest zero; k-th value selection, no sort (see ``ties_dare.find_cuts``)."""
    n = tau.numel()
    if k >= n:
        return tau.clone()
    if k <= 0:
        return torch.zeros_like(tau)
    mag = tau.abs().reshape(-1).view(_INT_VIEW[tau.element_size()])
    (cut,) = find_cuts([(s, lambda s=s: [mag[s:s + BLOCK]]) for s in range(0, n, BLOCK)], k, n,
                       8 * tau.element_size())
    out = tau.clone().reshape(-1)
    cut.apply(out, 0, torch.empty_like(out))
    return out.reshape(tau.shape)


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float,
                     tie_break: TieBreak = "index") -> torch.Tensor:
    """Model Breadcrumbs' sparsification of one task vector (arXiv 2312.06795), with
    mergekit's counts: of n entries, k = ⌊density·n⌋ are kept, the ⌊gamma·n⌋ of largest |τ|
    (fewer when k + ⌊gamma·n⌋ > n) and the rest of the smallest are zeroed. So the kept
    entries are those of ranks ⌊gamma·n⌋ + 1 .. ⌊gamma·n⌋ + k by magnitude from the top.
    ``density`` ≥ 1 returns τ unchanged (as mergekit: no outlier removal either).

    ``tie_break="index"`` (default): computed as keep_top(n_top + k) − keep_top(n_top), both
    by k-th value selection in linear time; of equal magnitudes at a cut the lower flat indices
    rank higher. ``"torch_sort"``: mergekit's way, ranks from ``torch.sort`` of the float32
    magnitudes, whose order of equal values is unspecified (not stable); it agrees with
    mergekit bit for bit on the same torch build, also where equal magnitudes straddle a cut
    (common for task vectors of bf16 checkpoints), and costs a sort of the tensor."""
    if density >= 1:
        return tau
    n = tau.numel()
    k = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - k - n_top)
    removed_top = n - n_bot - k
    if tie_break == "torch_sort":
        order = torch.sort(tau.abs().reshape(-1).float(), descending=False).indices
        mask = torch.zeros(n, dtype=tau.dtype, device=tau.device)
        mask[order[n_bot:n_bot + k]] = 1
        return tau * mask.reshape(tau.shape)
    kept = _keep_top(tau, n - n_bot)
    if removed_top > 0:
        kept -= _keep_top(tau, removed_top)  # a subset of kept: the difference is exact
    return kept


def _breadcrumbs(op: str, base: Weights, models: Sequence[Weights], density: ModelScheduled,
                 gamma: ModelScheduled, weights: Sequence[Scheduled] | None, lambda_: Scheduled,
                 ties: bool, normalize: bool, rescale: bool, tie_break: TieBreak,
                 layer_pattern: str | None) -> Weights:
    dens, ws, lam = _prepare(op, base, models, density, weights, lambda_, layer_pattern)
    gam = per_model_schedules(f"{op}: gamma", gamma, model_labels(models), base.node,
                              Depth.of(base.node, layer_pattern), check=in_closed_unit_interval)

    def fn(name: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        theta0 = ts[0]
        deltas = theta0.new_empty((len(ts) - 1, *theta0.shape))
        for i, t in enumerate(ts[1:]):
            tau = t - theta0
            d = dens[i](name)
            kept = breadcrumbs_mask(tau, d, gam[i](name), tie_break)
            deltas[i] = l1_rescaled(tau, kept) if rescale and d < 1 else kept
        return combine_task_vectors(theta0, deltas, [w(name) for w in ws], ties, normalize,
                                    lam(name))

    nodes = [base.node, *(m.node for m in models)]
    params = _params(dens, ws, lam, gamma=describe_per_model(gam), normalize=normalize,
                     rescale=rescale, tie_break=tie_break)
    if rescale or tie_break != "index":
        # The L1 rescale needs whole task vectors, and mergekit's order a whole sort.
        return Weights(ElementwiseNode(nodes, fn, op, params, BREADCRUMBS_REF))

    def counts(name: str) -> list[tuple[int, int] | None]:
        """Per model: (how many entries of largest magnitude to take, how many of those to
        drop), None to keep the task vector whole."""
        n = math.prod(nodes[0].spec(name).shape)
        out: list[tuple[int, int] | None] = []
        for dm, gm in zip(dens, gam, strict=True):
            d, g = dm(name), gm(name)
            if d >= 1:
                out.append(None)
                continue
            k, n_top = int(d * n), int(g * n)
            n_bot = max(0, n - k - n_top)
            out.append((n - n_bot, n - n_bot - k))
        return out

    def cuts(name: str, ctx: EvalContext) -> list[list[Cut]] | None:
        # Both cuts of each task vector (the top-k cuts of all models, then the cuts of
        # the largest dropped), from pieces of the inputs (see ties_dare.ties).
        kept = counts(name)
        if all(c is None for c in kept):
            return None
        n = math.prod(nodes[0].spec(name).shape)
        ks = [[n, 0] if c is None else list(c) for c in kept]
        width = 8 * ctx.compute_dtype.itemsize
        pieces: list = []
        if any(0 < k < n for pair in ks for k in pair):  # else nothing to select: no reads
            # Both cuts of every task vector from one read of each piece: the vectors are
            # listed twice, once per cut.
            pieces = [(start, lambda read=read: 2 * read())
                      for start, read in magnitude_pieces(ctx, nodes, name)]
        found = find_cuts(pieces, [pair[0] for pair in ks] + [pair[1] for pair in ks], n,
                          width, ctx.map)
        return [found[:len(ks)], found[len(ks):]]

    def blockwise(name: str, ts: list[torch.Tensor], ctx: EvalContext,
                  stat: list[list[Cut]] | None) -> torch.Tensor:
        theta0 = ts[0]
        deltas = theta0.new_empty((len(ts) - 1, *theta0.shape))
        kept = counts(name)
        first = ctx.rows[0] * (theta0.numel() // max(ctx.rows[1], 1)) if ctx.rows else 0
        scratch = theta0.new_empty((2, theta0.numel()))
        for i, t in enumerate(ts[1:]):
            top = torch.sub(t, theta0, out=deltas[i]).reshape(-1)  # τ, trimmed in place
            if kept[i] is None or stat is None:
                continue
            dropped = scratch[1].copy_(top) if kept[i][1] > 0 else None
            stat[0][i].apply(top, first, scratch[0])
            if dropped is not None:
                stat[1][i].apply(dropped, first, scratch[0])
                top -= dropped  # dropped ⊂ top: the difference is exact
        return combine_task_vectors(theta0, deltas, [w(name) for w in ws], ties, normalize,
                                    lam(name))

    def cut_bytes(name: str) -> int:
        n = math.prod(nodes[0].spec(name).shape)
        return 2 * len(models) * (SAMPLE_PIECES * PIECE_ELEMENTS * 4 + int(NEAR_LIMIT * n) * 12)

    return Weights(ElementwiseNode(nodes, blockwise, op, params, BREADCRUMBS_REF, rowwise=True,
                                   statistic=cuts, statistic_bytes=cut_bytes))


def breadcrumbs(base: Weights, models: Sequence[Weights], density: ModelScheduled,
                gamma: ModelScheduled = 0.01, weights: Sequence[Scheduled] | None = None,
                lambda_: Scheduled = 1.0, normalize: bool = False, rescale: bool = False,
                tie_break: TieBreak = "index", layer_pattern: str | None = None) -> Weights:
    """Model Breadcrumbs (arXiv 2312.06795), mergekit's ``breadcrumbs``:

    τ_i = θ_i − θ₀; τ̃_i keeps the entries of τ_i ranked ⌊γn⌋ + 1 .. ⌊γn⌋ + ⌊density·n⌋ by
    magnitude from the top (the largest γ share are outliers, the smallest the noise; see
    :func:`breadcrumbs_mask`); θ = θ₀ + λ Σ w_i τ̃_i (over Σ w_i with ``normalize``).
    ``rescale`` scales each τ̃_i back to ‖τ_i‖₁; ``tie_break`` orders equal magnitudes at a
    cut (see :func:`breadcrumbs_mask`: ``torch_sort`` is mergekit's order, bit for bit).
    Defaults γ = 0.01, λ = 1, as mergekit (whose ``gamma`` is the share dropped at the top;
    the share dropped at the bottom is what ``density`` and γ leave). ``density`` and
    ``gamma`` may differ between models (:class:`~surgery.methods.schedule.PerModel`), as
    mergekit's per-model parameters.
    """
    return _breadcrumbs("breadcrumbs", base, models, density, gamma, weights, lambda_, False,
                        normalize, rescale, tie_break, layer_pattern)


def breadcrumbs_ties(base: Weights, models: Sequence[Weights], density: ModelScheduled,
                     gamma: ModelScheduled = 0.01, weights: Sequence[Scheduled] | None = None,
                     lambda_: Scheduled = 1.0, normalize: bool = False, rescale: bool = False,
                     tie_break: TieBreak = "index", layer_pattern: str | None = None
                     ) -> Weights:
    """Model Breadcrumbs' sparsification with TIES's sign election (arXiv 2312.06795,
    2306.01708), mergekit's ``breadcrumbs_ties``: the τ̃_i of :func:`breadcrumbs`, weighted,
    d_i = w_i τ̃_i; s = sign(Σ d_i) (+1 at 0); θ = θ₀ + λ Σ [sign(d_i) = s] d_i (over the
    agreeing Σ w_i with ``normalize``; mergekit's default is no normalisation). ``density``
    and ``gamma`` may be per model, as for :func:`breadcrumbs`."""
    return _breadcrumbs("breadcrumbs_ties", base, models, density, gamma, weights, lambda_,
                        True, normalize, rescale, tie_break, layer_pattern)


# DELLA's counter-based draws: entry j of model i in tensor ``name`` is kept iff the top 31
# bits of the lowbias32-style hash of DARE (ties_dare.drop_entries) of j xor a key from
# SHA-256 of (seed, "della", model, name, j div 2³²) fall below p_j·2³¹.
def della_key(seed: int, name: str, model: int, high: int = 0) -> int:
    """The unsigned 32-bit key of model ``model``'s draws in tensor ``name``."""
    digest = hashlib.sha256(f"{seed}\0della:{model}\0{name}\0{high}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def della_torch_seed(seed: int, name: str) -> int:
    """The seed of the ``torch.Generator`` that draws tensor ``name``'s masks with
    ``rng="torch"`` (all models, in order, from one generator)."""
    digest = hashlib.sha256(f"{seed}\0della-torch\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def uniform31(n: int, key: Callable[[int], int], start: int = 0) -> np.ndarray:
    """31-bit hash values of flat positions start..start+n−1 (``key(high)``: the key for
    positions with j div 2³² = high), as int32: x = (j mod 2³²) ^ key; x ^= x >>> 16;
    x *= 0x7FEB352D; x ^= x >>> 15; x *= 0x846CA68B; value = x >>> 1."""
    out = np.empty(n, dtype=np.uint32)
    done = 0
    while done < n:
        high, low = divmod(start + done, 1 << 32)
        m = min(n - done, (1 << 32) - low)
        x = out[done:done + m]
        x[:] = np.arange(low, low + m, dtype=np.uint64 if low + m > 1 << 31 else np.uint32)
        _mix31(x, key(high))
        done += m
    return out.view(np.int32)


def _mix31(x: np.ndarray, key: int) -> None:
    """:func:`uniform31`'s hash, in place, of the positions mod 2³² in ``x`` (uint32)."""
    x ^= np.uint32(key)
    x ^= x >> np.uint32(16)
    x *= np.uint32(_MIX1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(_MIX2 & 0xFFFFFFFF)
    x >>= np.uint32(1)


@functools.lru_cache(maxsize=256)
def _rank_limits(length: int, density: float, epsilon: float) -> np.ndarray:
    """⌊p·2³¹⌋ of ranks 1..length: the limits :func:`hash_draw` sets for the p of
    :func:`della_probabilities` (through the same two functions, so the same values)."""
    ranks = torch.arange(1, length + 1, dtype=torch.float32).reshape(1, -1)
    return _limits31(_rank_probabilities(ranks, length, density, epsilon)).numpy()


def _rank_probabilities(ranks: torch.Tensor, length: int, density: float, epsilon: float
                        ) -> torch.Tensor:
    """MagPrune's p of float32 ranks 1..``length`` within a row (see
    :func:`della_probabilities`)."""
    rank_norm = ((ranks - 1) / (length - 1)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def _limits31(p: torch.Tensor) -> torch.Tensor:
    """⌊p·2³¹⌋ of keep probabilities p (exact in float32), flat, as int32 on the CPU: an
    entry is kept when its 31-bit hash value is below it."""
    return (p.reshape(-1) * float(1 << 31)).to(torch.int32).cpu()


def della_keep(tau: torch.Tensor, density: float, epsilon: float, seed: int, name: str,
               model: int, start: int, out: torch.Tensor) -> None:
    """``hash_draw(seed, name, model)(della_probabilities(tau, density, epsilon, "index"),
    start) != 0`` into ``out`` (a CPU bool tensor of ``tau``'s size), computed in each row's
    sorted order: the entry of rank r has the limit ⌊p_r·2³¹⌋ of its rank (one vector per row
    length) and is hashed at its position, and the verdicts are scattered back once, instead
    of scattering ranks and computing p, its limit and the hash over the tensor's layout. A
    CPU tensor of at least two columns whose positions share j div 2³²; else the two
    functions themselves."""
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    count, length = rows.shape
    n = rows.numel()
    if rows.device.type != "cpu" or length < 2 or n == 0 or start >> 32 != (start + n - 1) >> 32:
        p = della_probabilities(tau, density, epsilon, "index")
        out.reshape(-1).copy_(hash_draw(seed, name, model)(p, start).reshape(-1) != 0)
        return
    keys = _sorted_keys(rows)
    low = 0 if sys.byteorder == "little" else 1
    # positions within the piece (from the keys' low halves, the columns), then mod 2³² (no
    # carry: they share j div 2³²)
    x = np.arange(count, dtype=np.uint32).reshape(-1, 1) * np.uint32(length)
    x = x + keys.view(np.uint32)[:, low::2]
    x += np.uint32(start & 0xFFFFFFFF)
    _mix31(x, della_key(seed, name, model, start >> 32))
    keep = x.view(np.int32) < _rank_limits(length, float(density), float(epsilon))
    keys &= 0xFFFFFFFF
    out.reshape(count, length).scatter_(1, torch.from_numpy(keys), torch.from_numpy(keep))


def hash_draw(seed: int, name: str, model: int
              ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``draw(p, start)``: a 0/1 mask like ``p`` (float32 keep probabilities of the entries
    at flat positions start.. of model ``model``'s task vector in tensor ``name``), 1 where
    the position's :func:`uniform31` value is below ⌊p·2³¹⌋ (p·2³¹ is exact in float32)."""
    def draw(p: torch.Tensor, start: int = 0) -> torch.Tensor:
        u = torch.from_numpy(uniform31(p.numel(), lambda high: della_key(seed, name, model,
                                                                           high), start))
        return torch.lt(u, _limits31(p)).reshape(p.shape).to(device=p.device, dtype=p.dtype)

    return draw


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float,
                        ties: Literal["index", "torch"] = "torch") -> torch.Tensor:
    """MagPrune's keep probabilities, row by row (a 1-D tensor is one row), as mergekit:
    with r the rank of |τ| within its row (1 = smallest) and c the row's length,
    p = (density − ε) + (r − 1)/(c − 1)·2ε, so the smallest entry is kept with p = density − ε,
    the largest with density + ε, the mean density. A row of one entry (c = 1, which mergekit
    cannot draw for) gets p = density. Equal magnitudes: ``ties="torch"`` ranks them as
    ``torch.argsort`` orders them (mergekit; unspecified, its sort is not stable),
    ``"index"`` by position, lower first (the same on any device and build; by one sort of
    (magnitude bits, column) keys). The ranks are the inverse of the sorting permutation,
    scattered (mergekit sorts the permutation again: the same ranks)."""
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    if rows.shape[1] == 1:
        return torch.full_like(rows, density, dtype=torch.float32)
    if ties == "torch":
        order = torch.argsort(rows.abs(), dim=1, descending=False)
    else:
        order = _stable_order(rows)
    steps = torch.arange(1, rows.shape[1] + 1, dtype=torch.float32, device=rows.device)
    ranks = torch.empty(order.shape, dtype=torch.float32, device=rows.device)
    ranks.scatter_(1, order, steps.expand(order.shape))
    return _rank_probabilities(ranks, rows.shape[1], density, epsilon)


def _stable_order(rows: torch.Tensor) -> torch.Tensor:
    """Per row (dimension 1), the permutation sorting |rows| ascending, equal values by
    position: a sort of the unique int64 keys (|x|'s float32 bits) · 2³² + column, whose low
    half is then the column (numpy's vectorised sort on the CPU)."""
    if rows.device.type == "cpu":
        keys = _sorted_keys(rows)
        keys &= 0xFFFFFFFF
        return torch.from_numpy(keys)
    bits = rows.abs().to(torch.float32).view(torch.int32)
    columns = torch.arange(rows.shape[1], dtype=torch.int64, device=rows.device)
    columns = columns.reshape(1, -1, *([1] * (rows.dim() - 2)))
    keys = (bits.to(torch.int64) << 32) | columns
    return torch.sort(keys, dim=1).values & 0xFFFFFFFF


def _sorted_keys(rows: torch.Tensor) -> np.ndarray:
    """:func:`_stable_order`'s keys of a CPU tensor, sorted along dimension 1."""
    keys = rows.abs().to(torch.float32).view(torch.int32).numpy().astype(np.int64)
    keys <<= 32
    keys |= np.arange(rows.shape[1], dtype=np.int64).reshape(1, -1, *([1] * (rows.dim() - 2)))
    keys.sort(axis=1)
    return keys


def della_prune(tau: torch.Tensor, density: float, epsilon: float, rescale: DellaRescale,
                draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One task vector through MagPrune (arXiv 2406.11617): keep each entry with its
    :func:`della_probabilities` p, from ``draw(p)`` (a 0/1 float mask like ``p``), then
    rescale: ``l1`` (mergekit: the survivors scaled to ‖τ‖₁), ``inverse_probability`` (the
    paper: each survivor divided by its p, unbiased per entry) or ``none``. Returns τ's shape;
    ``density`` ≥ 1 returns τ."""
    if density >= 1:
        return tau
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    p = della_probabilities(tau, density, epsilon)
    mask = draw(p).to(torch.float32)
    kept = rows * mask
    if rescale == "l1":
        kept = l1_rescaled(rows, kept)
    elif rescale == "inverse_probability":
        kept = kept / p
    return kept.reshape(tau.shape)


def _della(op: str, base: Weights, models: Sequence[Weights], density: ModelScheduled,
           epsilon: ModelScheduled, weights: Sequence[Scheduled] | None, lambda_: Scheduled,
           ties: bool, normalize: bool, rescale: DellaRescale, rng: DellaRng,
           layer_pattern: str | None) -> Weights:
    dens, ws, lam = _prepare(op, base, models, density, weights, lambda_, layer_pattern)
    labels = model_labels(models)
    eps = per_model_schedules(f"{op}: epsilon", epsilon, labels, base.node,
                              Depth.of(base.node, layer_pattern),
                              check=lambda v: None if v >= 0 else "is negative")
    for name in base.node.names():
        for i, (dm, em) in enumerate(zip(dens, eps, strict=True)):
            d, e = dm(name), em(name)
            if d < 1 and not (0 < d - e and d + e < 1):
                who = f" of models[{i}] ({labels[i]})" if len(models) > 1 else ""
                raise UsageError(f"{op}: density {d!r} and epsilon {e!r}{who} for tensor "
                                 f"{name!r}: density ± epsilon must lie within (0, 1)")
    if rng not in ("hash", "torch"):
        raise UsageError(f"{op}: rng must be 'hash' or 'torch' (got {rng!r})")
    if rescale not in ("l1", "inverse_probability", "none"):
        raise UsageError(f"{op}: rescale must be l1, inverse_probability or none "
                         f"(got {rescale!r})")

    nodes = [base.node, *(m.node for m in models)]
    params = _params(dens, ws, lam, epsilon=describe_per_model(eps), normalize=normalize,
                     rescale=rescale, rng=rng)

    def whole(name: str, ts: list[torch.Tensor], ctx: EvalContext) -> torch.Tensor:
        theta0 = ts[0]
        deltas = theta0.new_empty((len(ts) - 1, *theta0.shape))
        gen = torch.Generator(device=theta0.device)
        gen.manual_seed(della_torch_seed(ctx.seed, name))
        for i, t in enumerate(ts[1:]):
            deltas[i] = della_prune(t - theta0, dens[i](name), eps[i](name), rescale,
                                    lambda p: torch.bernoulli(p, generator=gen))
        return combine_task_vectors(theta0, deltas, [w(name) for w in ws], ties, normalize,
                                    lam(name))

    if rng == "torch":  # one generator's sequence over the whole tensor
        return Weights(ElementwiseNode(nodes, whole, op, params, DELLA_REF))

    def l1_scales(name: str, ctx: EvalContext
                  ) -> tuple[list[torch.Tensor | None], list[torch.Tensor]] | None:
        # Each task vector's mask (kept for the blocks, one byte an entry, so that its ranks
        # and draws are made once) and ‖τ_i‖₁ / ‖τ̃_i‖₁ over the whole tensor, in float64 over
        # pieces of whole rows (a 1-D tensor, one row, gathered whole). A model whose
        # density is 1 here keeps its task vector whole: no mask.
        de = [(dm(name), em(name)) for dm, em in zip(dens, eps, strict=True)]
        drawn = [i for i, (d, _) in enumerate(de) if d < 1]
        if rescale != "l1" or not drawn:
            return None
        shape = nodes[0].spec(name).shape
        n = math.prod(shape)
        row = math.prod(shape[1:]) if len(shape) >= 2 else 0
        masks = [torch.empty(n if i in drawn else 0, dtype=torch.bool)
                 for i in range(len(models))]

        def piece(first: int, values: list[torch.Tensor]) -> list[tuple[float, float]]:
            # Each model's mask over these rows, written into its slice of the tensor's mask
            # (pieces do not overlap, so threads may share them), and ‖τ_i‖₁, ‖τ̃_i‖₁ here.
            theta0 = values[0].to(torch.float32)
            sums = []
            for i in drawn:
                d, e = de[i]
                tau = values[i + 1].to(torch.float32) - theta0
                at = first * row
                kept = masks[i][at:at + tau.numel()]
                della_keep(tau, d, e, ctx.seed, name, i, at, kept)
                size = tau.abs()
                sums.append((size.sum(dtype=torch.float64).item(),
                             (size * kept.reshape(size.shape).to(size.device)
                              ).sum(dtype=torch.float64).item()))
            return sums

        if len(shape) < 2:  # one row: gathered whole
            parts = list(ctx.pieces(nodes, name))
            results = [piece(0, [torch.cat([v[i].reshape(-1) for _, v in parts])
                                 for i in range(len(nodes))])]
        else:  # else pieces of whole rows, shared among the engine's threads
            results = ctx.map(lambda rows: piece(rows[0], ctx.piece(nodes, name, rows,
                                                                    reuse=True)),
                              ctx.piece_rows(nodes, name))
        # ‖·‖₁ over the tensor: the pieces' float64 sums added in row order (any thread count)
        before = torch.zeros(len(models), dtype=torch.float64)
        after = torch.zeros(len(models), dtype=torch.float64)
        for sums in results:
            for i, (b, a) in zip(drawn, sums, strict=True):
                before[i] += b
                after[i] += a
        scales = [None if b < 1e-7 or a < 1e-7 else (b / a).to(torch.float32)
                  for b, a in zip(before, after, strict=True)]
        return scales, masks

    def mask_bytes(name: str) -> int:
        drawn = sum(d(name) < 1 for d in dens)
        return drawn * math.prod(nodes[0].spec(name).shape) if rescale == "l1" else 0

    def blockwise(name: str, ts: list[torch.Tensor], ctx: EvalContext,
                  stat: tuple[list[torch.Tensor | None], list[torch.Tensor]] | None
                  ) -> torch.Tensor:
        theta0 = ts[0]
        first = ctx.rows[0] * (theta0.numel() // max(ctx.rows[1], 1)) if ctx.rows else 0
        deltas = theta0.new_empty((len(ts) - 1, *theta0.shape))
        for i, t in enumerate(ts[1:]):
            tau = t - theta0
            d, e = dens[i](name), eps[i](name)
            if d >= 1:
                deltas[i] = tau
                continue
            if stat is not None:  # l1: the statistic's mask and scale
                scales, masks = stat
                part = masks[i][first:first + tau.numel()].reshape(tau.shape)
                kept = tau * part.to(device=tau.device, dtype=tau.dtype)
                if scales[i] is not None:
                    kept = kept * scales[i].to(kept.device)
            else:
                rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
                p = della_probabilities(tau, d, e, "index")
                kept = rows * hash_draw(ctx.seed, name, i)(p, first)
                if rescale == "inverse_probability":
                    kept = kept / p
            deltas[i] = kept.reshape(tau.shape)
        return combine_task_vectors(theta0, deltas, [w(name) for w in ws], ties, normalize,
                                    lam(name))

    # A 1-D tensor is one row: blocks of it would rank apart, so above the engine's block size
    # (never in today's models) the whole graph is computed tensor by tensor.
    from surgery.engine.stream import ROW_BLOCK_ELEMENTS

    rowwise = all(len(nodes[0].spec(n).shape) != 1
                  or math.prod(nodes[0].spec(n).shape) <= ROW_BLOCK_ELEMENTS
                  for n in nodes[0].names())
    return Weights(ElementwiseNode(nodes, blockwise, op, params, DELLA_REF, rowwise=rowwise,
                                   statistic=l1_scales, statistic_bytes=mask_bytes))


def della(base: Weights, models: Sequence[Weights], density: ModelScheduled,
          epsilon: ModelScheduled = 0.15, weights: Sequence[Scheduled] | None = None,
          lambda_: Scheduled = 1.0, normalize: bool = True, rescale: DellaRescale = "l1",
          rng: DellaRng = "hash", layer_pattern: str | None = None) -> Weights:
    """DELLA (arXiv 2406.11617), mergekit's ``della``: MagPrune, then TIES's election.

    1. drop: each entry of τ_i = θ_i − θ₀ is kept with probability p rising linearly with its
       magnitude's rank in its row, from density − ε to density + ε (mean: density; see
       :func:`della_probabilities`); survivors rescaled (``rescale``: ``l1``, mergekit's and the
       default; ``inverse_probability``, the paper's 1/p; ``none``);
    2. elect and merge: d_i = w_i τ̃_i, s = sign(Σ d_i), θ = θ₀ + λ Σ [sign(d_i) = s] d_i over
       Σ [sign(d_i) = s] w_i (``normalize``, default on as mergekit).

    Draws: ``rng="hash"`` (default) keeps entry j iff a hash of (seed, model, tensor, j) is
    below p_j·2³¹, the same on any device and thread; ``rng="torch"`` draws
    ``torch.bernoulli`` from a generator seeded by :func:`della_torch_seed` (seed, tensor),
    models in order, which is what mergekit draws when torch's global generator is seeded so
    before each tensor. Equal magnitudes in a row are ranked by position with ``hash`` (so
    results do not depend on a sort's implementation) and as ``torch.argsort`` orders them
    with ``torch`` (mergekit's ranks). Defaults ε = 0.15, λ = 1 (mergekit's).
    ``density`` and ``epsilon`` may differ between models
    (:class:`~surgery.methods.schedule.PerModel`), as mergekit's per-model parameters;
    density ± ε must lie in (0, 1) for every model and tensor.
    """
    return _della("della", base, models, density, epsilon, weights, lambda_, True, normalize,
                  rescale, rng, layer_pattern)


def della_linear(base: Weights, models: Sequence[Weights], density: ModelScheduled,
                 epsilon: ModelScheduled = 0.15, weights: Sequence[Scheduled] | None = None,
                 lambda_: Scheduled = 1.0, normalize: bool = False,
                 rescale: DellaRescale = "l1", rng: DellaRng = "hash",
                 layer_pattern: str | None = None) -> Weights:
    """DELLA's MagPrune with a linear combination (arXiv 2406.11617), mergekit's
    ``della_linear``: the τ̃_i of :func:`della`, θ = θ₀ + λ Σ w_i τ̃_i (over Σ w_i with
    ``normalize``, off by default as mergekit). ``density`` and ``epsilon`` may be per
    model, as for :func:`della`."""
    return _della("della_linear", base, models, density, epsilon, weights, lambda_, False,
                  normalize, rescale, rng, layer_pattern)


class BreadcrumbsParams(_TaskVectorMergeParams):
    gamma: ModelScheduled = Field(0.01, description="fraction of largest-magnitude entries "
                                  "dropped")
    normalize: bool = Field(False, description="divide by the sum of weights")
    rescale: bool = Field(False, description="scale kept entries back to the L1 norm")
    tie_break: TieBreak = Field("index", description="equal magnitudes at a cut: index "
                                "(linear time) or torch_sort (mergekit's order)")


class DellaParams(_TaskVectorMergeParams):
    epsilon: ModelScheduled = Field(0.15, description="keep probability spread: density ± "
                                    "epsilon")
    normalize: bool = Field(True, description="divide by the agreeing weights")
    rescale: DellaRescale = Field("l1", description="l1 (mergekit), inverse_probability, none")
    rng: DellaRng = Field("hash", description="hash (any device) or torch (mergekit's draws)")


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide by the sum of weights")


SCE_REF = "FuseChat (SCE: select, calculate, erase), arXiv 2408.07990"
RAM_REF = "Reinforced Agent Merging (RAM), arXiv 2601.13572"


def sce_tensors(theta0: torch.Tensor, thetas: Sequence[torch.Tensor],
                select_topk: float = 1.0) -> torch.Tensor:
    """SCE on one tensor (arXiv 2408.07990), mergekit's ``sce`` step for step:

    1. select: τ_i = θ_i − θ₀; with ``select_topk`` < 1, keep in every τ_i only the entries
       where the variance across the models, Var_i(τ_i) (population), is among the
       k = ⌊select_topk·(number of non-zero variances)⌋ largest (by ``torch.topk``);
    2. calculate: w_i = mean(τ_i²) / Σ_j mean(τ_j²) (1/T each when that sum is below 1e-6);
    3. erase: s = sign(Σ τ_i) (+1 at 0), m_i = [sign(τ_i) = s];
       θ = θ₀ + Σ w_i m_i τ_i / max(Σ w_i m_i, 1e-6).
    """
    if not thetas:
        return theta0
    taus = torch.stack([t - theta0 for t in thetas], dim=0)
    if select_topk < 1:
        taus = taus * _sce_mask(taus, select_topk, theta0.dtype).unsqueeze(0)
    sign = taus.sign()
    majority = (taus.sum(dim=0) >= 0).to(theta0.dtype) * 2 - 1
    agree = sign == majority
    energy = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    w = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    while w.dim() < taus.dim():
        w = w.unsqueeze(-1)
    erased = w * agree
    merged = (taus * erased).sum(dim=0)
    return theta0 + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _sce_mask(taus: torch.Tensor, density: float, dtype: torch.dtype) -> torch.Tensor:
    if density <= 0:
        return torch.zeros_like(taus[0], dtype=dtype)
    var = torch.var(taus, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var, dtype=dtype)
    if k == 0:
        return mask
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[indices] = 1
    return mask


def sce(base: Weights, models: Sequence[Weights], select_topk: float = 1.0) -> Weights:
    """SCE merging (arXiv 2408.07990), per tensor: see :func:`sce_tensors`. ``select_topk``
    in [0, 1] is the share of entries of highest variance across the models kept (1: all,
    mergekit's default)."""
    if not models:
        raise UsageError("sce: needs at least one fine-tuned model")
    if not 0 <= select_topk <= 1:
        raise UsageError(f"sce: select_topk {select_topk!r} is outside [0, 1]")

    def fn(name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        return sce_tensors(ts[0], ts[1:], select_topk)

    return Weights(ElementwiseNode([base.node, *(m.node for m in models)], fn, "sce",
                                   {"select_topk": select_topk}, SCE_REF))


def ram_tensors(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], epsilon: float = 1e-5,
                r: float | None = None, alpha: float = 0.2) -> torch.Tensor:
    """RAM on one tensor (arXiv 2601.13572), mergekit's ``ram`` / ``ramplus_tl``:

    τ_i = θ_i − θ₀; entry j of τ_i contributes when |τ_ij| > ε; c_j = how many contribute.
    Entries only one model moves are taken whole, shared ones averaged over their
    contributors: θ = θ₀ + Σ_i [c_j = 1] τ_ij + [c_j > 1] τ_ij / c_j (over contributors).
    RAM+ (tensor-local, ``r`` given): model i's unique entries are scaled by
    λ_i = 1 + r·clamp(ρ_i, 0, α), ρ_i = (its shared contributing entries) / max(its unique
    ones, ε), counted within this tensor."""
    if not thetas:
        return theta0
    tv = torch.stack([t - theta0 for t in thetas], dim=0).view(len(thetas), -1)
    moved = tv.abs() > epsilon
    counts = moved.sum(dim=0, keepdim=True)
    shared, unique = counts > 1, counts == 1
    tv = tv * moved
    if r is None:
        merged = ((tv * unique) + (tv * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    else:
        rho = (moved & shared).sum(dim=1) / (moved & unique).sum(dim=1).clamp(min=epsilon)
        lam = 1 + r * rho.clamp(min=0, max=alpha)
        merged = ((tv * unique * lam.unsqueeze(-1))
                  + (tv * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return theta0 + merged.reshape_as(theta0)


def ram(base: Weights, models: Sequence[Weights], epsilon: float = 1e-5) -> Weights:
    """Reinforced Agent Merging (arXiv 2601.13572), per tensor: unique updates kept whole,
    shared ones averaged over the models that make them (see :func:`ram_tensors`)."""
    return _ram("ram", base, models, epsilon, None, 0.2)


def ramplus_tl(base: Weights, models: Sequence[Weights], r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> Weights:
    """RAM+ with tensor-local overlap ratios (arXiv 2601.13572, mergekit's ``ramplus_tl``):
    :func:`ram` with each model's unique updates scaled by 1 + r·clamp(ρ, 0, α) (see
    :func:`ram_tensors`). Defaults r = 0.1, α = 0.2, ε = 1e-5 (mergekit's)."""
    return _ram("ramplus_tl", base, models, epsilon, r, alpha)


def _ram(op: str, base: Weights, models: Sequence[Weights], epsilon: float, r: float | None,
         alpha: float) -> Weights:
    if not models:
        raise UsageError(f"{op}: needs at least one fine-tuned model")
    if not epsilon > 0:
        raise UsageError(f"{op}: epsilon must be positive (got {epsilon!r})")
    if r is not None and (r < 0 or alpha < 0):
        raise UsageError(f"{op}: r and alpha must be non-negative (got r={r!r}, "
                         f"alpha={alpha!r})")

    def fn(name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        return ram_tensors(ts[0], ts[1:], epsilon, r, alpha)

    params: dict[str, object] = {"epsilon": epsilon}
    if r is not None:
        params.update(r=r, alpha=alpha)
    # RAM is entry by entry; RAM+'s overlap ratios count over the whole tensor.
    return Weights(ElementwiseNode([base.node, *(m.node for m in models)], fn, op, params,
                                   RAM_REF, rowwise=r is None))


class SceParams(Params):
    base: str
    models: list[str] = Field(min_length=1)
    select_topk: float = Field(1.0, ge=0, le=1, description="share of highest-variance "
                               "entries kept")


class RamParams(Params):
    base: str
    models: list[str] = Field(min_length=1)
    epsilon: float = Field(1e-5, gt=0, description="an update counts when |tau| > epsilon")


class RamPlusParams(RamParams):
    r: float = Field(0.1, ge=0, description="gain on unique updates per unit overlap ratio")
    alpha: float = Field(0.2, ge=0, description="cap of the overlap ratio")
