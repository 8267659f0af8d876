"""mergekit configs (``mergekit-yaml`` 0.1.5) translated into native recipes.

A config is recognised by its ``merge_method`` key. The translation builds the graph mergekit
builds, and every key is accounted for: one we do not support is an error naming the key and
its YAML line (mergekit ignores unknown keys; we never do).

- ``models`` become one slice of every model's whole block range (plus the base model when it
  is not listed), as mergekit normalises them; ``slices`` with ``sources`` and ``layer_range``
  are taken as written. A slice whose sources are not whole models is cut out with
  ``stack_layers``, merged, and the merged slices are stacked, the embeddings coming from the
  first slice and the final norm and head from the last (``head_from``), as in mergekit.
- Parameters are resolved per tensor as mergekit's ``ConditionalParameter`` does: the scopes in
  precedence order (the source's own, the slice's, the top-level ``parameters``), within a
  scope the FIRST rule whose ``filter`` is a substring of the tensor name (shared parameters see
  the output tensor name, per-model ones the input's), and gradients interpolated at
  t = i/(n−1) for block i of an n-block slice (t = 1 when n = 1; t = 0 outside the blocks).
  The values are written into the recipe as a scalar when constant, else as rules naming each
  tensor that differs from the most common value (exact names beat ``*`` in our rules), so
  the native recipe needs no first-match semantics.
- :data:`METHODS` maps each mergekit method onto one of our operations; adding an operation is
  one entry. A method without an entry is refused, naming it and its line.

Everything is checked from headers before a weight is read: every model is opened, every
``layer_range`` is checked against the model's block count, every ``filter`` must match some
tensor, and each method's inputs (its base, its number of models) are checked.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from surgery.checkpoint import Checkpoint, open_checkpoint
from surgery.errors import RecipeError, UsageError
from surgery.methods.layers import rename_block
from surgery.methods.schedule import in_closed_unit_interval, in_unit_interval, interpolate
from surgery.names import count_layers, layer_index
from surgery.recipe.build import Recipe, build_recipe
from surgery.recipe.chat_templates import NAMED, REFUSED
from surgery.recipe.yamlloc import Loc, Located, load_located

REQUIRED = object()
Scope = Literal["shared", "input", "non_base"]


@dataclass(frozen=True)
class Param:
    """One parameter of a mergekit method and where its value goes in our operation.

    ``to`` is our recipe key (None: accepted, no effect on the result); ``per_model``: our
    key takes one value per model (a list, as ``weights``), else a per-model parameter
    (``non_base`` or ``input`` scope) is one value when every model has the same and
    ``{per_model: [...]}`` when they differ (``density``); ``check`` returns what is wrong
    with a value (out of range), reported at its YAML line naming the model; ``values`` maps
    mergekit's values of a discrete parameter to ours (a value missing from it is refused with
    ``refuse``); ``inert`` marks a parameter mergekit accepts but ignores for this method,
    which we refuse rather than ignore."""

    name: str
    kind: type
    scope: Scope
    default: Any = REQUIRED
    to: str | None = None
    per_model: bool = False
    values: dict[Any, Any] | None = None
    refuse: str = ""
    inert: bool = False
    unset: Any = None  # our value where mergekit's resolves to None
    check: Callable[[float], str | None] | None = None


@dataclass(frozen=True)
class MethodMap:
    """A mergekit method as one of our operations. ``base``: ``required`` (our op takes it
    as ``base_key``), ``optional`` (as ``base_key`` when the config has one) or ``ignored``
    (mergekit lists it with the inputs; so do we).
    ``model_key`` is where the non-base models go (a list key, or ``a``/``b`` pairs for two
    models); ``fixed`` holds our parameters set to mergekit's behaviour."""

    op: str
    params: tuple[Param, ...]
    base: Literal["required", "optional", "ignored"] = "ignored"
    base_key: str = "base"
    model_key: str = "models"
    min_models: int = 1
    max_models: int | None = None
    fixed: dict[str, Any] = field(default_factory=dict)


_INT8 = Param("int8_mask", bool, "shared", False)  # mergekit's mask dtype: same result
_LAMBDA = Param("lambda", float, "shared", 1.0, to="lambda")
_WEIGHT = Param("weight", float, "non_base", to="weights", per_model=True)
_DENSITY = Param("density", float, "non_base", 1.0, to="density", check=in_unit_interval)
_GAMMA = Param("gamma", float, "non_base", 0.01, to="gamma", check=in_closed_unit_interval)
_EPSILON = Param("epsilon", float, "non_base", 0.15, to="epsilon",
                 check=lambda v: None if v >= 0 else "is negative")
_NO_SPARSIFY = "has no effect in mergekit's task_arithmetic (it does not sparsify); remove it"

