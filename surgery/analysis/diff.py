"""How two checkpoints differ, per block, read one tensor at a time.

For each group (a block, or the non-block tensors) of the floating tensors A and B share:
‖A−B‖_F, ‖A‖_F, the fraction of entries that differ, and, with a base, between the task
vectors τ_A = A − base and τ_B = B − base: cosine similarity ⟨τ_A, τ_B⟩ / (‖τ_A‖ ‖τ_B‖) and
sign agreement, the fraction of entries where both are non-zero that have the same sign.
Sums are accumulated in float64; at most one tensor of each model is in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from surgery.checkpoint import Checkpoint
from surgery.errors import ShapeMismatchError
from surgery.names import block_label, label_order


@dataclass
class GroupDiff:
    label: str
    numel: int = 0
    changed: int = 0
    sq_diff: float = 0.0  # Σ (A−B)²
    sq_a: float = 0.0  # Σ A²
    dot_tv: float = 0.0  # Σ τ_A τ_B
    sq_tv_a: float = 0.0
    sq_tv_b: float = 0.0
    both_nonzero: int = 0
    same_sign: int = 0

    @property
    def diff_norm(self) -> float:
        return math.sqrt(self.sq_diff)

    @property
    def relative_diff(self) -> float:
        """‖A−B‖ / ‖A‖ (0 when A is all zeros)."""
        return math.sqrt(self.sq_diff / self.sq_a) if self.sq_a else 0.0

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.numel if self.numel else 0.0

    @property
    def cosine(self) -> float | None:
        denom = math.sqrt(self.sq_tv_a * self.sq_tv_b)
        return self.dot_tv / denom if denom else None

    @property
    def sign_agreement(self) -> float | None:
        return self.same_sign / self.both_nonzero if self.both_nonzero else None

    def add(self, other: GroupDiff) -> None:
        for name in ("numel", "changed", "sq_diff", "sq_a", "dot_tv", "sq_tv_a", "sq_tv_b",
                     "both_nonzero", "same_sign"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class DiffReport:
    a: str
    b: str
    base: str | None
    groups: list[GroupDiff]
    total: GroupDiff
    skipped: list[str] = field(default_factory=list)  # non-floating tensors, not compared


def _tensor_diff(label: str, a: torch.Tensor, b: torch.Tensor,
                 base: torch.Tensor | None) -> GroupDiff:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    g = GroupDiff(label, numel=a.numel(), changed=int((a != b).sum()),
                  sq_diff=float((a64 - b64).square().sum()), sq_a=float(a64.square().sum()))
    if base is not None:
        base64 = base.to(torch.float64)
        ta, tb = a64 - base64, b64 - base64
        g.dot_tv = float((ta * tb).sum())
        g.sq_tv_a = float(ta.square().sum())
        g.sq_tv_b = float(tb.square().sum())
        sa, sb = ta.sign(), tb.sign()
        both = (sa != 0) & (sb != 0)
        g.both_nonzero = int(both.sum())
        g.same_sign = int((both & (sa == sb)).sum())
    return g


def diff_checkpoints(a: Checkpoint, b: Checkpoint, base: Checkpoint | None = None) -> DiffReport:
    """Per-block difference statistics of ``a`` and ``b`` (and their task vectors over
    ``base``). Tensor names and shapes must agree; integer buffers are skipped."""
    models = [a, b] + ([base] if base is not None else [])
    names = a.names
    for other in models[1:]:
        missing = sorted(set(names) ^ set(other.names))
        if missing:
            raise ShapeMismatchError(f"diff: tensor {missing[0]!r} is in only one of "
                                     f"{a.source} and {other.source}")
    groups: dict[str, GroupDiff] = {}
    skipped = []
    for name in names:
        infos = [m.info(name) for m in models]
        if any(i.shape != infos[0].shape for i in infos):
            raise ShapeMismatchError(f"diff: tensor {name!r} has shapes "
                                     f"{[list(i.shape) for i in infos]}")
        if not all(i.dtype.is_floating_point for i in infos):
            skipped.append(name)
            continue
        label = block_label(name)
        tensors = [m.read(name) for m in models]
        part = _tensor_diff(label, tensors[0], tensors[1], tensors[2] if base else None)
        groups.setdefault(label, GroupDiff(label)).add(part)
    order = sorted(groups.values(), key=lambda g: label_order(g.label))
    total = GroupDiff("total")
    for g in order:
        total.add(g)
    return DiffReport(a.source, b.source, base.source if base else None, order, total, skipped)
