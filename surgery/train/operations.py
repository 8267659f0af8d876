"""Recipe steps that train or make training data: ``op: finetune`` and ``op: distill_data``.

Both work at write time, when an output first needs them, into content-addressed folders of
the cache (``$WEIGHT_SURGERY_CACHE``): the key hashes the input files' bytes, the expression,
the parameters and the data, so later steps stream from the result and a rerun reuses it.
Planning reads no weights: names and shapes come from the input's headers and a model built on
the meta device, and the data is read and tokenized to check it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from surgery.checkpoint import Checkpoint, open_checkpoint
from surgery.checkpoint.hashing import cache_dir
from surgery.data import Record, read_records
from surgery.errors import UsageError
from surgery.evaluate.layers import find_blocks
from surgery.expr import EvalContext, Node, TensorSpec, Weights
from surgery.expr.weights import weights_label
from surgery.methods.drift import DRIFT_REF, DriftPriorParams, PriorFile
from surgery.methods.registry import Operation, Resolve
from surgery.methods.soup import Params
from surgery.train.config import TrainConfig
from surgery.train.corda import adapter_fingerprint, adapter_parameters
from surgery.train.data import Task, check_fits, classes, file_sha256, load_train_data, task_of
from surgery.train.distill import DISTILL_REF, distill_data
from surgery.train.drift import DriftPriorStep, check_prior
from surgery.train.hooks import TrainableSet
from surgery.train.loop import TrainCallback, card_section, finetune, memory_estimate
from surgery.train.model import FINETUNE_REF, TrainedNode, content_key, trained_config
from surgery.train.objectives import Sorted, exits, make_objective


class FinetuneParams(TrainConfig):
    model: str
    data: str = Field(description="JSONL file, or a distill_data step")


class DistillDataParams(Params):
    teacher: str
    data: str = Field(description="prompt+completion JSONL file")
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=2)
    chat: bool = Field(False, description="prompts through the teacher's chat template")
    device: str = "auto"


class DistilledData:
    """The file a ``distill_data`` step writes, made on first use into the cache."""

    kind = "completion"

    def __init__(self, teacher: Weights, params: DistillDataParams) -> None:
        self.teacher = teacher
        self.params = params
        self.records = read_records(params.data)
        if self.records[0].kind != "completion":
            raise UsageError(f"{params.data}: distill_data regenerates completions; the file "
                             f"holds {self.records[0].kind} records, not prompt+completion")
        self.key = content_key(teacher.node, [file_sha256(params.data), params.model_dump(
            exclude={"device"})])
        self._path: Path | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        with self._lock:
            if self._path is None:
                target = cache_dir() / "data" / f"distilled-{self.key}.jsonl"
                if not target.is_file():
                    p = self.params
                    distill_data(self.teacher, p.data, target, max_new_tokens=p.max_new_tokens,
                                 batch_size=p.batch_size, max_length=p.max_length,
                                 chat=p.chat, device=p.device)
                self._path = target
            return self._path


def meta_model(config: dict, task: Task, records: list[Record], where: str) -> Any:
    """The model transformers would build for training, on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if "model_type" not in config:
        raise UsageError(f"{where}: config.json has no model_type; transformers cannot build "
                         "the model to train")
    cfg = dict(config)
    if task == "classification":
        label2id, num_labels = classes(records, config)
        cfg["num_labels"] = num_labels
        if label2id:
            cfg["label2id"] = label2id
            cfg["id2label"] = {i: n for n, i in label2id.items()}
        elif len(cfg.get("id2label") or {}) != num_labels:
            cfg.pop("id2label", None)  # the head grows: the model's own maps no longer fit
            cfg.pop("label2id", None)
    try:
        built = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            auto = AutoModelForSequenceClassification if task == "classification" else \
                AutoModelForCausalLM
            return auto.from_config(built)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{where}: transformers cannot build this model "
                         f"({str(e).splitlines()[0]})") from None


