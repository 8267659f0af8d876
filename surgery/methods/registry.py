"""Every operation a recipe can name, in one explicit table (no registration by import).

Each entry gives the pydantic model of its parameters, which fields name models, and a
function that builds the operation from those parameters and the resolved models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from surgery.errors import UsageError
from surgery.expr import Weights
from surgery.methods import (
    hft,
    layer_scaling,
    layers,
    lora_extract,
    pass_through,
    soup,
    sparse,
    sphere_means,
    spherical,
    stock,
    swaps,
    task_merges,
    ties_dare,
)
from surgery.methods.schedule import ModelScheduled, Scheduled

Resolve = Callable[[str], Weights]


@dataclass(frozen=True)
class Operation:
    """A recipe operation. ``model_fields`` name inputs or steps that yield models;
    ``data_fields`` hold a data file's path or the name of a step that yields data
    (``yields="data"``, such as ``distill_data``), whose value is then a data source."""

    name: str
    summary: str
    reference: str | None
    params: type[BaseModel]
    model_fields: tuple[str, ...]
    build: Callable[[Any, Resolve], Any]
    data_fields: tuple[str, ...] = ()
    yields: Literal["model", "data"] = "model"


def _build_linear(p: soup.LinearParams, get: Resolve) -> Weights:
    return soup.linear([get(m) for m in p.models], p.weights, p.normalize, p.layer_pattern)


def _build_task_arithmetic(p: soup.TaskArithmeticParams, get: Resolve) -> Weights:
    return soup.task_arithmetic(get(p.base), [get(m) for m in p.models], p.weights,
                                p.lambda_, p.normalize, p.layer_pattern)


def _build_sparse_apply(p: sparse.SparseApplyParams, get: Resolve) -> Weights:
    return sparse.apply_sparse_deltas(get(p.base), [sparse.SparseDeltaFile(d) for d in p.deltas],
                                      ignore_base_hash=p.ignore_base_hash)


def _build_sparse_revert(p: sparse.SparseRevertParams, get: Resolve) -> Weights:
    return sparse.revert_sparse_deltas(get(p.base),
                                       [sparse.SparseDeltaFile(d) for d in p.deltas])


def _build_sparsify(p: sparse.SparsifyParams, get: Resolve) -> Weights:
    return sparse.sparsify(get(p.base), get(p.model), p.density, per_tensor=p.per_tensor,
                           maskable=p.maskable)


def _build_hft_reset(p: hft.HftResetParams, get: Resolve) -> Weights:
    return hft.hft_reset(get(p.base), get(p.model), p.seed, reset_embeddings=p.reset_embeddings,
                         reset_head=p.reset_head)


def _build_drop_layers(p: layers.DropLayersParams, get: Resolve) -> Weights:
    return layers.drop_layers(get(p.model), p.blocks())


def _build_keep_first_layers(p: layers.KeepFirstLayersParams, get: Resolve) -> Weights:
    return layers.keep_first_layers(get(p.model), p.n)


def _build_stack_layers(p: layers.StackLayersParams, get: Resolve) -> Weights:
    if len(p.models) != len(p.ranges):
        raise UsageError(f"stack_layers: ranges has {len(p.ranges)} entries for "
                         f"{len(p.models)} models")
    return layers.stack_layers([(get(m), s, e) for m, (s, e) in zip(p.models, p.ranges,
                                                                     strict=True)],
                               p.head_from)
def _build_ties(p: ties_dare.TiesParams, get: Resolve) -> Weights:
    return ties_dare.ties(get(p.base), [get(m) for m in p.models], p.density, p.weights, p.lambda_,
                     p.consensus, p.normalize, p.layer_pattern)


def _build_dare_linear(p: ties_dare.DareLinearParams, get: Resolve) -> Weights:
    return ties_dare.dare_linear(get(p.base), [get(m) for m in p.models], p.density, p.weights,
                            p.lambda_, p.rescale, p.normalize, p.layer_pattern)


def _build_dare_ties(p: ties_dare.DareTiesParams, get: Resolve) -> Weights:
    return ties_dare.dare_ties(get(p.base), [get(m) for m in p.models], p.density, p.weights,
                          p.lambda_, p.rescale, p.consensus, p.normalize, p.layer_pattern)


def _build_slerp(p: spherical.SlerpParams, get: Resolve) -> Weights:
    return spherical.slerp(get(p.a), get(p.b), p.t, p.epsilon, p.layer_pattern)


def _build_extract_lora(p: lora_extract.ExtractLoraParams, get: Resolve
                        ) -> lora_extract.ExtractedAdapter:
    return lora_extract.ExtractedAdapter(get(p.model), get(p.base), p)


def _build_lines(p: layer_scaling.LinesParams, get: Resolve) -> Weights:
    return layer_scaling.lines(get(p.base), get(p.model), p.alpha, p.beta, c=p.c,
                       tasks=None if p.tasks is None else [get(t) for t in p.tasks],
                       layer_pattern=p.layer_pattern)


def _build_model_stock(p: stock.ModelStockParams, get: Resolve) -> Weights:
    return stock.model_stock(get(p.base), [get(m) for m in p.models], p.filter_wise)


def _build_breadcrumbs(p: task_merges.BreadcrumbsParams, get: Resolve) -> Weights:
    return task_merges.breadcrumbs(get(p.base), [get(m) for m in p.models], p.density, p.gamma,
                                   p.weights, p.lambda_, p.normalize, p.rescale,
                                   p.tie_break, p.layer_pattern)


def _build_breadcrumbs_ties(p: task_merges.BreadcrumbsParams, get: Resolve) -> Weights:
    return task_merges.breadcrumbs_ties(get(p.base), [get(m) for m in p.models], p.density,
                                        p.gamma, p.weights, p.lambda_, p.normalize, p.rescale,
                                        p.tie_break, p.layer_pattern)


def _build_della(p: task_merges.DellaParams, get: Resolve) -> Weights:
    return task_merges.della(get(p.base), [get(m) for m in p.models], p.density, p.epsilon,
                             p.weights, p.lambda_, p.normalize, p.rescale, p.rng,
                             p.layer_pattern)


def _build_della_linear(p: task_merges.DellaLinearParams, get: Resolve) -> Weights:
    return task_merges.della_linear(get(p.base), [get(m) for m in p.models], p.density,
                                    p.epsilon, p.weights, p.lambda_, p.normalize, p.rescale,
                                    p.rng, p.layer_pattern)


def _build_nuslerp(p: sphere_means.NuslerpParams, get: Resolve) -> Weights:
    return sphere_means.nuslerp([get(m) for m in p.models], p.weights,
                                get(p.base) if p.base else None, p.row_wise, p.flatten,
                                p.layer_pattern)


def _build_multislerp(p: sphere_means.MultislerpParams, get: Resolve) -> Weights:
    return sphere_means.multislerp([get(m) for m in p.models], p.weights,
                                   get(p.base) if p.base else None, p.normalize_weights, p.eps,
                                   p.layer_pattern)


def _build_karcher(p: sphere_means.KarcherParams, get: Resolve) -> Weights:
    return sphere_means.karcher([get(m) for m in p.models], p.max_iter, p.tol)


def _build_sce(p: task_merges.SceParams, get: Resolve) -> Weights:
    return task_merges.sce(get(p.base), [get(m) for m in p.models], p.select_topk)


def _build_ram(p: task_merges.RamParams, get: Resolve) -> Weights:
    return task_merges.ram(get(p.base), [get(m) for m in p.models], p.epsilon)


def _build_ramplus_tl(p: task_merges.RamPlusParams, get: Resolve) -> Weights:
    return task_merges.ramplus_tl(get(p.base), [get(m) for m in p.models], p.r, p.alpha,
                                  p.epsilon)


def _build_nearswap(p: swaps.NearswapParams, get: Resolve) -> Weights:
    return swaps.nearswap(get(p.base), get(p.model), p.t, p.layer_pattern)


def _build_arcee_fusion(p: swaps.ArceeFusionParams, get: Resolve) -> Weights:
    return swaps.arcee_fusion(get(p.base), get(p.model))



def _build_passthrough(p: pass_through.PassthroughParams, get: Resolve) -> Weights:
    return pass_through.passthrough(get(p.model), p.scale, p.layer_pattern)

OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("linear", "Weighted average of models (uniform soup with equal weights)",
                  soup.SOUP_REF, soup.LinearParams, ("models",), _build_linear),
        Operation("task_arithmetic", "Base plus the weighted sum of task vectors",
                  soup.TASK_ARITHMETIC_REF, soup.TaskArithmeticParams,
                  ("base", "models"), _build_task_arithmetic),
        Operation("sparse_apply", "Base plus sparse deltas (files), composed by addition",
                  sparse.SPARSE_REF, sparse.SparseApplyParams, ("base",), _build_sparse_apply),
        Operation("sparse_revert", "Model minus sparse deltas (files): undoes sparse_apply",
                  sparse.SPARSE_REF, sparse.SparseRevertParams, ("base",), _build_sparse_revert),
        Operation("sparsify", "Base plus the top-K magnitude entries of a fine-tune's update",
                  sparse.SPARSE_REF, sparse.SparsifyParams, ("base", "model"), _build_sparsify),
        Operation("hft_reset", "Reset a seeded half of each block's modules to the base",
                  hft.HFT_REF, hft.HftResetParams, ("base", "model"), _build_hft_reset),
        Operation("drop_layers", "Remove blocks (list or range) and renumber the rest",
                  layers.LAYER_SURGERY_REF, layers.DropLayersParams, ("model",),
                  _build_drop_layers),
        Operation("keep_first_layers", "Sub-model of the first n blocks with embeddings and head",
                  layers.LAYER_SURGERY_REF, layers.KeepFirstLayersParams, ("model",),
                  _build_keep_first_layers),
        Operation("stack_layers", "Concatenate or interleave block ranges of several models",
                  layers.LAYER_SURGERY_REF, layers.StackLayersParams, ("models",),
                  _build_stack_layers),
        Operation("ties", "Trim, elect sign, disjoint merge of task vectors", ties_dare.TIES_REF,
                  ties_dare.TiesParams, ("base", "models"), _build_ties),
        Operation("dare_linear", "Drop and rescale task vectors, then add them", ties_dare.DARE_REF,
                  ties_dare.DareLinearParams, ("base", "models"), _build_dare_linear),
        Operation("dare_ties", "Drop and rescale task vectors, then TIES sign election",
                  ties_dare.DARE_REF, ties_dare.DareTiesParams, ("base", "models"),
                  _build_dare_ties),
        Operation("slerp", "Spherical interpolation between two models", spherical.SLERP_REF,
                  spherical.SlerpParams, ("a", "b"), _build_slerp),
        Operation("lines", "Scale a task vector by block depth (layer-increasing)",
                  layer_scaling.LINES_REF, layer_scaling.LinesParams,
                  ("base", "model", "tasks"), _build_lines),
        Operation("model_stock", "Base moved towards the fine-tunes' average by their angle",
                  stock.MODEL_STOCK_REF, stock.ModelStockParams, ("base", "models"),
                  _build_model_stock),
        Operation("breadcrumbs", "Drop the smallest and largest updates, then add them",
                  task_merges.BREADCRUMBS_REF, task_merges.BreadcrumbsParams,
                  ("base", "models"), _build_breadcrumbs),
        Operation("breadcrumbs_ties", "Breadcrumbs' drops, then TIES sign election",
                  task_merges.BREADCRUMBS_REF, task_merges.BreadcrumbsParams,
                  ("base", "models"), _build_breadcrumbs_ties),
        Operation("della", "Magnitude-ranked random drops (MagPrune), then TIES election",
                  task_merges.DELLA_REF, task_merges.DellaParams, ("base", "models"),
                  _build_della),
        Operation("della_linear", "Magnitude-ranked random drops (MagPrune), then add them",
                  task_merges.DELLA_REF, task_merges.DellaLinearParams, ("base", "models"),
                  _build_della_linear),
        Operation("nuslerp", "SLERP of two models or of their task vectors from a base",
                  sphere_means.NUSLERP_REF, sphere_means.NuslerpParams, ("models", "base"),
                  _build_nuslerp),
        Operation("multislerp", "Barycentric interpolation of many models on the sphere",
                  sphere_means.MULTISLERP_REF, sphere_means.MultislerpParams,
                  ("models", "base"), _build_multislerp),
        Operation("karcher", "Karcher mean of models on the hypersphere",
                  sphere_means.KARCHER_REF, sphere_means.KarcherParams, ("models",),
                  _build_karcher),
        Operation("sce", "Select high-variance entries, weight by energy, erase sign conflicts",
                  task_merges.SCE_REF, task_merges.SceParams, ("base", "models"), _build_sce),
        Operation("ram", "Unique updates kept whole, shared ones averaged",
                  task_merges.RAM_REF, task_merges.RamParams, ("base", "models"), _build_ram),
        Operation("ramplus_tl", "RAM with unique updates scaled by the overlap ratio",
                  task_merges.RAM_REF, task_merges.RamPlusParams, ("base", "models"),
                  _build_ramplus_tl),
        Operation("nearswap", "Take the model's value where it is close to the base's",
                  swaps.NEARSWAP_REF, swaps.NearswapParams, ("base", "model"),
                  _build_nearswap),
        Operation("arcee_fusion", "Add the model's updates of outlying importance (KL-weighted)",
                  swaps.ARCEE_FUSION_REF, swaps.ArceeFusionParams, ("base", "model"),
                  _build_arcee_fusion),
        Operation("passthrough", "One model's tensors, each optionally scaled",
                  pass_through.PASSTHROUGH_REF, pass_through.PassthroughParams, ("model",),
                  _build_passthrough),
        Operation("extract_lora", "A fine-tune's task vector as a PEFT LoRA adapter (truncated "
                  "SVD per linear layer), written to out", lora_extract.LORA_EXTRACT_REF,
                  lora_extract.ExtractLoraParams, ("model", "base"), _build_extract_lora,
                  yields="data"),
    )
}


@dataclass(frozen=True)
class ParamInfo:
    """One recipe parameter of an operation, for ``surgery methods``."""

    name: str
    type: str
    default: str | None
    description: str | None


def describe_params(op: Operation) -> list[ParamInfo]:
    """The recipe keys of ``op`` with their types and defaults (None: required)."""
    out = []
    for name, f in op.params.model_fields.items():
        default = None if f.is_required() else repr(f.get_default(call_default_factory=True))
        out.append(ParamInfo(f.alias or name, _type_name(f.annotation), default,
                             f.description))
    return out


def _type_name(annotation: Any) -> str:
    if annotation is Scheduled:
        return "schedule"
    if annotation is ModelScheduled:
        return "schedule or {per_model: [schedule, ...]}"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))