METHODS: dict[str, MethodMap] = {
    "linear": MethodMap("linear", (
        Param("weight", float, "input", to="weights", per_model=True),
        Param("normalize", bool, "shared", True, to="normalize"),
    )),
    "task_arithmetic": MethodMap("task_arithmetic", (
        _INT8, _LAMBDA, _WEIGHT,
        Param("normalize", bool, "shared", False, to="normalize"),
        Param("rescale", bool, "shared", False, inert=True, refuse=_NO_SPARSIFY),
        Param("density", float, "non_base", 1.0, inert=True, refuse=_NO_SPARSIFY),
    ), base="required"),
    "ties": MethodMap("ties", (
        _INT8, _LAMBDA, _WEIGHT, _DENSITY,
        Param("normalize", bool, "shared", True, to="normalize"),
        Param("rescale", bool, "shared", False, values={False: None},
              refuse="TIES with an L1 rescale of the trimmed vector is not an option of our "
                     "ties"),
    ), base="required", fixed={"consensus": "sum"}),
    "dare_linear": MethodMap("dare_linear", (
        _INT8, _LAMBDA, _WEIGHT, _DENSITY,
        Param("normalize", bool, "shared", False, to="normalize"),
        Param("rescale", bool, "shared", True, to="rescale", values={True: "l1"},
              refuse="DARE without rescaling is not an option of our dare_linear"),
    ), base="required"),
    "dare_ties": MethodMap("dare_ties", (
        _INT8, _LAMBDA, _WEIGHT, _DENSITY,
        Param("normalize", bool, "shared", False, to="normalize"),
        Param("rescale", bool, "shared", True, to="rescale", values={True: "l1"},
              refuse="DARE without rescaling is not an option of our dare_ties"),
    ), base="required", fixed={"consensus": "sum"}),
    "slerp": MethodMap("slerp", (Param("t", float, "shared", to="t"),),
                       base="required", base_key="a", model_key="b", min_models=1,
                       max_models=1, fixed={"epsilon": 5e-4}),  # mergekit: |cos| > 0.9995
    "breadcrumbs": MethodMap("breadcrumbs", (
        _INT8, _LAMBDA, _WEIGHT, _DENSITY, _GAMMA,
        Param("normalize", bool, "shared", False, to="normalize"),
        Param("rescale", bool, "shared", False, to="rescale"),
    ), base="required", fixed={"tie_break": "torch_sort"}),  # mergekit's argsort order
    "breadcrumbs_ties": MethodMap("breadcrumbs_ties", (
        _INT8, _LAMBDA, _WEIGHT, _DENSITY, _GAMMA,
        Param("normalize", bool, "shared", False, to="normalize"),
        Param("rescale", bool, "shared", False, to="rescale"),
    ), base="required", fixed={"tie_break": "torch_sort"}),
    "della": MethodMap("della", (
        _INT8, _LAMBDA, _WEIGHT, _DENSITY, _EPSILON,
        Param("normalize", bool, "shared", True, to="normalize"),
        Param("rescale", bool, "shared", True, to="rescale", values={True: "l1", False: "none"}),
    ), base="required"),
    "della_linear": MethodMap("della_linear", (
        _INT8, _LAMBDA, _WEIGHT, _DENSITY, _EPSILON,
        Param("normalize", bool, "shared", False, to="normalize"),
        Param("rescale", bool, "shared", True, to="rescale", values={True: "l1", False: "none"}),
    ), base="required"),
    "model_stock": MethodMap("model_stock", (
        Param("filter_wise", bool, "shared", False, to="filter_wise"),
    ), base="required", min_models=2),
    "nuslerp": MethodMap("nuslerp", (
        _WEIGHT,
        Param("nuslerp_row_wise", bool, "shared", False, to="row_wise"),
        Param("nuslerp_flatten", bool, "shared", True, to="flatten"),
    ), base="optional", min_models=2, max_models=2),
    "multislerp": MethodMap("multislerp", (
        _WEIGHT,
        Param("normalize_weights", bool, "shared", True, to="normalize_weights"),
        Param("eps", float, "shared", 1e-8, to="eps"),
    ), base="optional"),
    "karcher": MethodMap("karcher", (
        Param("max_iter", int, "shared", 10, to="max_iter"),
        Param("tol", float, "shared", 1e-5, to="tol"),
    )),
    "sce": MethodMap("sce", (_INT8, Param("select_topk", float, "shared", 1.0,
                                          to="select_topk")), base="required"),
    "nearswap": MethodMap("nearswap", (Param("t", float, "shared", to="t"),), base="required",
                          model_key="model", max_models=1),
    "arcee_fusion": MethodMap("arcee_fusion", (), base="required", model_key="model",
                              max_models=1),
    "ram": MethodMap("ram", (Param("epsilon", float, "shared", 1e-5, to="epsilon"),),
                     base="required"),
    "ramplus_tl": MethodMap("ramplus_tl", (
        Param("epsilon", float, "shared", 1e-5, to="epsilon"),
        Param("r", float, "shared", 0.1, to="r"),
        Param("alpha", float, "shared", 0.2, to="alpha"),
    ), base="required"),
    "passthrough": MethodMap("stack_layers", (Param("scale", float, "input", None),),
                             max_models=1),
}
"""mergekit method name -> our operation. passthrough is layer stacking (slices), the model
itself (models), or our passthrough step when it has a ``scale``."""

_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype",
             "out_dtype", "tokenizer_source", "tokenizer", "chat_template"}
_REFUSED_TOP = {
    "modules": "per-module configs (multimodal models) are not supported; use models or slices",
}
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class Source:
    """One slice source: a model's block range and its own parameters."""

    model: str  # the input name in the native recipe
    start: int
    end: int
    params: dict[str, Any]
    loc: Loc


@dataclass
class Slice:
    sources: list[Source]
    params: dict[str, Any]
    loc: Loc
    base: str | None = None  # the slice's own base_model (else the config's)


