"""Sparse deltas and magnitude masks (Composable Sparse Fine-Tuning, arXiv 2110.07560).

A sparse delta φ holds, for K selected entries, the values of θ1 − θ0. Selection is the K entries
of largest |θ1 − θ0| over all maskable tensors together (one global threshold, found by a
streaming reduction without loading the model), or within each tensor. Ties at the threshold go
to the tensor that comes first in the base's tensor order, then to the lower flat index, so
exactly K entries are kept. Applying is θ0 + Σ φj; reverting subtracts.

File format (safetensors): per tensor ``<name>:indices`` (int64, sorted row-major flat
positions) and ``<name>:values``; metadata ``format``, ``base_model``, ``k``, ``selection`` and
``shapes`` (JSON: name -> shape); optionally ``base_sha256`` (:func:`weights_sha256` of the
base, which ``sparse_apply`` checks against the model it is applied to), ``base_revision`` and
``training`` (JSON: how an LT-SFT delta was trained). Files without ``base_sha256`` (older
ones, or deltas of in-memory expressions) apply unchecked.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import save_file

from surgery.checkpoint import Checkpoint
from surgery.checkpoint.checkpoint import open_local
from surgery.engine.stream import StreamOptions, resolve_device, stream_tensors
from surgery.errors import CheckpointError, ShapeMismatchError, UsageError
from surgery.expr import (
    ElementwiseNode,
    EvalContext,
    LoadNode,
    Node,
    Reduction,
    TensorSpec,
    Weights,
)
from surgery.methods.soup import Params
from surgery.names import TensorKind, layer_index, tensor_kind

SPARSE_REF = "Composable Sparse Fine-Tuning, arXiv 2110.07560"
FORMAT = "weight-surgery-sparse-delta"
DEFAULT_DENSITY = 0.01
DEFAULT_MASKABLE = ("attention", "mlp", "bias", "other", "embedding")


def maskable_filter(kinds: Sequence[str] = DEFAULT_MASKABLE) -> Callable[[str], bool]:
    """Which tensors take part in the selection, by kind (default: block weights and
    embeddings; norms and heads excluded)."""
    allowed = set()
    for k in kinds:
        try:
            allowed.add(TensorKind(k))
        except ValueError:
            valid = ", ".join(t.value for t in TensorKind)
            raise UsageError(f"maskable: unknown kind {k!r} (kinds: {valid})") from None
    return lambda name: tensor_kind(name) in allowed


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise UsageError(f"density: {density} is outside (0, 1]")


def keep_top(absval: torch.Tensor, threshold: float, ties: int) -> torch.Tensor:
    """Sorted flat indices of the entries above ``threshold`` plus the first ``ties`` entries
    equal to it (lowest flat index first)."""
    above = absval > threshold
    if ties > 0:
        equal = torch.nonzero(absval == threshold).flatten()[:ties]
        above[equal] = True
    return torch.nonzero(above).flatten()


def top_k_indices(absval: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly ``k`` sorted flat indices of the largest entries, ties to the lower index,
    by the k-th value (no full sort)."""
    n = absval.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    if k >= n:
        return torch.arange(n)
    kth = float(torch.kthvalue(absval, n - k + 1).values)
    return keep_top(absval, kth, k - int((absval > kth).sum()))


@dataclass
class Threshold:
    """The global selection: entries with |τ| > value, plus ``ties[name]`` entries equal to it."""

    value: float
    ties: dict[str, int]


