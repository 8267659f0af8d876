"""Floor 3: the methods, one module per family; ``registry`` lists them for recipes."""

from surgery.methods.hft import hft_reset, hft_selection
from surgery.methods.layer_scaling import lines
from surgery.methods.layers import drop_layers, keep_first_layers, stack_layers
from surgery.methods.pass_through import passthrough
from surgery.methods.schedule import PerModel, Rule
from surgery.methods.soup import linear, task_arithmetic
from surgery.methods.sparse import (
    Mask,
    SparseDelta,
    apply_sparse_deltas,
    extract_sparse_delta,
    load_mask,
    load_sparse_delta,
    overlap_by_layer,
    revert_sparse_deltas,
    sparsify,
)
from surgery.methods.sphere_means import karcher, multislerp, nuslerp
from surgery.methods.spherical import slerp
from surgery.methods.stock import model_stock
from surgery.methods.swaps import arcee_fusion, nearswap
from surgery.methods.task_merges import (
    breadcrumbs,
    breadcrumbs_ties,
    della,
    della_linear,
    ram,
    ramplus_tl,
    sce,
)
from surgery.methods.ties_dare import dare_linear, dare_ties, ties

__all__ = ["Mask", "PerModel", "Rule", "SparseDelta", "apply_sparse_deltas", "dare_linear",
           "dare_ties", "drop_layers", "extract_sparse_delta", "hft_reset", "hft_selection",
           "keep_first_layers", "linear", "lines", "load_mask", "load_sparse_delta",
           "overlap_by_layer", "revert_sparse_deltas", "slerp", "sparsify", "stack_layers",
           "task_arithmetic", "ties"]
__all__ += ["arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "karcher",
            "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl",
            "sce"]

# Models with different tokenizers, over one vocabulary.
from surgery.methods.vocabulary import TokenRow, align_vocabularies  # noqa: E402

__all__ += ["TokenRow", "align_vocabularies"]