@dataclass
class Translation:
    """The native recipe (a dict, ready to dump) and what the CLI may tell the user."""

    recipe: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    located: Located | None = None

    def text(self, header: str = "") -> str:
        body = yaml.safe_dump(self.recipe, sort_keys=False, default_flow_style=None, width=100)
        return header + body


def is_mergekit_config(text: str) -> bool:
    """True when the YAML text is a mapping with a ``merge_method`` key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "merge_method" in data


def _scalar_ok(v: Any) -> bool:
    return isinstance(v, (int, float, bool, str)) and v is not None


class _Translator:
    def __init__(self, located: Located) -> None:
        self.doc = located
        self.data: dict[str, Any] = located.data
        self.inputs: dict[str, str] = {}  # input name -> model reference
        self.refs: dict[str, str] = {}  # model reference -> input name
        self.checkpoints: dict[str, Checkpoint] = {}
        self.steps: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []

    def err(self, loc: Loc, message: str) -> RecipeError:
        return self.doc.error(loc, message)

    # -- models -------------------------------------------------------------------------
    def model(self, ref: Any, loc: Loc) -> str:
        """The input name of a model reference, opening it (headers only) on first use."""
        if not isinstance(ref, str) or not ref:
            raise self.err(loc, "a model is a Hub id or a local path (mergekit's dict form "
                           "of a model reference is not supported)")
        if "+" in ref:
            raise self.err(loc, f"{ref!r}: model+LoRA references are not supported; merge the "
                           "adapter into the model first")
        if ref in self.refs:
            return self.refs[ref]
        try:
            ck = open_checkpoint(ref)
        except UsageError as e:
            raise self.err(loc, f"model {ref!r}: {e}") from None
        stem = re.sub(r"[^A-Za-z0-9_]+", "_", Path(ref.split("@")[0]).name).strip("_")
        name = stem or "model"
        n = 2
        while name in self.inputs or name in ("merged", "base_model"):
            name, n = f"{stem}_{n}", n + 1
        self.inputs[name] = ref
        self.refs[ref] = name
        self.checkpoints[name] = ck
        return name

    def layers(self, name: str) -> int:
        ck = self.checkpoints[name]
        return count_layers(ck.tensors, ck.config)

    # -- structure ----------------------------------------------------------------------
    def params_of(self, raw: Any, loc: Loc, method: MethodMap, method_name: str
                  ) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.err(loc, "parameters is a mapping of parameter names to values")
        known = {p.name: p for p in method.params}
        for key, value in raw.items():
            at = (*loc, key)
            if key not in known:
                allowed = ", ".join(known) or "none"
                raise self.err(at, f"mergekit's {method_name} has no parameter {key!r} "
                               f"(it takes: {allowed})")
            if known[key].inert:
                raise self.err(at, known[key].refuse)
            self.check_setting(value, at)
        return raw

    def check_setting(self, value: Any, loc: Loc) -> None:
        if _scalar_ok(value):
            return
        if isinstance(value, dict):
            extra = set(value) - {"filter", "value"}
            if extra:
                raise self.err((*loc, sorted(extra)[0]), "unknown key in a conditional "
                               "parameter (allowed: filter, value)")
            if "value" not in value:
                raise self.err(loc, "a conditional parameter needs value:")
            if value.get("filter") is not None and not isinstance(value["filter"], str):
                raise self.err((*loc, "filter"), "filter is a substring of tensor names")
            self.check_setting(value["value"], (*loc, "value"))
            return
        if isinstance(value, list) and value:
            if all(_scalar_ok(v) for v in value):
                return
            for i, v in enumerate(value):
                if not isinstance(v, dict):
                    raise self.err((*loc, i), "a list is either a gradient (numbers) or "
                                   "conditional parameters ({filter, value})")
                self.check_setting(v, (*loc, i))
            return
        raise self.err(loc, f"expected a number, a gradient or conditional parameters "
                       f"(got {value!r})")

    def slices(self, method: MethodMap, method_name: str) -> list[Slice]:
        data = self.data
        has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
        if has_models == has_slices:
            raise self.err((), "give exactly one of models or slices")
        base = data.get("base_model")
        base_name = self.model(base, ("base_model",)) if base is not None else None
        if has_models:
            models = data["models"]
            if not isinstance(models, list) or not models:
                raise self.err(("models",), "models is a list of {model, parameters}")
            sources = []
            for i, entry in enumerate(models):
                at: Loc = ("models", i)
                if isinstance(entry, str):
                    entry = {"model": entry}
                if not isinstance(entry, dict) or "model" not in entry:
                    raise self.err(at, "each entry needs model:")
                for key in entry:
                    if key not in ("model", "parameters"):
                        raise self.err((*at, key), "unknown key (allowed: model, parameters)")
                name = self.model(entry["model"], (*at, "model"))
                params = self.params_of(entry.get("parameters"), (*at, "parameters"), method,
                                        method_name)
                sources.append(Source(name, 0, self.layers(name), params, at))
            if base_name is not None and all(s.model != base_name for s in sources):
                sources.append(Source(base_name, 0, self.layers(base_name), {},
                                      ("base_model",)))
            return [Slice(sources, {}, ("models",))]
        raw = data["slices"]
        if not isinstance(raw, list) or not raw:
            raise self.err(("slices",), "slices is a list of {sources: [...]}")
        out = []
        for k, sl in enumerate(raw):
            at = ("slices", k)
            if not isinstance(sl, dict) or "sources" not in sl:
                raise self.err(at, "each slice needs sources:")
            for key in sl:
                if key == "residual_weight":
                    raise self.err((*at, key), "residual_weight is not supported")
                if key not in ("sources", "parameters", "base_model"):
                    raise self.err((*at, key), "unknown key (allowed: sources, parameters, "
                                   "base_model)")
            slice_base = (self.model(sl["base_model"], (*at, "base_model"))
                          if sl.get("base_model") is not None else None)
            if not isinstance(sl["sources"], list) or not sl["sources"]:
                raise self.err((*at, "sources"), "sources is a list of {model, layer_range}")
            sources = []
            for j, src in enumerate(sl["sources"]):
                sat: Loc = (*at, "sources", j)
                if not isinstance(src, dict) or "model" not in src:
                    raise self.err(sat, "each source needs model: and layer_range:")
                for key in src:
                    if key not in ("model", "layer_range", "parameters"):
                        raise self.err((*sat, key), "unknown key (allowed: model, "
                                       "layer_range, parameters)")
                name = self.model(src["model"], (*sat, "model"))
                rng = src.get("layer_range")
                if not (isinstance(rng, list) and len(rng) == 2
                        and all(isinstance(v, int) and not isinstance(v, bool) for v in rng)):
                    raise self.err((*sat, "layer_range"), "layer_range is [start, end]")
                count = self.layers(name)
                if not 0 <= rng[0] < rng[1] <= count:
                    raise self.err((*sat, "layer_range"),
                                   f"[{rng[0]}, {rng[1]}] is past the end of "
                                   f"{self.inputs[name]} ({count} layers: 0 <= start < end "
                                   f"<= {count})")
                params = self.params_of(src.get("parameters"), (*sat, "parameters"), method,
                                        method_name)
                sources.append(Source(name, rng[0], rng[1], params, sat))
            lengths = {s.end - s.start for s in sources}
            if len(lengths) > 1:
                raise self.err((*at, "sources"), "all sources of a slice need the same number "
                               f"of layers (got {sorted(lengths)})")
            out.append(Slice(sources, self.params_of(sl.get("parameters"), (*at, "parameters"),
                                                     method, method_name), at, slice_base))
        return out


@dataclass
class _Resolver:
    """mergekit's parameter resolution for one merged slice, recording which filters hit."""

    tr: _Translator
    slice: Slice
    top: dict[str, Any]
    hits: set[Loc]
    gradients: dict[str, list[list[float]]] = field(default_factory=dict)

    def scopes(self, model: str | None) -> list[tuple[dict[str, Any], Loc]]:
        out = []
        if model is not None:
            out += [(s.params, (*s.loc, "parameters")) for s in self.slice.sources
                    if s.model == model]
        out.append((self.slice.params, (*self.slice.loc, "parameters")))
        out.append((self.top, ("parameters",)))
        return out

    def value(self, p: Param, model: str | None, tensor: str, t: float) -> Any:
        for scope, loc in self.scopes(model):
            if p.name in scope:
                v = self.evaluate(scope[p.name], (*loc, p.name), p, tensor, t, model)
                if v is not None:
                    return v
        if p.default is REQUIRED:
            at = next((s.loc for s in self.slice.sources if s.model == model), self.slice.loc)
            who = f" of {self.tr.inputs[model]}" if model else ""
            raise self.tr.err(at, f"missing required parameter {p.name!r} for tensor "
                              f"{tensor}{who}")
        return p.default

    def evaluate(self, setting: Any, loc: Loc, p: Param, tensor: str, t: float,
                 model: str | None) -> Any:
        if isinstance(setting, dict):  # one conditional
            conds = [(setting, loc)]
        elif isinstance(setting, list) and setting and isinstance(setting[0], dict):
            conds = [(c, (*loc, i)) for i, c in enumerate(setting)]
        else:
            return self.scalar_or_gradient(setting, loc, p, t, model)
        for cond, at in conds:
            f = cond.get("filter")
            if f is None or f == "*" or f in tensor:
                if f is not None:
                    self.hits.add(at)
                return self.evaluate(cond["value"], (*at, "value"), p, tensor, t, model)
        return None

    def scalar_or_gradient(self, setting: Any, loc: Loc, p: Param, t: float,
                           model: str | None) -> Any:
        if not isinstance(setting, list):
            return self.checked(self.validate(setting, loc, p), loc, p, model)
        values = [self.checked(self.validate(v, (*loc, i), p), (*loc, i), p, model)
                  for i, v in enumerate(setting)]
        seen = self.gradients.setdefault(p.name, [])
        if p.kind is float and values not in seen:
            seen.append(values)
        if p.kind is not float:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return float((1 - frac) * values[i0] + frac * values[i1])

    def checked(self, v: Any, loc: Loc, p: Param, model: str | None) -> Any:
        """``v`` when ``p.check`` finds nothing wrong with it (interpolation stays between
        a gradient's values, so checking those covers every tensor's)."""
        problem = p.check(v) if p.check is not None else None
        if problem:
            who = f" for model {self.tr.inputs[model]}" if model is not None else ""
            raise self.tr.err(loc, f"{p.name} {v!r}{who} {problem}")
        return v

    def validate(self, v: Any, loc: Loc, p: Param) -> Any:
        if p.kind is bool:
            if isinstance(v, bool):
                return v
            raise self.tr.err(loc, f"{p.name} is true or false (got {v!r})")
        if p.kind is int:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
                raise self.tr.err(loc, f"{p.name} is a whole number (got {v!r})")
            return int(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            try:
                return float(v)
            except (TypeError, ValueError):
                raise self.tr.err(loc, f"{p.name} is a number (got {v!r})") from None
        return float(v)


def _emit(values: dict[str, Any], gradients: list[list[float]], n: int) -> Any:
    """Per-tensor values as a native schedule: a scalar; else one of the config's gradients
    when our depth gradient gives exactly these values; else rules naming the tensors that
    differ from the most common value (the catch-all ``*``)."""
    counts = Counter(values.values())
    common = counts.most_common(1)[0][0]
    if len(counts) == 1:
        return common
    for gradient in gradients:
        if all(interpolate(gradient, _fraction(name, n)) == v for name, v in values.items()):
            return gradient
    rules = [{"match": "*", "value": common}]
    rules += [{"match": name, "value": v} for name, v in values.items() if v != common]
    return rules


def translate(text: str, source: str = "mergekit.yml", out_path: str = "merged", *,
              device: str | None = None, shard_size: int | str | None = None) -> Translation:
    """A mergekit config as a native recipe writing to ``out_path`` (on ``device``, in shards
    of ``shard_size``); every error names its YAML line. Models are opened (headers only) to
    check layer ranges and filters."""
    located = load_located(text, source)
    if not isinstance(located.data, dict) or "merge_method" not in located.data:
        raise RecipeError(f"{source}: not a mergekit config (no merge_method)")
    tr = _Translator(located)
    data = located.data
    for key in data:
        if key in _REFUSED_TOP:
            raise tr.err((key,), _REFUSED_TOP[key])
        if key not in _TOP_KEYS:
            raise tr.err((key,), f"unknown key (mergekit would ignore it; we do not). Allowed: "
                         f"{', '.join(sorted(_TOP_KEYS))}")
    method_name = data["merge_method"]
    if not isinstance(method_name, str):
        raise tr.err(("merge_method",), "merge_method is a method name")
    method = METHODS.get(method_name)
    if method is None:
        raise tr.err(("merge_method",), f"mergekit's {method_name!r} has no equivalent here "
                     f"yet (supported: {', '.join(METHODS)})")
    top = tr.params_of(data.get("parameters"), ("parameters",), method, method_name)
    slices = tr.slices(method, method_name)
    base = tr.refs.get(data["base_model"]) if data.get("base_model") is not None else None
    hits: set[Loc] = set()
    if method_name == "passthrough":
        merged = _passthrough(tr, slices, top, hits)
    else:
        merged = _merge_slices(tr, method, method_name, slices, base, top, hits)
    _check_filters(tr, hits)
    output: dict[str, Any] = {"from": merged, "path": out_path}
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in _DTYPES:
            raise tr.err((key,), f"unknown dtype {data[key]!r} (float32, float16, bfloat16)")
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        output["dtype"] = _DTYPES[dtype]
    if data.get("dtype") is not None and _DTYPES[data["dtype"]] != "float32":
        tr.notes.append(f"dtype: {data['dtype']}: mergekit computes in that dtype; we compute "
                        "in float32 and round once on output, so results may differ from "
                        "mergekit's in the last bits")
    if shard_size is not None:
        output["shard_size"] = shard_size
    if device is not None:
        output["device"] = device
    recipe: dict[str, Any] = {"inputs": dict(tr.inputs)}
    tokenizer = _tokenizer(tr, data, base, slices, recipe)
    if "vocabulary" not in recipe:
        output["tokenizer_from"] = tokenizer
    if data.get("chat_template") is not None:
        template = _chat_template(tr, data["chat_template"], tokenizer)
        if template is not None:
            output["chat_template"] = template
    recipe.update({"steps": tr.steps, "output": output})
    return Translation(recipe, tr.notes, located)


def _tokenizer(tr: _Translator, data: dict[str, Any], base: str | None,
               slices: list[Slice], recipe: dict[str, Any]) -> str:
    """The input whose tokenizer the output takes (for the chat template's check). With
    ``tokenizer_source`` (or a ``tokenizer:`` section) every model is laid out in that
    vocabulary first, as mergekit does: the recipe gets a vocabulary section."""
    first = base or slices[0].sources[0].model
    section = data.get("tokenizer")
    if section is not None and data.get("tokenizer_source") is not None:
        raise tr.err(("tokenizer",), "give tokenizer_source or a tokenizer: section, not both "
                     "(mergekit would use the section)")
    at: Loc = ("tokenizer_source",)
    src = data.get("tokenizer_source")
    pad = None
    if section is not None:
        if not isinstance(section, dict):
            raise tr.err(("tokenizer",), "tokenizer: is a mapping (source, pad_to_multiple_of)")
        for key in section:
            if key not in ("source", "pad_to_multiple_of", "tokens"):
                raise tr.err(("tokenizer", key), "unknown key (allowed: source, "
                             "pad_to_multiple_of, tokens)")
        at, src = ("tokenizer", "source"), section.get("source", "union")
        pad = section.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise tr.err(("tokenizer", "pad_to_multiple_of"), "pad_to_multiple_of is a "
                         "positive integer")
    tokens = _token_sources(tr, section.get("tokens")) if section is not None else None
    if src is None:
        return first
    if src == "base":
        if base is None:
            raise tr.err(at, "tokenizer_source: base needs base_model")
        name = base
    elif src == "union":
        name = None
    else:
        if not isinstance(src, str):
            raise tr.err(at, "the tokenizer source is base, union or a model")
        name = tr.model(src, at)
    for model in (tr.inputs if name is None else [name]):
        if not tr.checkpoints[model].tokenizer_files:
            raise tr.err(at, f"{tr.inputs[model]} has no tokenizer files")
    vocabulary: dict[str, Any] = {"source": name or "union", "models": list(tr.inputs)}
    if base is not None:
        vocabulary["base"] = base
    if pad is not None:
        vocabulary["pad_to_multiple_of"] = pad
    if tokens:
        vocabulary["tokens"] = tokens
    recipe["vocabulary"] = vocabulary
    return name or first


def _token_sources(tr: _Translator, tokens: Any) -> dict[str, Any] | None:
    """mergekit's ``tokenizer: tokens:`` (token → {source, force}) in the recipe's form: the
    same, with the model references as input names."""
    if tokens is None:
        return None
    at: Loc = ("tokenizer", "tokens")
    if not isinstance(tokens, dict):
        raise tr.err(at, "tokens: is a mapping of token to {source, force}")
    def model(ref: Any, loc: Loc) -> str:
        if ref not in tr.refs:  # mergekit: "requires a vocabulary weight from model ..."
            raise tr.err(loc, f"{ref!r} is not one of the merge's models")
        return tr.model(ref, loc)

    out: dict[str, Any] = {}
    for tok, cfg in tokens.items():
        here: Loc = (*at, tok)
        if not isinstance(cfg, dict):
            raise tr.err(here, "each token takes {source: ..., force: ...}")
        for key in cfg:
            if key not in ("source", "force"):
                raise tr.err((*here, key), "unknown key (allowed: source, force)")
        src = cfg.get("source")
        if src is None:  # mergekit fails only once it needs the row
            raise tr.err(here, "a token needs its source: a model, {kind: zero} or "
                         "{kind: model_token, model, token_id or token}")
        if isinstance(src, str):
            src = model(src, (*here, "source"))
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            if not isinstance(src.get("model"), str):
                raise tr.err((*here, "source"), "model_token needs its model")
            src = dict(src, model=model(src["model"], (*here, "source", "model")))
        elif not (isinstance(src, dict) and src.get("kind") == "zero"):
            raise tr.err((*here, "source"), "the source is a model, {kind: zero} or "
                         "{kind: model_token, model, token_id or token}")
        out[str(tok)] = {"source": src, "force": bool(cfg.get("force", False))}
    return out


def _chat_template(tr: _Translator, value: Any, tokenizer_from: str) -> str | None:
    """mergekit's chat_template: ``auto`` (the most common template of the inputs, none when
    they have none), one of its named templates, or a Jinja template's text. Of the names,
    ``chatml`` and ``mistral`` are standard published templates we carry; mergekit's others
    are refused, naming why (see :mod:`surgery.recipe.chat_templates`)."""
    at = ("chat_template",)
    if not isinstance(value, str) or not value:
        raise tr.err(at, "chat_template is auto or a Jinja template")
    if not tr.checkpoints[tokenizer_from].tokenizer_files:
        raise tr.err(at, f"the output's tokenizer ({tr.inputs[tokenizer_from]}) has no "
                     "tokenizer files to set a chat template on")
    if value == "auto":
        from transformers import AutoTokenizer

        found = []
        for name, ck in tr.checkpoints.items():
            if not ck.tokenizer_files:
                continue
            try:
                template = AutoTokenizer.from_pretrained(ck.tokenizer_files[0].parent
                                                         ).chat_template
            except (OSError, ValueError) as e:
                raise tr.err(at, f"cannot load the tokenizer of {tr.inputs[name]} ({e})"
                             ) from None
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        if not found:
            tr.notes.append("chat_template: auto: no input has a chat template; none is set "
                            "(as mergekit)")
            return None
        return Counter(found).most_common(1)[0][0]
    if value in NAMED:
        return NAMED[value]
    if value in REFUSED:
        raise tr.err(at, f"chat_template {value!r}: {REFUSED[value]}; give the template's "
                     "Jinja text, or auto")
    if len(value) < 20 or "{" not in value:
        raise tr.err(at, f"chat_template {value!r} is neither a named template "
                     f"({', '.join(sorted(NAMED))}) nor a Jinja template; give its Jinja "
                     "text, or auto")
    return value


def _check_filters(tr: _Translator, hits: set[Loc]) -> None:
    """Every filter must match some tensor name (mergekit silently ignores one that does
    not)."""
    def walk(value: Any, loc: Loc) -> None:
        if isinstance(value, dict) and "value" in value:
            f = value.get("filter")
            if f not in (None, "*") and loc not in hits:
                if any(f in name for ck in tr.checkpoints.values() for name in ck.tensors):
                    raise tr.err((*loc, "filter"), f"filter {f!r} never applies: an earlier "
                                 "rule matches every tensor it matches (the first matching "
                                 "filter wins)")
                raise tr.err((*loc, "filter"), f"filter {f!r} matches no tensor (a filter is "
                             "a substring of tensor names)")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, dict):
                    walk(v, (*loc, i))

    def scope(params: Any, loc: Loc) -> None:
        for key, value in (params or {}).items():
            walk(value, (*loc, key))

    data = tr.data
    scope(data.get("parameters"), ("parameters",))
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, dict):
            scope(entry.get("parameters"), ("models", i, "parameters"))
    for k, sl in enumerate(data.get("slices") or []):
        scope(sl.get("parameters"), ("slices", k, "parameters"))
        for j, src in enumerate(sl.get("sources") or []):
            scope(src.get("parameters"), ("slices", k, "sources", j, "parameters"))


