"""weight-surgery: streaming operations on model weights.

>>> from surgery import load, task_arithmetic
>>> base, math = load("fixtures/tiny-llama/base"), load("fixtures/tiny-llama/math")
>>> (base + 0.5 * (math - base)).save("out/half-math")  # doctest: +SKIP
"""

from surgery.engine import ProgressEvent, SaveResult
from surgery.errors import SurgeryError, UsageError
from surgery.expr import Weights, load
from surgery.methods import (
    Mask,
    PerModel,
    Rule,
    SparseDelta,
    apply_sparse_deltas,
    dare_linear,
    dare_ties,
    drop_layers,
    extract_sparse_delta,
    hft_reset,
    hft_selection,
    keep_first_layers,
    linear,
    lines,
    load_mask,
    load_sparse_delta,
    overlap_by_layer,
    revert_sparse_deltas,
    slerp,
    sparsify,
    stack_layers,
    task_arithmetic,
    ties,
)

__all__ = [
    "Mask",
    "PerModel",
    "ProgressEvent",
    "Rule",
    "SaveResult",
    "SparseDelta",
    "SurgeryError",
    "UsageError",
    "Weights",
    "apply_sparse_deltas",
    "dare_linear",
    "dare_ties",
    "drop_layers",
    "extract_sparse_delta",
    "hft_reset",
    "hft_selection",
    "keep_first_layers",
    "linear",
    "lines",
    "load",
    "load_mask",
    "load_sparse_delta",
    "overlap_by_layer",
    "revert_sparse_deltas",
    "slerp",
    "sparsify",
    "stack_layers",
    "task_arithmetic",
    "ties",
]

# mergekit 0.1.5's other merge methods (issue 21).
from surgery.methods import (
    TokenRow,
    align_vocabularies,
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    della,
    della_linear,
    karcher,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    sce,
)

__all__ += ["arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "karcher",
            "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl",
            "sce"]
__all__ += ["TokenRow", "align_vocabularies"]