class GlobalTopK(Reduction):
    """Exact K-th largest |τ| over several tensors, in memory O(K) whatever the model size.

    Keeps a buffer of candidate magnitudes (with the ordinal of their tensor): a tensor adds its
    entries at or above the current lower bound; when the buffer passes 2K it is cut to its K
    largest (by k-th value) and the bound raised. At the end the K-th largest is the threshold,
    and the entries equal to it are allotted to tensors in tensor order.
    """

    def __init__(self, tv: Node, names: list[str], k: int) -> None:
        self.inputs = (tv,)
        self._names = names
        self.k = k
        self._ordinal = {n: i for i, n in enumerate(names)}
        self.bound = -math.inf
        self.values = torch.empty(0)
        self.ordinals = torch.empty(0, dtype=torch.int32)

    def names(self) -> list[str]:
        return self._names

    def update(self, name: str, tensors: list[torch.Tensor]) -> None:
        absval = tensors[0].abs().flatten().cpu()
        absval = absval[absval >= self.bound]
        n = absval.numel()
        if n > self.k:  # only this tensor's K largest can count; its ties at the cut all stay
            absval = absval[absval >= torch.kthvalue(absval, n - self.k + 1).values]
        ordinal = torch.full((absval.numel(),), self._ordinal[name], dtype=torch.int32)
        self.values = torch.cat([self.values, absval])
        self.ordinals = torch.cat([self.ordinals, ordinal])
        if self.values.numel() > 2 * self.k:
            self._cut()

    def _cut(self) -> None:
        n = self.values.numel()
        kth = float(torch.kthvalue(self.values, n - self.k + 1).values)
        keep = self.values >= kth
        self.values, self.ordinals = self.values[keep], self.ordinals[keep]
        self.bound = kth

    def finalize(self) -> Threshold:
        n = self.values.numel()
        kth = float(torch.kthvalue(self.values, n - self.k + 1).values)
        remaining = self.k - int((self.values > kth).sum())
        counts = torch.bincount(self.ordinals[self.values == kth].long(),
                                minlength=len(self._names))
        ties: dict[str, int] = {}
        for i, c in enumerate(counts.tolist()):
            if remaining <= 0:
                break
            if c:
                ties[self._names[i]] = min(c, remaining)
                remaining -= ties[self._names[i]]
        self.values = torch.empty(0)
        self.ordinals = torch.empty(0, dtype=torch.int32)
        return Threshold(kth, ties)


class Selection(Node):
    """The task vector τ = θ1 − θ0 over the maskable tensors, with its top-K selection."""

    op = "sparse_selection"
    reference = SPARSE_REF

    def __init__(self, base: Weights, model: Weights, density: float, k: int | None,
                 per_tensor: bool, maskable: Callable[[str], bool]) -> None:
        super().__init__()
        _check_density(density)
        tv = model - base
        self.inputs = (tv.node,)
        self.density = density
        self.per_tensor = per_tensor
        self.maskable = [n for n in tv.names
                         if tv.spec(n).dtype.is_floating_point and maskable(n)]
        if not self.maskable:
            raise UsageError("maskable: no tensor of the model is maskable")
        total = sum(tv.spec(n).numel for n in self.maskable)
        if k is not None and not 0 < k <= total:
            raise UsageError(f"k: {k} is outside 1..{total} (maskable parameters)")
        self.k = k if k is not None else math.floor(density * total)
        if self.k < 1:
            raise UsageError(f"density: {density} keeps no entry of the {total} maskable "
                             "parameters")
        self.reduction = None if per_tensor else GlobalTopK(tv.node, self.maskable, self.k)

    def params(self) -> dict:
        return {"k": self.k, "per_tensor": self.per_tensor}

    def _list_names(self) -> list[str]:
        return self.maskable

    def spec(self, name: str) -> TensorSpec:
        return self.inputs[0].spec(name)

    def reductions(self) -> list[Reduction]:
        return [self.reduction] if self.reduction else []

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        return ctx.to_compute(ctx.value(self.inputs[0], name))

    def select(self, name: str, tau: torch.Tensor) -> torch.Tensor:
        """Sorted flat indices of the selected entries of tensor ``name`` (τ given)."""
        absval = tau.abs().flatten()
        if self.reduction is None:
            return top_k_indices(absval, math.floor(self.density * absval.numel()))
        t: Threshold = self.reduction.value
        return keep_top(absval, t.value, t.ties.get(name, 0))