# passthrough with scale, per slice: our passthrough step (scale 1 where mergekit's is unset)
_SCALED_PASSTHROUGH = MethodMap("passthrough", (Param("scale", float, "input", None,
                                                      to="scale", unset=1.0),),
                                model_key="model", max_models=1)


def _passthrough(tr: _Translator, slices: list[Slice], top: dict[str, Any],
                 hits: set[Loc]) -> str:
    for sl in slices:
        if len(sl.sources) != 1:
            raise tr.err((*sl.loc, "sources"), "passthrough takes one source per slice")
    scaled = "scale" in top or any("scale" in sl.params or "scale" in sl.sources[0].params
                                   for sl in slices)
    if tr.data.get("models") is not None:
        src = slices[0].sources[0]
        if not scaled:
            return src.model  # one model, passed through
        resolver = _Resolver(tr, slices[0], top, hits)
        scale = METHODS["passthrough"].params[0]
        values = {}
        for name in tr.checkpoints[src.model].tensors:
            i = layer_index(name)
            t = 0.0 if i is None else (i / (src.end - 1) if src.end > 1 else 1.0)
            v = resolver.value(scale, src.model, name, t)
            values[name] = 1.0 if v is None else v
        tr.steps["merged"] = {"op": "passthrough", "model": src.model,
                              "scale": _emit(values, resolver.gradients.get("scale", []),
                                             src.end)}
        return "merged"
    if scaled:  # each slice scaled on its own, then stacked
        return _merge_slices(tr, _SCALED_PASSTHROUGH, "passthrough", slices, None, top, hits)
    models = [sl.sources[0].model for sl in slices]
    step: dict[str, Any] = {"op": "stack_layers", "models": models,
                            "ranges": [[sl.sources[0].start, sl.sources[0].end]
                                       for sl in slices]}
    if models[-1] != models[0]:
        step["head_from"] = len(slices) - 1
    tr.steps["merged"] = step
    return "merged"


