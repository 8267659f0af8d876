"""Floor 2: the lazy expression graph and the Weights API."""

from surgery.expr.node import (
    ElementwiseNode,
    EvalContext,
    LoadNode,
    Node,
    Reduction,
    TensorSpec,
    seeded_generator,
)
from surgery.expr.weights import Weights, load

__all__ = ["ElementwiseNode", "EvalContext", "LoadNode", "Node", "Reduction", "TensorSpec",
           "Weights", "load", "seeded_generator"]
