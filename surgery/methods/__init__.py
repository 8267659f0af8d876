"""Floor 3: the methods, one module per family; ``registry`` lists them for recipes."""

from surgery.methods.layer_scaling import lines
from surgery.methods.schedule import Rule
from surgery.methods.soup import linear, task_arithmetic
from surgery.methods.spherical import slerp
from surgery.methods.ties_dare import dare_linear, dare_ties, ties

__all__ = ["Rule", "dare_linear", "dare_ties", "linear", "lines", "slerp", "task_arithmetic",
           "ties"]