def _merge_slices(tr: _Translator, method: MethodMap, method_name: str, slices: list[Slice],
                  base: str | None, top: dict[str, Any], hits: set[Loc]) -> str:
    merged: list[str] = []
    offset = 0
    for k, sl in enumerate(slices):
        name = "merged" if len(slices) == 1 else f"slice_{k}"
        merged.append(_merge_one(tr, method, method_name, sl, base, top, hits, name, offset))
        offset += sl.sources[0].end - sl.sources[0].start
    if len(slices) == 1:
        return merged[0]
    tr.steps["merged"] = {"op": "stack_layers", "models": merged,
                          "ranges": [[0, s.sources[0].end - s.sources[0].start]
                                     for s in slices],
                          "head_from": len(slices) - 1}
    return "merged"


def _merge_one(tr: _Translator, method: MethodMap, method_name: str, sl: Slice,
               base: str | None, top: dict[str, Any], hits: set[Loc], name: str,
               offset: int) -> str:
    base = sl.base or base
    takes_base = method.base == "required" or (method.base == "optional" and base is not None)
    if takes_base:
        if base is None:
            raise tr.err(("merge_method",), f"mergekit's {method_name} needs base_model")
        if all(s.model != base for s in sl.sources):
            raise tr.err((*sl.loc, "sources"), f"the base model {tr.inputs[base]!r} is not a "
                         "source of this slice")
    others = [s for s in sl.sources if not takes_base or s.model != base]
    if len(others) < method.min_models or (method.max_models is not None
                                           and len(others) > method.max_models):
        want = (f"exactly {method.max_models}" if method.max_models == method.min_models
                else f"at least {method.min_models}")
        what = "model besides the base" if takes_base else "model"
        raise tr.err(sl.loc, f"mergekit's {method_name} takes {want} {what} "
                     f"(got {len(others)})")
    n = sl.sources[0].end - sl.sources[0].start
    # Each source's slice as a model of its own (the input itself when it is whole).
    sub: dict[int, str] = {}
    for j, s in enumerate(sl.sources):
        if s.start == 0 and s.end == tr.layers(s.model):
            sub[j] = s.model
        else:
            sub[j] = f"{name}_{s.model}_{s.start}_{s.end}"
            tr.steps[sub[j]] = {"op": "stack_layers", "models": [s.model],
                                "ranges": [[s.start, s.end]]}
    ref = tr.checkpoints[sl.sources[0].model]
    start = sl.sources[0].start
    names = [n_ for n_ in ref.tensors
             if (i := layer_index(n_)) is None or start <= i < sl.sources[0].end]
    local = {n_: (n_ if layer_index(n_) is None else
                  rename_block(n_, layer_index(n_) - start)) for n_ in names}
    resolver = _Resolver(tr, sl, top, hits)

    def where(local_name: str, s: Source | None) -> tuple[str, float]:
        """mergekit's tensor name (the output's for shared parameters, the source's for
        per-model ones) and t for a tensor of the sub-model."""
        i = layer_index(local_name)
        if i is None:
            return local_name, 0.0
        t = i / (n - 1) if n > 1 else 1.0
        return rename_block(local_name, (s.start if s else offset) + i), t

    step: dict[str, Any] = {"op": method.op}
    per_model: dict[str, list[Any]] = {}
    for p in method.params:
        if p.scope == "shared":
            values = {}
            for ln in local.values():
                tensor, t = where(ln, None)
                values[ln] = resolver.value(p, None, tensor, t)
            _assign(tr, step, p, values, sl.loc, resolver.gradients.get(p.name, []), n)
        else:
            targets = others if p.scope == "non_base" else sl.sources
            per_model[p.name] = []
            for s in targets:
                values = {}
                for ln in local.values():
                    tensor, t = where(ln, s)
                    values[ln] = resolver.value(p, s.model, tensor, t)
                    if values[ln] is None:
                        values[ln] = p.unset
                per_model[p.name].append(values)
    for p in method.params:
        if p.name not in per_model or p.to is None:
            continue
        if p.per_model:
            step[p.to] = [_emit(v, resolver.gradients.get(p.name, []), n)
                          for v in per_model[p.name]]
        else:  # one value for all models, or {per_model: [...]} where they differ
            emitted = [_emit(v, resolver.gradients.get(p.name, []), n)
                       for v in per_model[p.name]]
            same = all(e == emitted[0] for e in emitted)
            step[p.to] = emitted[0] if same else {"per_model": emitted}
            if method.op == "ties" and p.name == "density":
                for v in per_model[p.name][:1] if same else per_model[p.name]:
                    _check_tiny_trim(tr, ref, v, local)
    step.update(method.fixed)
    models = [sub[j] for j, s in enumerate(sl.sources) if s in others]
    if takes_base:
        step[method.base_key] = sub[next(j for j, s in enumerate(sl.sources) if s.model == base)]
    if method.max_models == 1 and method.model_key != "models":
        step[method.model_key] = models[0]
    else:
        step[method.model_key] = models
    if step.get("weights") == [1.0] * len(models) and method.op != "linear":
        del step["weights"]
    tr.steps[name] = dict(sorted(step.items(), key=lambda kv: kv[0] != "op"))
    return name


