"""The model a fine-tune starts from and the node its result leaves through.

A start is a model directory, a Hub id, or a lazy ``Weights`` expression; an expression is
materialised once by the streaming engine into a content-addressed folder of the cache
(``$WEIGHT_SURGERY_CACHE/models/<hash>``), so transformers can load it and a rerun reuses it.
The trained weights go out through :class:`TrainedNode`: the input's tensor names in the
input's order (tied weights stay tied, tensors the model does not hold are copied from the
input), then tensors training created (a new classification head) in float32.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.checkpoint import Checkpoint, open_checkpoint
from surgery.checkpoint.hashing import cache_dir, cached_sha256
from surgery.data import Record
from surgery.engine import save
from surgery.errors import UsageError
from surgery.expr import EvalContext, LoadNode, Node, TensorSpec, Weights
from surgery.train.config import TrainConfig
from surgery.train.data import Task, check_fits, classes, task_of

FINETUNE_REF = "weight-surgery fine-tune step (AdamW)"


@dataclass
class ModelSource:
    """Where training starts: the graph node (for provenance and names), the directory
    transformers loads, and what the user called it."""

    node: Node
    directory: Path
    label: str

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return list(dict.fromkeys(self.node.checkpoints()))


def content_key(node: Node, extra: Any = None) -> str:
    """A hash of an expression and the bytes of every file it reads: equal keys, equal
    results."""
    files = {str(f): cached_sha256(f) for ck in dict.fromkeys(node.checkpoints())
             for f in ck.files if f.is_file()}
    doc = json.dumps([node.describe(), sorted(files.values()), extra], sort_keys=True,
                     default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


def materialise(weights: Weights) -> Path:
    """A model directory holding ``weights``: its own folder for a plain checkpoint, else a
    cached folder written once by the engine."""
    node = weights.node
    if isinstance(node, LoadNode) and (node.checkpoint.root / "config.json").is_file() \
            and node.checkpoint.root.is_dir():
        return node.checkpoint.root
    if not node.config():
        raise UsageError(f"{node.op}: the model has no config.json; transformers cannot "
                         "load it for training")
    target = cache_dir() / "models" / content_key(node)
    if not (target / "config.json").is_file():
        save(node, target, device="cpu", hash_inputs=False, force=False)
    return target


def resolve_source(model: str | Path | Weights) -> ModelSource:
    if isinstance(model, Weights):
        weights, label = model, f"result of {model.node.op}" if not isinstance(
            model.node, LoadNode) else model.node.checkpoint.source
    else:
        weights = Weights(LoadNode(open_checkpoint(str(model))))
        label = str(model)
    return ModelSource(weights.node, materialise(weights), label)


def load_for_training(source: ModelSource, records: Sequence[Record], config: TrainConfig,
                      data: str) -> tuple[Any, Any, Task]:
    """The transformers model (float32, on the CPU) and tokenizer for ``records``: a causal
    LM for text and prompt+completion, a sequence classifier for text+label (a head for the
    data's classes is created, seeded, when the checkpoint's does not fit)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    task = task_of(records)
    cfg = source.node.config()
    check_fits(task, cfg, data, source.label)
    where = source.directory
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where))
        if task == "lm":
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32)
        else:
            label2id, num_labels = classes(records, cfg)
            maps = {"label2id": label2id,
                    "id2label": {i: n for n, i in label2id.items()}} if label2id else {}
            model = AutoModelForSequenceClassification.from_pretrained(
                str(where), dtype=torch.float32, num_labels=num_labels,
                ignore_mismatched_sizes=True, **maps)
    except (OSError, ValueError) as e:
        raise UsageError(f"{source.label}: cannot load as a transformers model for training "
                         f"({str(e).splitlines()[0]})") from None
    return model, tokenizer, task


def trained_config(source: Node, model: Any, task: Task) -> dict:
    """config.json of the result: the input's, with a classifier's architecture and label
    maps."""
    cfg = source.config()
    if task == "classification":
        cfg["architectures"] = [type(model).__name__]
        cfg["id2label"] = {str(k): v for k, v in model.config.id2label.items()}
        cfg["label2id"] = {str(k): int(v) for k, v in model.config.label2id.items()}
    return cfg


class TrainedNode(Node):
    """The trained weights of ``model`` under the names of ``source`` (see the module
    docstring). Built before training, so its names, specs and parameters fix the output's
    plan and resume fingerprint; :meth:`capture` takes the values once training ends."""

    op = "finetune"
    reference = FINETUNE_REF

    def __init__(self, source: Node, model: Any, config: dict, params: dict[str, Any]) -> None:
        super().__init__()
        self.inputs = (source,)
        self.model = model
        self._config = config
        self._params = params
        state = model.state_dict(keep_vars=True)
        own = set(source.names())
        self.trained = {n for n in own if n in state}
        new = [n for n, _ in model.named_parameters() if n not in own]
        self._order = [*source.names(), *new]
        self._specs: dict[str, TensorSpec] = {}
        for name in self._order:
            if name in own:
                spec = source.spec(name)
                if name in state and tuple(state[name].shape) != spec.shape:
                    raise UsageError(f"tensor {name!r}: the model holds shape "
                                     f"{list(state[name].shape)}, the checkpoint "
                                     f"{list(spec.shape)}")
                self._specs[name] = spec
            else:
                self.trained.add(name)
                self._specs[name] = TensorSpec(tuple(state[name].shape), torch.float32)
        self.tensors: dict[str, torch.Tensor] | None = None

    def capture(self) -> None:
        state = self.model.state_dict()
        self.tensors = {n: state[n].detach().to("cpu", copy=True) for n in self.trained}

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def config(self) -> dict:
        return json.loads(json.dumps(self._config))

    def _list_names(self) -> list[str]:
        return self._order

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        return [] if name in self.trained else [(self.inputs[0], name)]

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        if name not in self.trained:
            return ctx.value(self.inputs[0], name)
        if self.tensors is None:
            raise RuntimeError("TrainedNode saved before training captured its weights")
        return self.tensors[name].to(ctx.device)
