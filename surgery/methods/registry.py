"""Every operation a recipe can name, in one explicit table (no registration by import).

Each entry gives the pydantic model of its parameters, which fields name models, and a
function that builds the operation from those parameters and the resolved models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from surgery.expr import Weights
from surgery.methods import soup

Resolve = Callable[[str], Weights]


@dataclass(frozen=True)
class Operation:
    name: str
    summary: str
    reference: str | None
    params: type[BaseModel]
    model_fields: tuple[str, ...]
    build: Callable[[Any, Resolve], Weights]


def _build_linear(p: soup.LinearParams, get: Resolve) -> Weights:
    return soup.linear([get(m) for m in p.models], p.weights, p.normalize)


def _build_task_arithmetic(p: soup.TaskArithmeticParams, get: Resolve) -> Weights:
    return soup.task_arithmetic(get(p.base), [get(m) for m in p.models], p.weights,
                                   p.lambda_, p.normalize)


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("linear", "Weighted average of models (uniform soup with equal weights)",
                  soup.SOUP_REF, soup.LinearParams, ("models",), _build_linear),
        Operation("task_arithmetic", "Base plus the weighted sum of task vectors",
                  soup.TASK_ARITHMETIC_REF, soup.TaskArithmeticParams,
                  ("base", "models"), _build_task_arithmetic),
    )
}