def _check_tiny_trim(tr: _Translator, ref: Checkpoint, density: dict[str, Any],
                     local: dict[str, str]) -> None:
    """mergekit's TIES trim keeps at least one entry of a tensor; ours keeps ⌊density·n⌋,
    which can be 0 for a small tensor at a low density: say so."""
    for name, ln in local.items():
        n = math.prod(ref.tensors[name].shape)
        if 0 < density[ln] * n < 1:
            tr.notes.append(f"density {density[ln]} keeps no entry of {ln} ({n} entries), "
                            "where mergekit keeps one: the result differs there")
            return


def _fraction(name: str, n: int) -> float:
    """Where our depth gradients put a tensor of an n-block model (see schedule.Depth)."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (n - 1) if n > 1 else 1.0


def _assign(tr: _Translator, step: dict[str, Any], p: Param, values: dict[str, Any],
            loc: Loc, gradients: list[list[float]], n: int) -> None:
    if p.to is None:
        return
    distinct = set(values.values())
    if p.values is not None:
        for v in distinct:
            if v not in p.values:
                raise tr.err(("parameters", p.name), f"{p.name}: {v!r}: {p.refuse}")
        mapped = {p.values[v] for v in distinct}
        if len(mapped) != 1:
            raise tr.err(loc, f"{p.name} varies by tensor; ours takes one value")
        value = mapped.pop()
        if value is not None:
            step[p.to] = value
        return
    if p.kind is not float:
        if len(distinct) != 1:
            raise tr.err(loc, f"{p.name} varies by tensor; ours takes one value")
        step[p.to] = distinct.pop()
        return
    step[p.to] = _emit(values, gradients, n)


def read_config(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{p}: cannot read config ({e.strerror})") from None


def load_mergekit(path: str | Path, out_path: str, *, device: str | None = None,
                  shard_size: int | str | None = None) -> tuple[Recipe, Translation]:
    """Read, translate and build a mergekit config: the native recipe (its text is the
    translated recipe, so that its provenance names what ran) and the translation."""
    translation = translate(read_config(path), str(path), out_path, device=device,
                            shard_size=shard_size)
    return build_translated(translation, str(path)), translation


def build_translated(translation: Translation, source: str) -> Recipe:
    """Build the translated recipe; an error the native checks find (a value out of range,
    shapes that differ) is reported at the config's merge_method line, naming the recipe key
    it came from, since the translated text's lines are not the config's."""
    try:
        return build_recipe(translation.text(), "translated recipe")
    except RecipeError as e:
        if translation.located is None or not e.detail:
            raise
        at: Loc = ("merge_method",)
        data = translation.located.data
        if str(e.key).startswith("vocabulary"):  # from tokenizer_source or tokenizer:
            at = next(((k,) for k in ("tokenizer_source", "tokenizer") if k in data), at)
        raise translation.located.error(at, f"{e.detail} (in the translated recipe's "
                                        f"{e.key})") from None


def parse_kmb(value: str) -> int:
    """mergekit's sizes: an integer with an optional K, M or B (thousands, millions, billions)
    suffix; mergekit's --out-shard-size counts bytes."""
    text = value.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:], 1)
    digits = text[:-1] if scale != 1 else text
    try:
        return int(float(digits) * scale)
    except ValueError:
        raise UsageError(f"--out-shard-size: {value!r} is not a size such as 5B or 500M"
                         ) from None