@dataclass
class TrainingPlan:
    """What ``surgery plan`` says of a finetune (or graft) step."""

    memory_bytes: int
    tokens_per_step: float | None  # None: the data is made by an earlier step
    examples: int | None
    truncated: int | None
    trainable: str
    memory_parts: str = "weights, gradients, AdamW moments, activations"
    kind: str = "training"


class FinetuneNode(Node):
    """The model ``op: finetune`` trains, trained (or found in the cache) on first use."""

    op = "finetune"
    reference = FINETUNE_REF

    def __init__(self, source: Weights, data: str | DistilledData, config: TrainConfig,
                 prior: DriftPriorStep | None = None) -> None:
        super().__init__()
        self.prior = prior
        self.source = source
        self.inputs = (source.node,)
        self.data = data
        self.settings = config
        records = data.records if isinstance(data, DistilledData) else read_records(data)
        self.task = task_of(records)
        label = weights_label(source)
        check_fits(self.task, source.config, self.data_name, label)
        meta = meta_model(source.config, self.task, records, label)
        self.meta = meta
        seed = config.seed if config.hft_seed is None else config.hft_seed
        self.trainable = set(TrainableSet(config.trainable, seed).select(
            [n for n, _ in meta.named_parameters()]))
        if config.drift is not None:
            self._check_drift(config.drift.prior,
                              {n: tuple(p.shape) for n, p in meta.named_parameters()})
        self.layout = TrainedNode(source.node, meta, trained_config(source.node, meta,
                                                                    self.task), {})
        tokenizer = tokenizer_of(source)
        objective = make_objective(config, tokenizer, self.task)
        if isinstance(objective, Sorted):
            exits(len(find_blocks(meta)), objective.every)
        # Tokenize now, so that data too long for max_length fails before anything is written
        # (distilled data exists only once its step has run).
        self.encoded = None if isinstance(data, DistilledData) else load_train_data(
            data, tokenizer, source.config, max_length=config.max_length, chat=config.chat,
            add_eos=config.add_eos, model=label)
        self.on_event: TrainCallback | None = None
        self._checkpoint: Checkpoint | None = None
        self._key: str | None = None
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        """The cache key: input files' bytes, expression, settings, data (hashed on first
        use, not when planning)."""
        if self._key is None:
            data = self.data.key if isinstance(self.data, DistilledData) else \
                file_sha256(self.data)
            evals = file_sha256(self.settings.eval_data) if self.settings.eval_data else None
            extra = [self.settings.model_dump(mode="json", exclude={"device"}), data, evals]
            if self.settings.drift is not None:
                extra.append(self.prior.key if self.prior is not None else
                             file_sha256(self.settings.drift.prior))
            if self.settings.adapter is not None:
                extra.append(adapter_fingerprint(self.settings.adapter))
            self._key = content_key(self.source.node, extra)
        return self._key

    @property
    def data_name(self) -> str:
        return self.data.params.data if isinstance(self.data, DistilledData) else self.data

    @property
    def folder(self) -> Path:
        return cache_dir() / "finetune" / self.key

    @property
    def checkpoint(self) -> Checkpoint:
        with self._lock:
            if self._checkpoint is None:
                if not (self.folder / "config.json").is_file():
                    data = self.data.path if isinstance(self.data, DistilledData) else self.data
                    settings = self.settings.model_dump(exclude_unset=True)
                    if self.prior is not None:  # a drift_prior step: its file, made now
                        settings["drift"]["prior"] = str(self.prior.path)
                    finetune(self.source, data, out=self.folder, progress=self.on_event,
                             **settings)
                self._checkpoint = open_checkpoint(str(self.folder))
            return self._checkpoint

    def _check_drift(self, prior: str, shapes: dict[str, tuple[int, ...]]) -> None:
        """The prior fits the model and covers every trainable projection (plan time)."""
        if self.prior is not None:
            check_prior(f"step {prior!r}", self.prior.shapes, self.prior.node.missing, shapes,
                        self.trainable)
        else:
            f = PriorFile(prior)
            check_prior(str(f.path), f.shapes, f.missing, shapes, self.trainable)

    def plan(self) -> TrainingPlan:
        """The run's memory estimate and tokens per update (from the tokenized data)."""
        trainable = sum(p.numel() for n, p in self.meta.named_parameters()
                        if n in self.trainable)
        if self.settings.adapter is not None:
            trainable = adapter_parameters(self.meta, self.settings.adapter)
        total = sum(p.numel() for p in self.meta.parameters())
        memory = memory_estimate(self.meta, trainable, self.settings)
        if self.encoded is None:  # distilled data: its length is known once it is made
            return TrainingPlan(memory, None, None, None, f"{trainable:,} of {total:,} "
                                "parameters trainable")
        data = self.encoded
        per_example = data.tokens / max(1, len(data.examples))
        return TrainingPlan(memory, per_example * self.settings.examples_per_step,
                            len(data.examples), data.truncated,
                            f"{trainable:,} of {total:,} parameters trainable")

    def params(self) -> dict[str, Any]:
        return {"settings": self.settings.model_dump(mode="json", exclude_unset=True),
                "data": Path(self.data_name).name, "cache_key": self.key}

    def _record(self) -> dict[str, Any]:
        self.checkpoint  # noqa: B018  (trains first if needed)
        return json.loads((self.folder / "provenance.json").read_text())["training"]

    def card_sections(self) -> dict[str, str]:
        return {"Fine-tuning": card_section(self._record())}

    def provenance_records(self) -> dict[str, Any]:
        return {"training": {**self._record(), "cache": str(self.folder)}}

    def config(self) -> dict:
        return self.checkpoint.config if self._checkpoint is not None else self.layout.config()

    def _list_names(self) -> list[str]:
        return self.layout.names()

    def spec(self, name: str) -> TensorSpec:
        return self.layout.spec(name)

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        return []  # read from the trained checkpoint in compute, not from the input

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        return ctx.read(self.checkpoint, name)


