"""Planning and running a validated recipe."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.engine import (
    ProgressEvent,
    SaveResult,
    download_bytes,
    estimate_peak_bytes,
    parse_dtype,
    plan_output,
    save,
)
from surgery.engine.run import graph_tokenizer
from surgery.engine.stream import ProgressFn
from surgery.evaluate.operations import GreedySoupParams
from surgery.hub import PushResult, push_folder
from surgery.methods.greedy_soup import GreedySoupNode
from surgery.recipe.build import Recipe
from surgery.recipe.schema import PushSpec
from surgery.train.graft import GraftCallback, GraftNode, TrainedMask
from surgery.train.loop import TrainCallback
from surgery.train.operations import FinetuneNode, TrainingPlan
from surgery.writer import parse_size


@dataclass
class OutputPlan:
    path: str
    source: str
    tensors: int
    bytes: int
    shards: int
    peak_bytes: int
    dtype: str | None
    download_bytes: int = 0
    push_to: str | None = None


@dataclass
class PlanReport:
    inputs: list[tuple[str, str, int, int]] = field(default_factory=list)
    steps: list[tuple[str, str, dict]] = field(default_factory=list)
    outputs: list[OutputPlan] = field(default_factory=list)
    reduction_passes: int = 0
    pins: dict[str, str] = field(default_factory=dict)  # Hub input name -> commit hash
    training: list[tuple[str, TrainingPlan]] = field(default_factory=list)


def plan_recipe(recipe: Recipe) -> PlanReport:
    """What a run would do, computed from headers only."""
    report = PlanReport()
    for name, ck in recipe.checkpoints.items():
        report.inputs.append((name, ck.source, len(ck.tensors), ck.total_bytes))
        if ck.revision:
            report.pins[name] = ck.revision
    for name, (op, params) in recipe.steps.items():
        report.steps.append((name, op.name, params.model_dump(by_alias=True, exclude_none=True)))
    for out, weights in recipe.outputs():
        dtype = parse_dtype(out.dtype)
        shards = plan_output(weights.node, dtype, parse_size(out.shard_size))
        total = sum(t.nbytes for shard in shards for t in shard)
        report.outputs.append(OutputPlan(
            out.path, out.from_, len(weights), total, len(shards),
            estimate_peak_bytes(weights.node, dtype), out.dtype, download_bytes(weights.node),
            _push_target(out.push_to_hub)))
        report.reduction_passes += sum(len(n.reductions()) > 0 for n in weights.node.walk())
    report.training = [(name, node.plan()) for name, node in training_steps(recipe)]
    return report


def _needed_steps(recipe: Recipe, kind: type | tuple[type, ...]) -> list[tuple[str, Any]]:
    """The recipe's steps whose node is a ``kind`` and that some output depends on, in step
    order."""
    needed = {id(n) for _, weights in recipe.outputs() for n in weights.node.walk()}
    return [(name, node) for name in recipe.steps
            if isinstance(node := getattr(recipe.values[name], "node", None), kind)
            and id(node) in needed]


def finetune_steps(recipe: Recipe) -> list[tuple[str, FinetuneNode]]:
    """The recipe's finetune steps that some output depends on, in step order."""
    return _needed_steps(recipe, FinetuneNode)


def graft_steps(recipe: Recipe) -> list[tuple[str, GraftNode]]:
    """The recipe's graft steps that some output depends on, in step order."""
    return _needed_steps(recipe, GraftNode)


def training_steps(recipe: Recipe) -> list[tuple[str, FinetuneNode | TrainedMask]]:
    """The finetune steps and the graft steps' masks that some output depends on, in step
    order: what ``surgery plan`` estimates."""
    return [(name, node.trained if isinstance(node, GraftNode) else node)
            for name, node in _needed_steps(recipe, (FinetuneNode, GraftNode))]


@dataclass
class GreedySoupStep:
    """A greedy-soup step that an output depends on; ``node.result`` holds its decision log
    once the output is written."""

    name: str
    node: GreedySoupNode
    metric: str


def greedy_soup_steps(recipe: Recipe) -> list[GreedySoupStep]:
    """The recipe's greedy-soup steps that some output depends on, in step order."""
    needed = {id(n) for _, weights in recipe.outputs() for n in weights.node.walk()}
    found = []
    for name, (op, params) in recipe.steps.items():
        if op.yields != "model":
            continue
        node = recipe.values[name].node
        if isinstance(node, GreedySoupNode) and isinstance(params, GreedySoupParams) \
                and id(node) in needed:
            found.append(GreedySoupStep(name, node, params.metric))
    return found


def _push_target(push: PushSpec | None) -> str | None:
    return f"{push.repo}@{push.revision or 'main'}" if push else None


def run_recipe(recipe: Recipe, *, force: bool = False,
               progress: ProgressFn | None = None,
               on_output: ProgressFn | None = None,
               on_push: Callable[[PushResult], None] | None = None,
               on_train: TrainCallback | None = None,
               on_graft: GraftCallback | None = None, ray: str | None = None,
               ray_workers: int | None = None) -> list[SaveResult]:
    """Run every output of the recipe; each writes its own model directory, then is pushed
    to the Hub when the output says ``push_to_hub``. ``on_train`` gets the updates of the
    finetune steps the outputs need, ``on_graft`` the mask steps of their graft steps."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: train together, ...
        from surgery.train import ddp

        rank, _ = ddp.world()
        for _, node in finetune_steps(recipe):
            node.on_event = on_train if rank == 0 else None
            node.checkpoint  # noqa: B018  (every process, in step order)
        if rank != 0:  # ... and rank 0 alone writes the outputs
            return []
    for _, node in finetune_steps(recipe):
        node.on_event = on_train
    for _, graft_node in graft_steps(recipe):
        graft_node.trained.on_event = on_graft
    results = []
    for out, weights in recipe.outputs():
        vocab = recipe.doc.vocabulary
        source = out.tokenizer_from
        if source is None and vocab and vocab.source != "union" and not graph_tokenizer(
                weights.node):
            source = vocab.source  # the models share its vocabulary: no layout was made
        tokenizer = recipe.checkpoints[source] if source else None
        if on_output:
            on_output(ProgressEvent("output", 0, 0, 0, 0, out.path))
        common = {"dtype": out.dtype, "shard_size": out.shard_size, "seed": recipe.doc.seed,
                  "force": force, "progress": progress, "recipe_text": recipe.text,
                  "tokenizer_from": tokenizer, "chat_template": out.chat_template,
                  "extra_provenance": {"recipe_name": Path(recipe.source).name}}
        if ray is not None or out.executor == "ray":
            from surgery.engine.distributed import save_ray

            device = "cpu" if out.device == "auto" else out.device
            results.append(save_ray(weights.node, out.path, device=device,
                                    address=ray or os.environ.get("RAY_ADDRESS") or "local",
                                    workers=ray_workers, **common))
        else:
            results.append(save(weights.node, out.path, device=out.device, **common))
        push = out.push_to_hub
        if push is not None:
            pushed = push_folder(results[-1].path, push.repo, private=push.private,
                                 revision=push.revision)
            if on_push:
                on_push(pushed)
    for name, (op, params) in recipe.steps.items():  # files a step writes with out:
        if op.yields == "data" and getattr(params, "out", None) is not None:
            recipe.values[name].path  # noqa: B018  (made and copied on first use)
    return results
