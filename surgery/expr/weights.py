"""The Python API for weight arithmetic: ``merged = base + 0.5 * (math - base)``.

A :class:`Weights` wraps a node of the lazy graph. Operators build new nodes; nothing is read
until ``save`` or ``w[name]``.
"""

from __future__ import annotations

from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgery.checkpoint import open_checkpoint
from surgery.expr.node import (
    ElementwiseNode,
    EvalContext,
    LoadNode,
    Node,
    TensorSpec,
    node_label,
)

if TYPE_CHECKING:
    from surgery.engine import SaveResult


class Weights:
    """A lazy set of named tensors (a model, or an expression over models)."""

    __array_priority__ = 1000  # so numpy scalars defer to our reflected operators

    def __init__(self, node: Node) -> None:
        self.node = node

    @property
    def names(self) -> list[str]:
        return list(self.node.names())

    @property
    def config(self) -> dict:
        return self.node.config()

    def spec(self, name: str) -> TensorSpec:
        return self.node.spec(name)

    def __len__(self) -> int:
        return len(self.node.names())

    def __contains__(self, name: object) -> bool:
        return name in set(self.node.names())

    def __repr__(self) -> str:
        return f"Weights({self.node.op}, {len(self)} tensors)"

    def __getitem__(self, name: str) -> torch.Tensor:
        """Compute one tensor (float32 for floating tensors), running any reduction pass."""
        from surgery.engine.stream import StreamOptions, resolve_device, resolve_reductions

        if name not in self:
            raise KeyError(name)
        opts = StreamOptions(device=resolve_device("cpu"))
        resolve_reductions(self.node, opts)
        ctx = EvalContext(name, opts.device, {})
        return ctx.to_compute(ctx.value(self.node, name))

    def save(self, path: str | Path, **options: Any) -> SaveResult:
        """Write the result as a model directory; see :func:`surgery.engine.save` for options
        (dtype, shard_size, device, seed, force, progress)."""
        from surgery.engine import save

        return save(self.node, path, **options)

    def _binary(self, other: object, op: str) -> Weights:
        if not isinstance(other, Weights):
            return NotImplemented
        fn = torch.add if op == "add" else torch.sub
        return Weights(ElementwiseNode([self.node, other.node], lambda _, t, __: fn(t[0], t[1]),
                                       op, rowwise=True))

    def __add__(self, other: object) -> Weights:
        return self._binary(other, "add")

    def __sub__(self, other: object) -> Weights:
        return self._binary(other, "subtract")

    def __mul__(self, factor: object) -> Weights:
        if isinstance(factor, bool) or not isinstance(factor, Real):
            return NotImplemented
        s = float(factor)
        return Weights(ElementwiseNode([self.node], lambda _, t, __: t[0] * s, "scale",
                                       {"factor": s}, rowwise=True))

    __rmul__ = __mul__

    def __truediv__(self, divisor: object) -> Weights:
        if isinstance(divisor, bool) or not isinstance(divisor, Real):
            return NotImplemented
        d = float(divisor)
        if d == 0.0:
            raise ZeroDivisionError("Weights divided by zero")
        return Weights(ElementwiseNode([self.node], lambda _, t, __: t[0] / d, "divide",
                                       {"divisor": d}, rowwise=True))

    def __neg__(self) -> Weights:
        return self * -1.0


def load(source: str | Path, *, allow_pickle: bool = False) -> Weights:
    """Open a model directory, a .safetensors file or a Hub id (``org/name[@revision]``).

    Only headers are read. Pickle weights are refused unless ``allow_pickle`` is set, and then
    loaded with the weights-only unpickler.
    """
    return Weights(LoadNode(open_checkpoint(source, allow_pickle=allow_pickle)))


def weights_label(w: Weights) -> str:
    """How messages name a model (:func:`surgery.expr.node.node_label`)."""
    return node_label(w.node)