def tokenizer_of(source: Weights) -> Any:
    from transformers import AutoTokenizer

    from surgery.engine.run import output_tokenizer

    files = output_tokenizer(source.node, source.node.checkpoints(), None)
    if not files:
        raise UsageError(f"{weights_label(source)}: no tokenizer files to train with")
    return AutoTokenizer.from_pretrained(str(files[0].parent))


def _build_finetune(p: FinetuneParams, get: Resolve) -> Weights:
    settings = p.model_dump(include=p.model_fields_set - {"model", "data"})
    config = TrainConfig.model_validate(settings)
    try:  # a distill_data step (the recipe checked that no model goes by this name) ...
        data: str | DistilledData = get(p.data)  # type: ignore[assignment]
    except KeyError:  # ... or a file
        data = p.data
    prior = None
    if config.drift is not None:
        try:  # a drift_prior step, or a file
            prior = get(config.drift.prior)
        except KeyError:
            prior = None
        if prior is not None and not isinstance(prior, DriftPriorStep):
            raise UsageError(f"drift: prior {config.drift.prior!r} is a model; give a prior "
                             "file or a drift_prior step")
    return Weights(FinetuneNode(get(p.model), data, config, prior))


def _build_drift_prior(p: DriftPriorParams, get: Resolve) -> Any:
    return DriftPriorStep(get(p.reasoning), get(p.target), p)


def _build_distill_data(p: DistillDataParams, get: Resolve) -> Any:
    return DistilledData(get(p.teacher), p)


TRAIN_OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("finetune", "Fine-tune a model on JSONL data (SFT, DFT, ASFT, masked "
                  "thought, sorted; HFT or pattern trainable sets)", FINETUNE_REF,
                  FinetuneParams, ("model",), _build_finetune, data_fields=("data",)),
        Operation("distill_data", "Regenerate a prompt+completion file's completions with a "
                  "teacher (self-data distillation)", DISTILL_REF, DistillDataParams,
                  ("teacher",), _build_distill_data, yields="data"),
        Operation("drift_prior", "DRIFT's reasoning prior: reasoning minus target over the "
                  "attention and MLP projections, a file for finetune's drift", DRIFT_REF,
                  DriftPriorParams, ("reasoning", "target"), _build_drift_prior,
                  yields="data"),
    )
}
