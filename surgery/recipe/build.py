"""From YAML text to a validated graph, before any weights are read.

Order of checks: YAML syntax; the recipe's own structure (unknown keys with a did-you-mean,
types); each step's operation and parameters; references between names and cycles; then the
inputs' headers (missing files, corrupt headers); then building the graph, which checks
tensor names and shapes. Every error names its YAML location.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from surgery.checkpoint import Checkpoint, open_checkpoint, parse_hub_id
from surgery.engine import parse_dtype
from surgery.errors import RecipeError, UsageError
from surgery.evaluate.operations import DATA_OPERATIONS
from surgery.expr import LoadNode, Weights
from surgery.methods.registry import OPERATIONS as STREAMING_OPERATIONS
from surgery.methods.registry import Operation
from surgery.prune.operations import PRUNE_OPERATIONS
from surgery.recipe.schema import ModelRowSpec, OutputSpec, RecipeDoc
from surgery.recipe.yamlloc import Loc, Located, load_located
from surgery.train.adapter_ops import ADAPTER_OPERATIONS
from surgery.train.graft import GRAFT_OPERATIONS
from surgery.train.lt_sft_operation import LT_SFT_OPERATIONS
from surgery.train.operations import TRAIN_OPERATIONS
from surgery.writer import parse_size


@dataclass
class Recipe:
    """A validated recipe: its text, the opened inputs and the lazy result of every name."""

    text: str
    source: str
    doc: RecipeDoc
    checkpoints: dict[str, Checkpoint]
    values: dict[str, Weights]
    steps: dict[str, tuple[Operation, BaseModel]] = field(default_factory=dict)

    def outputs(self) -> list[tuple[OutputSpec, Weights]]:
        return [(o, self.values[o.from_]) for o in self.doc.outputs()]


OPERATIONS = {**STREAMING_OPERATIONS, **DATA_OPERATIONS, **PRUNE_OPERATIONS,
              **TRAIN_OPERATIONS, **GRAFT_OPERATIONS, **LT_SFT_OPERATIONS}
OPERATIONS.update(ADAPTER_OPERATIONS)


def suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


# The member tags pydantic puts in an error's location for the union ``Scheduled``.
_SCHEDULE_TAGS = {"float": "number", "list[float]": "gradient", "list[Rule]": "rules",
                  "PerModel": "per_model"}


def _prefer_unknown(errors: list[Any]) -> list[Any]:
    """A misspelt key is both unknown and missing; report it as unknown, with a suggestion."""
    return sorted(errors, key=lambda e: e["type"] != "extra_forbidden")


def _schedule_error(errors: list[Any], skip: int = 0) -> tuple[Any, str | None]:
    """For a value of a schedulable parameter, the error of the form the value was meant to
    take (rules when it is a list of mappings, a gradient for another list, one model's
    schedule in ``per_model``); a value of none of the forms gets one plain message. ``skip``:
    how many parts of the locations lie above the value."""
    first = errors[0]
    tags = [i for i, part in enumerate(first["loc"]) if i >= skip and part in _SCHEDULE_TAGS]
    if not tags:
        return _prefer_unknown(errors)[0], None
    at = first["loc"][:tags[0]]
    value = first.get("input")
    per_model = any(len(e["loc"]) > len(at) and e["loc"][len(at)] == "PerModel"
                    for e in errors)
    form = None
    if isinstance(value, list) and value:
        form = "rules" if all(isinstance(v, dict) for v in value) else "gradient"
    elif isinstance(value, dict) and per_model:
        form = "per_model"
    if form is not None:
        for e in _prefer_unknown(errors):
            loc = e["loc"]
            if loc[:len(at)] == at and len(loc) > len(at) and _SCHEDULE_TAGS.get(
                    loc[len(at)]) == form:
                if form == "per_model" and len(loc) > len(at) + 3:
                    # (PerModel, per_model, i, ...): model i's schedule is what is wrong
                    inner = loc[:len(at) + 3]
                    return _schedule_error([x for x in errors
                                            if x["loc"][:len(inner)] == inner], len(inner))
                return e, None
    also = ", or {per_model: [...]} with one of those per model" if per_model else ""
    return {**first, "loc": at}, (f"expected a number, a list of numbers (a depth gradient) or "
                                  f"a list of {{match, value}} rules{also} (got {value!r})")


def _validation_error(doc: Located, err: ValidationError, prefix: Loc,
                      model: type[BaseModel]) -> RecipeError:
    first, schedule_message = _schedule_error(err.errors())
    at = _walk(model, first["loc"])[0]
    loc: Loc = (*prefix, *at)
    if schedule_message:
        return doc.error(loc, schedule_message)
    if first["type"] == "extra_forbidden":
        key = str(at[-1])
        sub = _first_model(_walk(model, first["loc"][:-1])[1])
        allowed = _allowed_keys(sub) if sub else []
        extra = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return doc.error(loc, f"unknown key{suggest(key, allowed) or extra}")
    if first["type"] == "missing":
        return doc.error(loc, "required key is missing")
    if first["type"] == "value_error":  # a model's own check: its message says it all
        return doc.error(loc, first["msg"].removeprefix("Value error, "))
    hint = ""
    if first["type"] == "literal_error" and isinstance(first.get("input"), str):
        hint = suggest(first["input"], [str(v) for v in get_args(_walk(model, first["loc"])[1])])
    return doc.error(loc, f"{first['msg']} (got {first.get('input')!r}){hint}")


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Loc, Any]:
    """``loc`` without the member tags pydantic puts in it at a union (``output.OutputSpec.
    path``), and the annotation that validates the value there."""
    clean: list[Any] = []
    current: Any = model
    for part in loc:
        current = _unwrap_optional(current)
        if get_origin(current) in (Union, UnionType) and isinstance(part, str):
            current = next((a for a in get_args(current) if _tag(a) == part), Any)
            continue
        clean.append(part)
        if isinstance(current, type) and issubclass(current, BaseModel):
            fields = {f.alias or n: f for n, f in current.model_fields.items()}
            current = fields[part].annotation if part in fields else Any
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]
        else:
            current = Any
    return tuple(clean), current


def _unwrap_optional(annotation: Any) -> Any:
    args = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
    return annotation


def _tag(annotation: Any) -> str:
    """How pydantic names a union member in an error location: ``float``, ``list[Rule]``."""
    args = get_args(annotation)
    if args:
        return f"{get_origin(annotation).__name__}[{','.join(_tag(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def parse_recipe(text: str, source: str = "recipe.yaml") -> tuple[Located, RecipeDoc,
                                                                  dict[str, tuple[Operation,
                                                                                  BaseModel]]]:
    """Check everything that needs no file: structure, operations, parameters, references."""
    located = load_located(text, source)
    if not isinstance(located.data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with inputs, steps and output")
    try:
        doc = RecipeDoc.model_validate(located.data)
    except ValidationError as e:
        raise _validation_error(located, e, (), RecipeDoc) from None
    clash = set(doc.inputs) & set(doc.steps)
    if clash:
        name = sorted(clash)[0]
        raise located.error(("steps", name), "a step cannot have the name of an input")
    steps = {name: _parse_step(located, name, raw, doc.seed) for name, raw in doc.steps.items()}
    names = [*doc.inputs, *doc.steps]
    data_steps = {n for n, (op, _) in steps.items() if op.yields == "data"}
    for name, (op, params) in steps.items():
        for fname in op.model_fields:
            value = getattr(params, fname)
            refs = value if isinstance(value, list) else [value]
            for i, ref in enumerate(refs):
                if ref is None:
                    continue
                key = op.params.model_fields[fname].alias or fname
                loc: Loc = ("steps", name, key, i) if isinstance(value, list) else \
                    ("steps", name, key)
                if ref not in names:
                    raise located.error(loc, f"no input or step named {ref!r}"
                                        f"{suggest(ref, names)}")
                if ref in data_steps:
                    raise located.error(loc, f"step {ref!r} yields data, not a model")
        for fname in op.data_fields:
            ref = getattr(params, fname)
            if ref in names and ref not in data_steps:
                raise located.error(("steps", name, fname), f"{ref!r} is a model; give a "
                                    "JSONL file or a step that yields data (distill_data)")
    _check_cycles(located, steps)
    _check_vocabulary(located, doc)
    for i, out in enumerate(doc.outputs()):
        at: Loc = ("output", i) if isinstance(doc.output, list) else ("output",)
        if out.from_ not in names:
            raise located.error((*at, "from"), f"no input or step named {out.from_!r}"
                                f"{suggest(out.from_, names)}")
        if out.from_ in data_steps:
            raise located.error((*at, "from"), f"step {out.from_!r} yields data, not a model")
        if out.tokenizer_from is not None and out.tokenizer_from not in doc.inputs:
            raise located.error((*at, "tokenizer_from"), f"no input named {out.tokenizer_from!r}"
                                f"{suggest(out.tokenizer_from, list(doc.inputs))}")
        try:
            parse_dtype(out.dtype)
        except UsageError as e:
            raise located.error((*at, "dtype"), str(e)) from None
        try:
            parse_size(out.shard_size)
        except ValueError as e:
            raise located.error((*at, "shard_size"), str(e)) from None
        push = out.push_to_hub
        if push is not None and (parse_hub_id(push.repo) is None or "@" in push.repo):
            raise located.error((*at, "push_to_hub", "repo"),
                                f"{push.repo!r} is not a Hub repo id (org/name); give the "
                                "branch as revision")
        if out.device not in ("auto", "cpu") and not out.device.startswith("cuda"):
            raise located.error((*at, "device"), "device must be auto, cpu or cuda[:N]")
    return located, doc, steps


def _check_vocabulary(located: Located, doc: RecipeDoc) -> None:
    vocab = doc.vocabulary
    if vocab is None:
        return
    inputs = list(doc.inputs)
    models = vocab.names(inputs)
    for i, name in enumerate(models):
        if name not in doc.inputs:
            raise located.error(("vocabulary", "models", i), f"no input named {name!r}"
                                f"{suggest(name, inputs)}")
    if len(set(models)) != len(models):
        raise located.error(("vocabulary", "models"), "an input is named twice")
    for key in ("source", "base"):
        name = getattr(vocab, key)
        if name is None or (key == "source" and name == "union"):
            continue
        if name not in models:
            what = "union or one of the models" if key == "source" else "one of the models"
            raise located.error(("vocabulary", key), f"{name!r} is not {what}"
                                f"{suggest(name, models)}")
    for tok, spec in (vocab.tokens or {}).items():
        src = spec.source
        at: Loc
        name, at = ((src, ("vocabulary", "tokens", tok, "source")) if isinstance(src, str)
                    else (getattr(src, "model", None),
                          ("vocabulary", "tokens", tok, "source", "model")))
        if name is not None and name not in models:
            raise located.error(at, f"{name!r} is not one of the models{suggest(name, models)}")
    for i, out in enumerate(doc.outputs()):
        if out.tokenizer_from is not None:
            at = ("output", i) if isinstance(doc.output, list) else ("output",)
            raise located.error((*at, "tokenizer_from"), "the vocabulary section gives the "
                                "outputs their tokenizer; drop tokenizer_from or the section")


def _parse_step(located: Located, name: str, raw: dict[str, Any],
                seed: int) -> tuple[Operation, BaseModel]:
    op_name = raw.get("op")
    if not isinstance(op_name, str):
        raise located.error(("steps", name), "each step needs op: <operation name>")
    op = OPERATIONS.get(op_name)
    if op is None:
        raise located.error(("steps", name, "op"), f"unknown operation {op_name!r}"
                            f"{suggest(op_name, list(OPERATIONS)) or ''}"
                            " (`surgery methods` lists them)")
    params = {k: v for k, v in raw.items() if k != "op"}
    if "seed" in op.params.model_fields and "seed" not in params:
        params["seed"] = seed  # an operation's seed defaults to the recipe's
    try:
        return op, op.params.model_validate(params)
    except ValidationError as e:
        raise _validation_error(located, e, ("steps", name), op.params) from None


def _check_cycles(located: Located, steps: dict[str, tuple[Operation, BaseModel]]) -> None:
    state: dict[str, int] = {}

    def deps(name: str) -> list[str]:
        op, params = steps[name]
        out: list[str] = [getattr(params, f) for f in op.data_fields]
        for fname in op.model_fields:
            value = getattr(params, fname)
            out += [v for v in (value if isinstance(value, list) else [value]) if v]
        return [d for d in out if d in steps]

    def visit(name: str) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise located.error(("steps", name), "steps refer to each other in a cycle")
        state[name] = 1
        for d in deps(name):
            visit(d)
        state[name] = 2

    for name in steps:
        visit(name)


def _align(located: Located, doc: RecipeDoc, checkpoints: dict[str, Checkpoint],
           values: dict[str, Weights]) -> None:
    """The inputs the vocabulary section names, replaced by their aligned versions."""
    from surgery.methods.vocabulary import TokenRow, align_vocabularies

    vocab = doc.vocabulary
    assert vocab is not None
    models = vocab.names(list(doc.inputs))
    tokens = {}
    for tok, spec in (vocab.tokens or {}).items():
        src = spec.source
        if isinstance(src, str):
            tokens[tok] = TokenRow(models.index(src), force=spec.force)
        elif isinstance(src, ModelRowSpec):
            tokens[tok] = TokenRow(models.index(src.model), src.token, src.token_id, spec.force)
        else:
            tokens[tok] = TokenRow(None, force=spec.force)
    try:
        aligned = align_vocabularies(
            [values[n] for n in models],
            source=None if vocab.source == "union" else models.index(vocab.source),
            base=None if vocab.base is None else models.index(vocab.base),
            pad_to_multiple_of=vocab.pad_to_multiple_of, tokens=tokens or None,
            labels=[f"{n} ({checkpoints[n].source})" for n in models])
    except UsageError as e:
        raise located.error(("vocabulary",), str(e)) from None
    values.update(zip(models, aligned, strict=True))


def load_recipe(path: str | Path) -> Recipe:
    """Read and fully validate a recipe file: structure, then input headers, then shapes."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{p}: cannot read recipe ({e.strerror})") from None
    return build_recipe(text, str(p))


def build_recipe(text: str, source: str = "recipe.yaml") -> Recipe:
    located, doc, steps = parse_recipe(text, source)
    checkpoints: dict[str, Checkpoint] = {}
    for name in doc.inputs:
        spec = doc.input_spec(name)
        try:
            checkpoints[name] = open_checkpoint(spec.path, allow_pickle=spec.allow_pickle)
        except UsageError as e:
            raise located.error(("inputs", name), str(e)) from None
    values: dict[str, Weights] = {n: Weights(LoadNode(c)) for n, c in checkpoints.items()}
    if doc.vocabulary is not None:
        _align(located, doc, checkpoints, values)

    def get(name: str) -> Weights:
        if name not in values:
            if name not in steps:  # a data field's file path (see Operation.data_fields)
                raise KeyError(name)
            op, params = steps[name]
            try:
                values[name] = op.build(params, get)
            except RecipeError:
                raise
            except UsageError as e:
                raise located.error(("steps", name), str(e)) from None
        return values[name]

    for name in steps:
        get(name)
    return Recipe(text, source, doc, checkpoints, values, steps)