@dataclass
class SparseDelta:
    """Selected entries of θ1 − θ0: per tensor sorted flat indices and their values."""

    base_model: str
    k: int
    shapes: dict[str, tuple[int, ...]]
    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    selection: str = "global"
    source: str = field(default="<memory>")
    base_sha256: str | None = None
    base_revision: str | None = None
    training: dict | None = None

    def save(self, path: str | Path) -> Path:
        """Write the delta as one safetensors file (see the module docstring for the layout)."""
        p = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for name in self.shapes:
            tensors[f"{name}:indices"] = self.indices[name].contiguous()
            tensors[f"{name}:values"] = self.values[name].contiguous()
        meta = {"format": FORMAT, "base_model": self.base_model, "k": str(self.k),
                "selection": self.selection,
                "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()})}
        if self.base_sha256:
            meta["base_sha256"] = self.base_sha256
        if self.base_revision:
            meta["base_revision"] = self.base_revision
        if self.training is not None:
            meta["training"] = json.dumps(self.training, sort_keys=True)
        p.parent.mkdir(parents=True, exist_ok=True)
        partial = p.with_name(p.name + ".partial")
        _write_safetensors(partial, tensors, meta)
        partial.replace(p)
        return p

    def dense(self, name: str) -> torch.Tensor:
        """The delta of one tensor as a dense tensor (zeros where nothing is stored)."""
        out = torch.zeros(math.prod(self.shapes[name]), dtype=self.values[name].dtype)
        out[self.indices[name]] = self.values[name]
        return out.reshape(self.shapes[name])

    def mask(self) -> Mask:
        """The bit-packed mask of the stored entries."""
        return Mask({n: pack_bits(self.indices[n], math.prod(s)) for n, s in self.shapes.items()},
                    dict(self.shapes))


def select_entries(base: Weights, model: Weights, density: float = DEFAULT_DENSITY, *,
                   k: int | None = None, per_tensor: bool = False,
                   maskable: Sequence[str] = DEFAULT_MASKABLE, device: str = "cpu"
                   ) -> tuple[Selection, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The selection of :func:`sparsify` and :func:`extract_sparse_delta` (and LT-SFT's mask):
    per maskable tensor the sorted flat indices of the kept entries of τ = θ1 − θ0 and their
    float32 values. Two streaming passes (the global threshold, then the entries)."""
    sel = Selection(base, model, density, k, per_tensor, maskable_filter(maskable))
    opts = StreamOptions(device=resolve_device(device))
    indices: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for name, tau in stream_tensors(sel, sel.maskable, opts, lambda _: torch.float32):
        idx = sel.select(name, tau)
        indices[name] = idx
        values[name] = tau.flatten()[idx]
    return sel, indices, values


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]
                       ) -> None:
    """A safetensors file with a deterministic header (metadata keys sorted, tensors in the
    given order), so the same delta gives the same bytes; safetensors' own writer orders
    the metadata by a randomly seeded hash map."""
    from surgery.writer.shards import PlannedTensor, encode_header, tensor_bytes

    planned = [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with open(path, "wb") as f:
        f.write(encode_header(planned, meta))
        for t in tensors.values():
            f.write(tensor_bytes(t.detach().cpu().contiguous()))


def extract_sparse_delta(base: Weights, model: Weights, density: float = DEFAULT_DENSITY,
                         *, k: int | None = None, per_tensor: bool = False,
                         maskable: Sequence[str] = DEFAULT_MASKABLE,
                         dtype: torch.dtype = torch.float32,
                         device: str = "cpu") -> SparseDelta:
    """Extract φ from a fine-tune (Composable Sparse Fine-Tuning, arXiv 2110.07560).

    Keeps the K = ⌊density · N⌋ entries of largest |θ1 − θ0| over the N maskable parameters (or
    ``k`` exactly), by one global threshold from a streaming pass; ``per_tensor`` keeps
    ⌊density · nᵢ⌋ in each tensor instead. Two streaming passes; memory O(K).
    """
    sel, indices, values = select_entries(base, model, density, k=k, per_tensor=per_tensor,
                                          maskable=maskable, device=device)
    values = {n: v.to(dtype) for n, v in values.items()}
    shapes = {n: sel.spec(n).shape for n in sel.maskable}
    kept = sum(i.numel() for i in indices.values())
    sources = base.node.checkpoints()
    return SparseDelta(sources[0].source if sources else "<expression>", kept, shapes, indices,
                       values, "per_tensor" if per_tensor else "global",
                       base_sha256=weights_sha256(base) if sources else None,
                       base_revision=sources[0].revision if sources else None)


def weights_sha256(weights: Weights | Node) -> str:
    """The identity of a model that a delta records as its base: for a checkpoint, the
    SHA-256 of its weight files' SHA-256s in order (the Hub's listing where it gives them,
    else hashed once and cached by size and mtime); for an expression, of its description
    and the hashes of every file it reads."""
    node = weights.node if isinstance(weights, Weights) else weights
    if isinstance(node, LoadNode):
        doc: object = _file_hashes(node.checkpoint)
    else:
        doc = [node.describe(), sorted(h for ck in dict.fromkeys(node.checkpoints())
                                       for h in _file_hashes(ck))]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _file_hashes(ck: Checkpoint) -> list[str]:
    from surgery.checkpoint.hashing import cached_sha256

    known = ck.known_sha256()
    if any(f not in known for f in ck.files):
        ck.fetch([f for f in ck.files if f not in known])
    return [known[f] if f in known else cached_sha256(f) for f in ck.files]


class SparseDeltaFile:
    """A sparse delta on disk, opened lazily: the header is read, the entries on demand."""

    def __init__(self, path: str | Path) -> None:
        self.checkpoint: Checkpoint = open_local(Path(path))
        meta = self.checkpoint.headers[0].metadata
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a sparse delta (metadata format is "
                                  f"{meta.get('format')!r}, expected {FORMAT!r})")
        self.path = str(path)
        self.source = self.path
        self.base_model = meta.get("base_model", "")
        self.k = int(meta.get("k", "0"))
        self.selection = meta.get("selection", "global")
        self.base_sha256 = meta.get("base_sha256") or None
        self.base_revision = meta.get("base_revision") or None
        self.training = json.loads(meta["training"]) if meta.get("training") else None
        self.shapes = {n: tuple(s) for n, s in json.loads(meta.get("shapes", "{}")).items()}
        for name in self.shapes:
            for part in ("indices", "values"):
                self.checkpoint.info(f"{name}:{part}")

    def entries(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.checkpoint.read(f"{name}:indices"),
                self.checkpoint.read(f"{name}:values"))

    def load(self) -> SparseDelta:
        """Read every entry into memory."""
        idx, vals = {}, {}
        for name in self.shapes:
            idx[name], vals[name] = self.entries(name)
        return SparseDelta(self.base_model, self.k, dict(self.shapes), idx, vals,
                           self.selection, self.path, self.base_sha256, self.base_revision,
                           self.training)


def load_sparse_delta(path: str | Path) -> SparseDelta:
    """Read a sparse delta file written by :meth:`SparseDelta.save`."""
    return SparseDeltaFile(path).load()


DeltaLike = SparseDelta | SparseDeltaFile


def _entries(delta: DeltaLike, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(delta, SparseDeltaFile):
        return delta.entries(name)
    return delta.indices[name], delta.values[name]


class SparseApplyNode(Node):
    """θ = θ0 + sign · Σ φj, computed in float64 and cast once at the end, so that a revert of
    the same deltas over a lazily applied model gives θ0 back bit for bit."""

    reference = SPARSE_REF

    def __init__(self, base: Node, deltas: Sequence[DeltaLike], sign: float, op: str,
                 ignore_base_hash: bool = True) -> None:
        super().__init__()
        if not deltas:
            raise UsageError(f"{op}: deltas: give at least one sparse delta")
        self.inputs = (base,)
        self.deltas = list(deltas)
        self.sign = sign
        self.op = op
        names = set(base.names())
        for d in self.deltas:
            label = d.source
            for name, shape in d.shapes.items():
                if name not in names:
                    raise ShapeMismatchError(f"{op}: tensor {name!r} of sparse delta {label} is "
                                             "not in the base model")
                spec = base.spec(name)
                if tuple(spec.shape) != tuple(shape):
                    raise ShapeMismatchError(
                        f"{op}: tensor {name!r} has shape {list(shape)} in sparse delta {label} "
                        f"but {list(spec.shape)} in the base model")
                if not spec.dtype.is_floating_point:
                    raise ShapeMismatchError(f"{op}: tensor {name!r} of the base model is "
                                             f"{spec.dtype}, not a floating tensor")
        if not ignore_base_hash:
            check_base_hash(base, self.deltas, op)

    def params(self) -> dict:
        return {"deltas": [d.source for d in self.deltas]}

    def _list_names(self) -> list[str]:
        return self.inputs[0].names()

    def spec(self, name: str) -> TensorSpec:
        return self.inputs[0].spec(name)

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        theta = ctx.value(self.inputs[0], name)
        hits = [d for d in self.deltas if name in d.shapes]
        if not hits:
            return theta
        flat = theta.to(torch.float64).flatten().clone()
        for d in hits:
            idx, vals = _entries(d, name)
            flat.index_add_(0, idx.to(flat.device), vals.to(flat.device, torch.float64),
                            alpha=self.sign)
        return flat.reshape(theta.shape)


def check_base_hash(base: Node, deltas: Sequence[DeltaLike], op: str = "sparse_apply") -> None:
    """Every delta that records its base's hash was made on ``base``: else an error naming
    both (the base is hashed only when some delta records a hash)."""
    recorded = [d for d in deltas if d.base_sha256]
    if not recorded:
        return
    have = weights_sha256(base)
    cks = base.checkpoints()
    label = cks[0].source if isinstance(base, LoadNode) else f"the result of {base.op}"
    for d in recorded:
        if d.base_sha256 != have:
            raise UsageError(
                f"{op}: sparse delta {d.source} was made on base {d.base_model} (sha256 "
                f"{d.base_sha256[:16]}), not on {label} (sha256 {have[:16]}); pass "
                "--ignore-base-hash (recipe: ignore_base_hash: true) to apply it anyway")


def apply_sparse_deltas(base: Weights, deltas: Sequence[DeltaLike], *,
                        ignore_base_hash: bool = False) -> Weights:
    """Composition θ = θ0 + Σ φj (arXiv 2110.07560): several deltas compose by addition.
    A delta that records its base's hash (``base_sha256``) must be applied to that base,
    unless ``ignore_base_hash``."""
    return Weights(SparseApplyNode(base.node, deltas, 1.0, "sparse_apply", ignore_base_hash))


def revert_sparse_deltas(model: Weights, deltas: Sequence[DeltaLike]) -> Weights:
    """Revert: θ = θ − Σ φj, the inverse of :func:`apply_sparse_deltas`."""
    return Weights(SparseApplyNode(model.node, deltas, -1.0, "sparse_revert"))


def sparsify(base: Weights, model: Weights, density: float = DEFAULT_DENSITY, *,
             per_tensor: bool = False, maskable: Sequence[str] = DEFAULT_MASKABLE) -> Weights:
    """θ0 + m ⊙ τ with m the top-K magnitude mask of τ = θ1 − θ0 (arXiv 2110.07560), as a
    model: the fine-tune keeping only its K largest updates (non-maskable tensors stay θ1)."""
    sel = Selection(base, model, density, None, per_tensor, maskable_filter(maskable))
    return Weights(SparsifyNode(base, model, sel))


class SparsifyNode(ElementwiseNode):
    """θ0 + m ⊙ τ per tensor, m from the selection (whose global threshold is a reduction)."""

    def __init__(self, base: Weights, model: Weights, selection: Selection) -> None:
        self.selection = selection
        self.chosen = set(selection.maskable)
        super().__init__([base.node, model.node], self._fn, "sparsify",
                         {"density": selection.density, "per_tensor": selection.per_tensor,
                          "k": selection.k}, SPARSE_REF)

    def reductions(self) -> list[Reduction]:
        return self.selection.reductions()

    def _fn(self, name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        theta0, theta1 = ts
        if name not in self.chosen:
            return theta1
        tau = theta1 - theta0  # the same float32 values the selection's pass saw
        flat = theta0.flatten().clone()
        idx = self.selection.select(name, tau)
        flat[idx] += tau.flatten()[idx]
        return flat.reshape(theta0.shape)


# --- Masks -----------------------------------------------------------------------------------

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_bits(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Bit-packed (uint8, little bit order) mask of ``numel`` entries with ``indices`` set."""
    packed = torch.zeros((numel + 7) // 8, dtype=torch.int64)
    packed.index_add_(0, indices // 8, torch.ones_like(indices) << (indices % 8))
    return packed.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1
    return bits.flatten()[:numel].bool()


def popcount(packed: torch.Tensor) -> int:
    return int(_POPCOUNT[packed.to(torch.int64)].sum())


@dataclass
class Mask:
    """A set of entries per tensor, stored bit-packed (one bit per parameter)."""

    bits: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def from_dense(cls, masks: Mapping[str, torch.Tensor]) -> Mask:
        """The mask of boolean tensors, name by name (True: the entry is in the mask)."""
        bits = {n: pack_bits(torch.nonzero(m.flatten().cpu()).flatten(), m.numel())
                for n, m in masks.items()}
        return cls(bits, {n: tuple(m.shape) for n, m in masks.items()})

    @classmethod
    def random(cls, shapes: Mapping[str, Sequence[int]], counts: Mapping[str, int],
               seed: int = 0) -> Mask:
        """``counts[name]`` entries of each tensor drawn uniformly without replacement
        (seeded; tensor by tensor in the order of ``shapes``): the random control of a
        localization method. Holds 8 bytes per entry of the largest tensor while it draws."""
        gen = torch.Generator().manual_seed(seed)
        bits = {}
        for name, shape in shapes.items():
            numel, k = math.prod(shape), counts.get(name, 0)
            if not 0 <= k <= numel:
                raise UsageError(f"random mask: {k} entries asked of tensor {name!r}, which "
                                 f"has {numel}")
            idx = torch.randperm(numel, generator=gen)[:k]
            bits[name] = pack_bits(idx, numel)
        return cls(bits, {n: tuple(s) for n, s in shapes.items()})

    @classmethod
    def empty(cls, shapes: Mapping[str, Sequence[int]]) -> Mask:
        """No entry of any of the tensors."""
        return cls({n: torch.zeros((math.prod(s) + 7) // 8, dtype=torch.uint8)
                    for n, s in shapes.items()}, {n: tuple(s) for n, s in shapes.items()})

    def random_like(self, seed: int = 0) -> Mask:
        """A random mask with as many entries as this one in every tensor (:meth:`random`)."""
        return Mask.random(self.shapes, {n: self.count(n) for n in self.shapes}, seed)

    def count(self, name: str | None = None) -> int:
        names = [name] if name else list(self.bits)
        return sum(popcount(self.bits[n]) for n in names)

    def dense(self, name: str) -> torch.Tensor:
        return unpack_bits(self.bits[name], math.prod(self.shapes[name])).reshape(
            self.shapes[name])

    def _combine(self, other: Mask, op: str,
                 fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Mask:
        for name in set(self.shapes) & set(other.shapes):
            if self.shapes[name] != other.shapes[name]:
                raise ShapeMismatchError(f"mask {op}: tensor {name!r} has shape "
                                         f"{list(other.shapes[name])} in the second mask but "
                                         f"{list(self.shapes[name])} in the first")
        shapes = {**self.shapes, **other.shapes}
        blank = Mask.empty(shapes).bits
        out = {name: fn(self.bits.get(name, blank[name]), other.bits.get(name, blank[name]))
               for name in shapes}
        return Mask(out, shapes)

    def union(self, other: Mask) -> Mask:
        return self._combine(other, "union", torch.bitwise_or)

    def intersection(self, other: Mask) -> Mask:
        return self._combine(other, "intersection", torch.bitwise_and)

    def difference(self, other: Mask) -> Mask:
        """Entries in this mask and not in ``other``."""
        return self._combine(other, "difference",
                             lambda a, b: torch.bitwise_and(a, torch.bitwise_not(b)))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: b.contiguous() for n, b in self.bits.items()}, str(p),
                  metadata={"format": "weight-surgery-mask",
                            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()})})
        return p


def load_mask(path: str | Path) -> Mask:
    ck = open_local(Path(path))
    meta = ck.headers[0].metadata
    if meta.get("format") != "weight-surgery-mask":
        raise CheckpointError(f"{path}: not a mask file (metadata format "
                              f"{meta.get('format')!r})")
    shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
    return Mask({n: ck.read(n) for n in shapes}, shapes)


@dataclass
class LayerOverlap:
    """Sizes of two masks within one layer group, their intersection and Jaccard index."""

    group: str
    a: int
    b: int
    both: int
    either: int

    @property
    def jaccard(self) -> float:
        return self.both / self.either if self.either else 1.0


def layer_group(name: str) -> str:
    idx = layer_index(name)
    return f"layer {idx}" if idx is not None else "non-block"


def overlap_by_layer(a: Mask, b: Mask) -> list[LayerOverlap]:
    """Per-layer overlap statistics of two masks: |A|, |B|, |A∩B|, |A∪B| and Jaccard."""
    both, either = a.intersection(b), a.union(b)
    groups: dict[str, LayerOverlap] = {}
    for name in either.shapes:
        g = groups.setdefault(layer_group(name), LayerOverlap(layer_group(name), 0, 0, 0, 0))
        g.a += a.count(name) if name in a.bits else 0
        g.b += b.count(name) if name in b.bits else 0
        g.both += both.count(name)
        g.either += either.count(name)
    return sorted(groups.values(), key=_group_order)


def _group_order(g: LayerOverlap) -> tuple[int, int]:
    return (1, 0) if g.group == "non-block" else (0, int(g.group.split()[1]))


class SparseApplyParams(Params):
    base: str
    deltas: list[str] = Field(min_length=1, description="sparse delta files (.safetensors)")
    ignore_base_hash: bool = Field(False, description="apply deltas made on another base")


class SparseRevertParams(Params):
    base: str
    deltas: list[str] = Field(min_length=1, description="sparse delta files (.safetensors)")


class SparsifyParams(Params):
    base: str
    model: str
    density: float = DEFAULT_DENSITY
    per_tensor: bool = False
    maskable: list[str] = Field(default_factory=lambda: list(DEFAULT_MASKABLE))
