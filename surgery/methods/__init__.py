"""Floor 3: the methods, one module per family; ``registry`` lists them for recipes."""

from surgery.methods.soup import linear, task_arithmetic

__all__ = ["linear", "task_arithmetic"]
