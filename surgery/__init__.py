"""weight-surgery: streaming operations on model weights.

>>> from surgery import load, task_arithmetic
>>> base, math = load("fixtures/tiny-llama/base"), load("fixtures/tiny-llama/math")
>>> (base + 0.5 * (math - base)).save("out/half-math")  # doctest: +SKIP
"""

from surgery.engine import ProgressEvent, SaveResult
from surgery.errors import SurgeryError, UsageError
from surgery.expr import Weights, load
from surgery.methods import linear, task_arithmetic

__all__ = ["ProgressEvent", "SaveResult", "SurgeryError", "UsageError", "Weights", "linear",
           "load", "task_arithmetic"]
