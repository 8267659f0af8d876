"""DRIFT's reasoning prior (arXiv 2510.15050): Δ = θ_reasoning − θ_target for every attention
and MLP projection of the target, streamed tensor by tensor into one safetensors file.

The fine-tune step biases each such parameter's gradient toward Δ
(:class:`surgery.train.drift.DriftBias`); the naive-merge baseline θ_target + w·Δ is a
``task_arithmetic`` step whose ``lambda`` is w on attention and MLP tensors and 0 elsewhere
(``recipes/drift.yaml``).

Where we differ from the reference code (a fork of LLaMA-Factory): there, a parameter with
no prior is skipped silently, so a name mismatch between the two layouts trains plain SFT
without a word. Here names are mapped by explicit ``map`` rules, every target projection
without a prior is an error that lists them (unless ``allow_missing`` names them, and the
file records which), and the bias refuses a prior whose names or shapes do not fit the model.

File format: one tensor per target projection, under the target's name, in the chosen dtype;
metadata ``format`` (``weight-surgery-drift-prior``) and ``provenance`` (JSON: both inputs
with revisions and file hashes, the map, the missing names allowed, the dtype).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from surgery.checkpoint.hashing import cached_sha256
from surgery.engine.run import parse_dtype, provenance_record, write_shards
from surgery.engine.stream import ProgressFn, StreamOptions, resolve_device
from surgery.errors import CheckpointError, ShapeMismatchError, UsageError
from surgery.expr import EvalContext, Node, TensorSpec, Weights
from surgery.expr.node import node_label
from surgery.methods.schedule import NameMatcher
from surgery.methods.soup import Params
from surgery.names import TensorKind, tensor_kind
from surgery.writer import PlannedTensor

DRIFT_REF = "DRIFT, arXiv 2510.15050"
PRIOR_FORMAT = "weight-surgery-drift-prior"
PROJECTION_KINDS = (TensorKind.ATTENTION, TensorKind.MLP)


def is_projection(name: str, shape: Sequence[int]) -> bool:
    """An attention or MLP weight matrix (biases, norms, embeddings and heads excluded)."""
    return tensor_kind(name) in PROJECTION_KINDS and len(shape) == 2


class NameMap:
    """``map`` rules: regex → replacement, applied to the reasoning model's names in order;
    the first rule that matches a name rewrites it (``re.sub``, once). Names no rule matches
    keep their name. Each rule must match at least one name."""

    def __init__(self, rules: Mapping[str, str] | None) -> None:
        self.rules: list[tuple[str, re.Pattern[str], str]] = []
        for pattern, repl in (rules or {}).items():
            try:
                self.rules.append((pattern, re.compile(pattern), repl))
            except re.error as e:
                raise UsageError(f"map: {pattern!r} is not a valid regex ({e})") from None

    def apply(self, names: Sequence[str]) -> dict[str, str]:
        """target name -> reasoning name."""
        out: dict[str, str] = {}
        used = [False] * len(self.rules)
        for name in names:
            mapped = name
            for i, (_, regex, repl) in enumerate(self.rules):
                if regex.search(name):
                    mapped, used[i] = regex.sub(repl, name, count=1), True
                    break
            if mapped in out:
                raise UsageError(f"map: {out[mapped]!r} and {name!r} both map to {mapped!r}")
            out[mapped] = name
        for (pattern, _, _), hit in zip(self.rules, used, strict=True):
            if not hit:
                raise UsageError(f"map: {pattern!r} matches no tensor of the reasoning model")
        return out


class PriorNode(Node):
    """Δ = reasoning − target per target projection, in float32 (the file's dtype is the
    output cast)."""

    op = "drift_prior"
    reference = DRIFT_REF

    def __init__(self, reasoning: Node, target: Node, rules: Mapping[str, str] | None = None,
                 allow_missing: Sequence[str] | None = None) -> None:
        super().__init__()
        self.inputs = (reasoning, target)
        self.rules = dict(rules or {})
        self.allow_missing_rules = list(allow_missing or [])
        source_of = NameMap(rules).apply(reasoning.names())
        projections = [n for n in target.names() if is_projection(n, target.spec(n).shape)]
        if not projections:
            raise UsageError(f"drift_prior: {node_label(target)} has no attention or MLP "
                             "projection")
        missing = [n for n in projections if n not in source_of]
        allowed: set[str] = set()
        names = set(target.names())
        for rule in self.allow_missing_rules:
            test = NameMatcher("allow_missing", rule, names).test
            hits = {n for n in missing if test(n)}
            if not hits:
                raise UsageError(f"allow_missing: {rule!r} names no projection missing from "
                                 f"{node_label(reasoning)}")
            allowed |= hits
        unexplained = [n for n in missing if n not in allowed]
        if unexplained:
            shown = ", ".join(unexplained[:5]) + (", ..." if len(unexplained) > 5 else "")
            raise UsageError(
                f"drift_prior: {len(unexplained)} projection(s) of {node_label(target)} have no "
                f"tensor in {node_label(reasoning)}: {shown} (map names with map:, or list them "
                "in allow_missing:)")
        self.missing = [n for n in projections if n in allowed]
        self.source = {n: source_of[n] for n in projections if n in source_of}
        for name, src in self.source.items():
            a, b = reasoning.spec(src).shape, target.spec(name).shape
            if a != b:
                raise ShapeMismatchError(
                    f"drift_prior: {src!r} of {node_label(reasoning)} has shape {list(a)}, "
                    f"{name!r} of {node_label(target)} {list(b)}")

    def params(self) -> dict[str, Any]:
        return {"map": self.rules, "allow_missing": self.allow_missing_rules}

    def config(self) -> dict:
        return {}

    def _list_names(self) -> list[str]:
        return list(self.source)

    def spec(self, name: str) -> TensorSpec:
        return TensorSpec(self.inputs[1].spec(name).shape, torch.float32)

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        return [(self.inputs[0], self.source[name]), (self.inputs[1], name)]

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        reasoning = ctx.to_compute(ctx.value(self.inputs[0], self.source[name]))
        target = ctx.to_compute(ctx.value(self.inputs[1], name))
        return reasoning.float() - target.float()


@dataclass
class PriorResult:
    path: Path
    tensors: int
    missing: list[str]
    bytes: int


def drift_prior(reasoning: Weights, target: Weights, out: str | Path, *,
                dtype: str | torch.dtype | None = None, map: Mapping[str, str] | None = None,
                allow_missing: Sequence[str] | None = None, force: bool = False,
                device: str = "auto", progress: ProgressFn | None = None) -> PriorResult:
    """Write DRIFT's prior Δ = ``reasoning`` − ``target`` over the target's attention and MLP
    projections to the safetensors file ``out`` (``dtype``: float32 by default). Everything
    is checked from headers before a weight is read; the file appears only when complete."""
    node = PriorNode(reasoning.node, target.node, map, allow_missing)
    out_dtype = parse_dtype(dtype) or torch.float32
    path = Path(out)
    if path.suffix != ".safetensors":
        raise UsageError(f"{path}: a prior is one .safetensors file")
    if path.exists() and not force:
        raise UsageError(f"{path} exists (use --force to replace it)")
    inputs = {os.path.realpath(ck.root) for ck in node.checkpoints()}
    if os.path.realpath(path) in inputs:
        raise UsageError(f"{path} is an input")
    dev = resolve_device(device)
    provenance = provenance_record(node, 0, out_dtype, None, dev)
    for item, ck in zip(provenance["inputs"], dict.fromkeys(node.checkpoints()), strict=True):
        for rec, f in zip(item["files"], ck.files, strict=False):
            if f.is_file():
                rec["sha256"] = cached_sha256(f)
    provenance.update(map=dict(map or {}), allow_missing=list(allow_missing or []),
                      missing=node.missing, target=node_label(target.node),
                      reasoning=node_label(reasoning.node))
    names = node.names()
    planned = [PlannedTensor(n, node.spec(n).shape, out_dtype) for n in names]
    meta = {"format": PRIOR_FORMAT, "provenance": json.dumps(provenance, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    opts = StreamOptions(device=dev, seed=0, progress=progress)
    write_shards(node, [(partial.name, planned)], partial.parent, meta,
                 dict.fromkeys(names, out_dtype), opts)
    os.replace(partial, path)
    return PriorResult(path, len(names), node.missing, path.stat().st_size)


class PriorFile:
    """A prior file's header: tensor names and shapes, provenance, and the projections its
    maker allowed to be missing. Tensors are read one at a time with :meth:`tensor`."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"{self.path}: no such prior file")
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})"
                                  ) from None
        if meta.get("format") != PRIOR_FORMAT:
            raise CheckpointError(f"{self.path}: not a DRIFT prior (format "
                                  f"{meta.get('format')!r}; make one with surgery drift-prior)")
        self.provenance: dict[str, Any] = json.loads(meta.get("provenance", "{}"))
        self.missing: list[str] = list(self.provenance.get("missing", []))

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(name)


class DriftPriorParams(Params):
    reasoning: str
    target: str
    dtype: str | None = Field(None, description="of the file (default float32)")
    map: dict[str, str] | None = Field(None, description="regex -> replacement on the "
                                       "reasoning model's names")
    allow_missing: list[str] | None = Field(None, description="target projections allowed "
                                            "to have no prior (names, kinds, globs, re:)")
    out: str | None = Field(None, description="also write the prior to this file")
