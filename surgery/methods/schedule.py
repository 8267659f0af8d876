"""Per-tensor parameter values: scalars, depth gradients and name/kind rules.

A numeric method parameter (``density``, ``weight``, ``t``, ``lambda``, ...) may be:

- a scalar, the same for every tensor;
- a gradient, a list of values spread evenly over the blocks 0..L-1 and interpolated linearly
  (as mergekit's gradients): block l sits at t = l/(L-1) along the list (t = 1 when L = 1).
  Non-block tensors (embeddings, final norm, head) take the first value, t = 0, as in mergekit
  and as LiNeS treats them;
- a list of rules ``{match: ..., value: scalar or gradient}``. ``match`` is a tensor kind
  (embedding, norm, attention, mlp, head, bias, other; see :mod:`surgery.names`), a glob over
  the whole tensor name (``*q_proj*``), or a regex searched in the name when written
  ``re:<pattern>``. The most specific matching rule wins, never the first: an exact tensor
  name beats any pattern; among globs and regexes the one with more literal (non-wildcard)
  characters wins; then a kind; a pattern of wildcards alone (``*``) is the least specific,
  a catch-all. Two different rules equally specific for one
  tensor are an error, as is a rule that matches no tensor. Tensors no rule matches get the
  parameter's default, or fail when it has none.

A sparsification parameter of a task-vector merge (``density``, ``gamma``, ``epsilon``) may
also differ between the merged models: ``{per_model: [v_1, ..., v_T]}``, one value of any of the
forms above per model, in the order of ``models`` (see :class:`PerModel`).

Everything is resolved from tensor names when the graph is built, before any weight is read.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from surgery.errors import UsageError
from surgery.expr import Node
from surgery.names import TensorKind, count_layers, layer_index, tensor_kind

_GLOB_META = set("*?[]")
_REGEX_META = set(".^$*+?{}[]|()")
_KINDS = {k.value for k in TensorKind}


class Rule(BaseModel):
    """One filter rule of a scheduled parameter."""

    model_config = ConfigDict(extra="forbid")

    match: str
    value: float | list[float]


Gradient: TypeAlias = list[float]
Scheduled: TypeAlias = float | Gradient | list[Rule]
"""The recipe type of a schedulable parameter: scalar, depth gradient, or rules."""


class PerModel(BaseModel):
    """One schedule per merged model, in the order of the operation's ``models``. A plain
    list would be read as a depth gradient, hence the key: ``density: {per_model: [0.5,
    [1, 0.7, 0.1], 0.33]}`` trims the first model to half, the second by depth."""

    model_config = ConfigDict(extra="forbid")

    per_model: list[Scheduled] = Field(min_length=1)


ModelScheduled: TypeAlias = Scheduled | PerModel
"""The recipe type of a parameter that may differ between models: a schedule shared by all
of them, or :class:`PerModel`."""


@dataclass(frozen=True)
class Depth:
    """Where a tensor sits in the stack of blocks: its block index and the block count L."""

    num_layers: int
    pattern: re.Pattern[str] | None = None

    @classmethod
    def of(cls, node: Node, layer_pattern: str | None = None) -> Depth:
        """L from the node's config.json, else from its tensor names; ``layer_pattern`` is a
        regex whose first group captures the block index, overriding the conventions."""
        pattern = None
        if layer_pattern is not None:
            try:
                pattern = re.compile(layer_pattern)
            except re.error as e:
                raise UsageError(f"layer_pattern {layer_pattern!r} is not a valid regex ({e})"
                                 ) from None
            if pattern.groups < 1:
                raise UsageError(f"layer_pattern {layer_pattern!r} needs a group capturing the "
                                 "block index")
        names = node.names()
        depth = cls(count_layers(names, node.config(), pattern), pattern)
        for name in names:
            index = depth.layer(name)
            if index is not None and index >= depth.num_layers:
                raise UsageError(f"tensor {name!r} is in block {index} but the model has "
                                 f"{depth.num_layers} blocks (config.json); set layer_pattern")
        return depth

    def layer(self, name: str) -> int | None:
        return layer_index(name, self.pattern)

    def fraction(self, name: str) -> float:
        """l/(L-1) for block l (1 when L = 1); 0 for non-block tensors."""
        index = self.layer(name)
        if index is None:
            return 0.0
        return index / (self.num_layers - 1) if self.num_layers > 1 else 1.0


def interpolate(values: Sequence[float], t: float) -> float:
    """The value at t in [0, 1] of a list spread evenly over [0, 1], linearly interpolated."""
    if len(values) == 1:
        return float(values[0])
    scaled = t * (len(values) - 1)
    i0 = min(int(scaled), len(values) - 1)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _literal_length(pattern: str, meta: set[str]) -> int:
    count, escaped = 0, False
    for ch in pattern:
        if escaped:
            count, escaped = count + 1, False
        elif ch == "\\":
            escaped = True
        elif ch not in meta:
            count += 1
    return count


class NameMatcher:
    """One ``match`` of a rule (an exact tensor name, a kind, a glob or ``re:<regex>``) as a
    test on tensor names, and its specificity (higher wins). ``param`` names the parameter
    in errors; ``names`` are the tensor names an exact name is looked up in."""

    def __init__(self, param: str, match: str, names: set[str]) -> None:
        self.text = match
        if match in names and not (_GLOB_META & set(match)):
            self.specificity: tuple[int, int] = (3, len(match))
            self.test: Callable[[str], bool] = match.__eq__
        elif match in _KINDS:
            self.specificity = (1, 0)
            self.test = lambda name: tensor_kind(name).value == match
        elif match.startswith("re:"):
            try:
                regex = re.compile(match[3:])
            except re.error as e:
                raise UsageError(f"{param}: rule match {match!r} is not a valid regex ({e})"
                                 ) from None
            self.specificity = self._pattern(_literal_length(match[3:], _REGEX_META))
            self.test = lambda name: regex.search(name) is not None
        else:
            self.specificity = self._pattern(_literal_length(match, _GLOB_META))
            self.test = lambda name: fnmatch.fnmatchcase(name, match)

    @staticmethod
    def _pattern(literals: int) -> tuple[int, int]:
        # A pattern of wildcards alone ("*") is a catch-all, below the kinds.
        return (2, literals) if literals else (0, 0)


class Schedule:
    """A parameter resolved per tensor name; built (and fully checked) from tensor names."""

    def __init__(self, param: str, spec: Scheduled | Sequence[Rule], node: Node, depth: Depth,
                 *, default: float | None = None,
                 check: Callable[[float], str | None] | None = None) -> None:
        self.param = param
        self.spec = spec
        names = node.names()
        self._values: dict[str, float] = {}
        if isinstance(spec, (int, float)):
            self._check_values(param, [float(spec)], check)
            self._values = dict.fromkeys(names, float(spec))
            return
        if not spec:
            raise UsageError(f"{param}: an empty list is neither a gradient nor rules")
        if all(isinstance(v, (int, float)) for v in spec):
            gradient = [float(v) for v in spec]  # type: ignore[arg-type]
            self._check_values(param, gradient, check)
            self._values = {n: interpolate(gradient, depth.fraction(n)) for n in names}
            return
        rules = [r if isinstance(r, Rule) else Rule.model_validate(r) for r in spec]
        for rule in rules:
            values = rule.value if isinstance(rule.value, list) else [rule.value]
            if not values:
                raise UsageError(f"{param}: rule {rule.match!r} has an empty value list")
            self._check_values(f"{param} (rule {rule.match!r})", values, check)
        if default is not None:
            self._check_values(param, [default], check)
        name_set = set(names)
        matchers = [NameMatcher(param, r.match, name_set) for r in rules]
        used = [False] * len(rules)
        for name in names:
            hits = [i for i, m in enumerate(matchers) if m.test(name)]
            for i in hits:
                used[i] = True
            if not hits:
                if default is None:
                    raise UsageError(f"{param}: no rule matches tensor {name!r} and the "
                                     "parameter has no default; add a rule such as "
                                     "{match: '*', value: ...}")
                self._values[name] = default
                continue
            best = max(hits, key=lambda i: matchers[i].specificity)
            rivals = [i for i in hits if i != best
                      and matchers[i].specificity == matchers[best].specificity]
            if rivals:
                raise UsageError(f"{param}: rules {matchers[best].text!r} and "
                                 f"{matchers[rivals[0]].text!r} match tensor {name!r} equally "
                                 "specifically; make one more specific")
            value = rules[best].value
            self._values[name] = (interpolate(value, depth.fraction(name))
                                  if isinstance(value, list) else float(value))
        for i, ok in enumerate(used):
            if not ok:
                text = rules[i].match
                plain = not (_GLOB_META & set(text)) and not text.startswith("re:") \
                    and text not in _KINDS
                hint = f" (globs match the whole name: try '*{text}*')" if plain else ""
                raise UsageError(f"{param}: rule {rules[i].match!r} matches no tensor{hint}")

    @staticmethod
    def _check_values(param: str, values: Sequence[float], check: Callable[[float], str | None]
                      | None) -> None:
        # Interpolation stays between given values, so checking these covers every result
        # for interval constraints.
        if check is None:
            return
        for v in values:
            problem = check(v)
            if problem:
                raise UsageError(f"{param} {v!r} {problem}")

    def __call__(self, name: str) -> float:
        return self._values[name]

    def constant(self) -> float | None:
        """The value when it is the same for every tensor, else None."""
        distinct = set(self._values.values())
        return distinct.pop() if len(distinct) == 1 else None

    def describe(self) -> float | list | str:
        """JSON-able form of the spec, for provenance."""
        if isinstance(self.spec, (int, float)):
            return float(self.spec)
        return [r.model_dump() if isinstance(r, Rule) else r for r in self.spec]


def in_unit_interval(v: float) -> str | None:
    """Check for densities: (0, 1]."""
    return None if 0.0 < v <= 1.0 else "is outside (0, 1]"


def in_closed_unit_interval(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "is outside [0, 1]"


def per_model_weights(op: str, weights: Sequence[Scheduled] | None, count: int, node: Node,
                      depth: Depth) -> list[Schedule]:
    """One weight schedule per model (default 1 each), resolved over ``node``'s tensor names;
    an error naming the operation when the count differs from the number of models."""
    if weights is None:
        weights = [1.0] * count
    if len(weights) != count:
        raise UsageError(f"{op}: weights has {len(weights)} values for {count} models")
    return [Schedule(f"{op}: weights[{i}]", w, node, depth) for i, w in enumerate(weights)]


def per_model_schedules(param: str, spec: ModelScheduled, labels: Sequence[str], node: Node,
                        depth: Depth, *, check: Callable[[float], str | None] | None = None
                        ) -> list[Schedule]:
    """One schedule per model (``labels`` name them, in order) from a shared schedule or a
    :class:`PerModel`; ``param`` names the parameter in errors (``"ties: density"``), and an
    error in one model's value names that model."""
    if not isinstance(spec, PerModel):
        shared = Schedule(param, spec, node, depth, check=check)
        return [shared] * len(labels)
    if len(spec.per_model) != len(labels):
        raise UsageError(f"{param}: per_model has {len(spec.per_model)} values for "
                         f"{len(labels)} models")
    return [Schedule(f"{param} of models[{i}] ({label})", s, node, depth, check=check)
            for i, (label, s) in enumerate(zip(labels, spec.per_model, strict=True))]


def describe_per_model(schedules: Sequence[Schedule]) -> float | list | dict:
    """JSON-able form of per-model schedules: the shared one's, else ``{per_model: [...]}``."""
    if all(s is schedules[0] for s in schedules):
        return schedules[0].describe()
    return {"per_model": [s.describe() for s in schedules]}
