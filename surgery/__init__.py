"""weight-surgery: streaming operations on model weights.

>>> from surgery import load, task_arithmetic
>>> base, math = load("fixtures/tiny-llama/base"), load("fixtures/tiny-llama/math")
>>> (base + 0.5 * (math - base)).save("out/half-math")  # doctest: +SKIP
"""

from surgery.engine import ProgressEvent, SaveResult
from surgery.errors import SurgeryError, UsageError
from surgery.expr import Weights, load
from surgery.methods import (
    Rule,
    dare_linear,
    dare_ties,
    linear,
    lines,
    slerp,
    task_arithmetic,
    ties,
)

__all__ = ["ProgressEvent", "Rule", "SaveResult", "SurgeryError", "UsageError", "Weights",
           "dare_linear", "dare_ties", "linear", "lines", "load", "slerp", "task_arithmetic",
           "ties"]
