"""The fine-tune step, top to bottom: set-up, the update (forward, loss, backward, gradient
transforms, clip, AdamW step, zero), logging, evaluation and resumable checkpoints.

Every data-driven method stands on this one loop through three extension points: the
*trainable set* (HFT's half, an adapter's matrices), *gradient transforms* run between backward
and the optimiser step (LT-SFT's mask, DRIFT's bias) and the *objective* (SFT, DFT, ASFT,
masked thought, sorted fine-tuning). The result leaves through the streaming writer, like any
merge: shards, index, config, tokenizer, provenance and model card.

Determinism: data order is a permutation per (seed, epoch), random choices of objectives are
seeded per example, and the torch RNG (dropout, a new classifier head) is seeded once and
saved in each checkpoint, so the same command gives bit-identical weights on the CPU, and a
run resumed from ``OUT.partial`` equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from surgery.data import read_records
from surgery.engine import output_fingerprint, resolve_device, save
from surgery.engine.run import SaveResult
from surgery.errors import UsageError
from surgery.evaluate.metrics import evaluate_model
from surgery.expr import Weights
from surgery.names import TensorKind, tensor_kind
from surgery.train import ddp
from surgery.train.adapter import LoraAdapter, TrainedAdapterNode, attach, detach_trained
from surgery.train.config import TrainConfig
from surgery.train.corda import prepare_adapter
from surgery.train.data import (
    Batch,
    TrainData,
    epoch_order,
    file_sha256,
    load_train_data,
    make_batch,
)
from surgery.train.hooks import GradientTransform, TrainableSet
from surgery.train.model import (
    ModelSource,
    TrainedNode,
    load_for_training,
    resolve_source,
    trained_config,
)
from surgery.train.objectives import Objective, make_objective, targets
from surgery.train.state import Progress, load_state, save_state
from surgery.writer import OutputDir
from surgery.writer.output import SCRATCH


@dataclass
class TrainEvent:
    """Reported after every update (and after each evaluation, with ``eval`` set)."""

    step: int
    steps: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    eval: dict[str, float] | None = None


TrainCallback = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    path: Path
    steps: int
    history: list[dict[str, Any]]
    data: dict[str, Any]
    trainable_params: int
    frozen_params: int
    transforms: dict[str, int]
    resumed_from: int
    saved: SaveResult | None  # None on the processes of a multi-process run but rank 0
    provenance: dict[str, Any] = field(default_factory=dict)


def parse_config(settings: dict[str, Any]) -> TrainConfig:
    """``TrainConfig`` from keyword settings, with pydantic's complaint as one line."""
    try:
        return TrainConfig.model_validate(settings)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(where, list(TrainConfig.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"finetune: unknown parameter {where!r}{hint}") from None
        msg = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"finetune: {where + ': ' if where else ''}{msg}") from None


def lr_at(config: TrainConfig, step: int, total: int) -> float:
    """The learning rate of update ``step`` (0-based) of ``total``: linear warm-up from 0 over
    ``warmup`` updates, then constant, linear decay to 0, or cosine decay to 0 (the
    conventions of transformers' schedulers)."""
    if step < config.warmup:
        return config.lr * step / config.warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup) / max(1, total - config.warmup)
    if config.schedule == "linear":
        return config.lr * max(0.0, 1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(config: TrainConfig, examples: int) -> int:
    if config.steps is not None:
        return config.steps
    assert config.epochs is not None
    return max(1, math.ceil(config.epochs * examples / config.examples_per_step))


def micro_batches(data: TrainData, config: TrainConfig, consumed: int, pad_id: int
                  ) -> tuple[list[Batch], int]:
    """The forward passes of the next update, from example ``consumed`` of the endless
    stream of epochs; a pass never spans two epochs. Returns the new position."""
    n = len(data.examples)
    out = []
    for _ in range(config.grad_accum):
        epoch, at = divmod(consumed, n)
        take = min(config.batch_size, n - at)
        order = epoch_order(n, config.seed, epoch)
        out.append(make_batch(data, order[at:at + take], epoch, pad_id))
        consumed += take
    return out, consumed


def _decays(name: str) -> bool:
    return tensor_kind(name) not in (TensorKind.NORM, TensorKind.BIAS)


def make_optimizer(params: dict[str, torch.nn.Parameter], config: TrainConfig
                   ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen ones get no state); with decay,
    norms and biases are not decayed, as transformers' Trainer does."""
    kwargs = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
    if not config.weight_decay:
        return torch.optim.AdamW(list(params.values()), weight_decay=0.0, **kwargs)
    groups = [{"params": [p for n, p in params.items() if _decays(n)],
               "weight_decay": config.weight_decay},
              {"params": [p for n, p in params.items() if not _decays(n)],
               "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)


# Builds the optimiser of a run from its trainable parameters and settings (default
# :func:`make_optimizer`; LT-SFT's phase 2 passes a masked AdamW).
OptimizerFactory = Callable[[dict[str, torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]


class _Interrupt:
    """Ctrl-C during training: the first ends the run at the next update boundary, after
    saving resumable state; a second one stops at once."""

    def __init__(self) -> None:
        self.asked = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.asked:
                raise KeyboardInterrupt
            self.asked = True

        old = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or \
        "out of memory" in str(e).lower() or "can't allocate memory" in str(e)


class Trainer:
    """One run's state; :func:`finetune` builds it, runs it and saves the result."""

    def __init__(self, source: ModelSource, data_path: str | Path, config: TrainConfig,
                 transforms: Sequence[GradientTransform] = (),
                 optimizer: OptimizerFactory | None = None,
                 adapter: LoraAdapter | None = None) -> None:
        self.source = source
        self.config = config
        self.optimizer_factory = optimizer or make_optimizer
        self.device = ddp.device_for_rank(resolve_device(config.device))
        self.rank, self.world_size = ddp.world(self.device)
        ddp.check_divides(config.grad_accum, self.world_size)
        torch.manual_seed(config.seed)
        records = read_records(data_path)
        self.model, self.tokenizer, self.task = load_for_training(source, records, config,
                                                                  str(data_path))
        self.data = load_train_data(data_path, self.tokenizer, self.model.config.to_dict(),
                                    max_length=config.max_length, chat=config.chat,
                                    add_eos=config.add_eos, model=source.label)
        if self.data.label2id:
            self.model.config.label2id = dict(self.data.label2id)
            self.model.config.id2label = {i: n for n, i in self.data.label2id.items()}
        self.eval_records = read_records(config.eval_data) if config.eval_data else None
        self.eval_sha256 = file_sha256(config.eval_data) if config.eval_data else None
        self.resumed_from = 0
        self.objective: Objective = make_objective(config, self.tokenizer, self.task)
        self.adapter = adapter
        if adapter is not None and self.task != "lm":
            raise UsageError("adapter training is for causal language models, not "
                             "classifiers")
        lora = attach(self.model, adapter) if adapter is not None else None
        names = [n for n, _ in self.model.named_parameters()]
        hft_seed = config.seed if config.hft_seed is None else config.hft_seed
        chosen = set(lora) if lora is not None else \
            set(TrainableSet(config.trainable, hft_seed).select(names))
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in chosen)
            if name in chosen:
                self.params[name] = p
        self.frozen = sum(p.numel() for n, p in self.model.named_parameters() if n not in chosen)
        self.transforms: list[tuple[GradientTransform, list[str]]] = []
        if config.drift is not None:
            from surgery.train.drift import DriftBias

            d = config.drift
            transforms = [*transforms, DriftBias(d.prior, d.mode, d.alpha)]
        for t in transforms:
            t.bind(self.model)
            attached = t.attach(self.params)
            if not attached:
                raise UsageError(f"{t.name}: attaches to no trainable parameter")
            self.transforms.append((t, attached))
        self.steps = total_steps(config, len(self.data.examples))
        self.pad_id = next((int(t) for t in (self.tokenizer.pad_token_id,
                                             self.tokenizer.eos_token_id) if t is not None), 0)
        self.node: TrainedNode | TrainedAdapterNode = TrainedNode(
            source.node, self.model, trained_config(source.node, self.model, self.task),
            self.describe()) if adapter is None else \
            TrainedAdapterNode(source.node, self.model, adapter, self.describe())

    def describe(self) -> dict[str, Any]:
        """Everything that determines the result: settings, data, objective, hooks."""
        return {"settings": self.config.model_dump(mode="json"),
                "data": {"path": Path(self.data.path).name, "sha256": self.data.sha256},
                "eval_data_sha256": self.eval_sha256,
                "objective": {"name": self.objective.name, **self.objective.params()},
                "trainable": self.config.trainable or ("adapter A and B" if self.adapter
                                                       else "all"),
                "transforms": [{"name": t.name, **t.params()} for t, _ in self.transforms],
                "task": self.task}

    def run(self, progress: Progress, on_event: TrainCallback | None, scratch: Path | None,
            interrupt: _Interrupt) -> Progress:
        model, config = self.model.to(self.device), self.config
        reference = None
        if self.objective.needs_reference_model:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        if config.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = self.optimizer_factory(self.params, config)
        if scratch is not None:
            restored = load_state(scratch, self.params, optimizer)
            if restored is not None:
                progress = restored
                self.resumed_from = restored.step
        model.train()
        rank, size = self.rank, self.world_size
        while progress.step < self.steps:
            started = time.perf_counter()
            passes, consumed = micro_batches(self.data, config, progress.consumed, self.pad_id)
            passes = [self.objective.prepare(b, config.seed) for b in passes]
            count = sum(targets(b, self.task) for b in passes)
            loss_value, tokens = 0.0, 0
            for b in ddp.share(passes, rank, size) if size > 1 else passes:
                b = b.to(self.device)
                with _autocast(self.device):
                    loss = self.objective.loss_sum(model, b, self.task, reference) / count
                loss.backward()
                loss_value += float(loss.detach())
                tokens += int(b.attention_mask.sum())
            if size > 1:  # every process now holds the whole update's gradient
                loss_value, tokens = ddp.all_reduce(list(self.params.values()), loss_value,
                                                    tokens)
            if not math.isfinite(loss_value):
                kept = f"the checkpoint of update {self._saved_step(scratch)} is kept in " \
                    f"{scratch.parent}" if scratch and self._saved_step(scratch) else \
                    "no checkpoint was saved"
                raise TrainingDiverged(f"update {progress.step + 1}: the loss is "
                                       f"{loss_value}; stopped before applying it ({kept}); "
                                       "lower lr or set clip")
            for t, names in self.transforms:
                for name in names:
                    grad = self.params[name].grad
                    if grad is not None:
                        t(name, self.params[name], grad)
            if config.clip is not None:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), config.clip)
            lr = lr_at(config, progress.step, self.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.consumed = consumed
            elapsed = time.perf_counter() - started
            progress.history.append({"step": progress.step, "loss": loss_value, "lr": lr,
                                     "tokens": tokens})
            event = TrainEvent(progress.step, self.steps, loss_value, lr, tokens,
                               tokens / elapsed if elapsed > 0 else 0.0)
            try:
                if on_event:
                    on_event(event)
                self._maybe_evaluate(progress, on_event, event)
                if interrupt.asked:
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                if scratch is not None and rank == 0:
                    save_state(scratch, self.params, optimizer, progress)
                raise
            if scratch is not None and rank == 0 and config.checkpoint_every and \
                    progress.step % config.checkpoint_every == 0 and progress.step < self.steps:
                save_state(scratch, self.params, optimizer, progress)
        model.eval()
        return progress

    @staticmethod
    def _saved_step(scratch: Path) -> int:
        found = sorted(scratch.glob("step-*"))
        return int(found[-1].name.split("-")[1]) if found else 0

    def _maybe_evaluate(self, progress: Progress, on_event: TrainCallback | None,
                        event: TrainEvent) -> None:
        every = self.config.eval_every
        if self.eval_records is None or not every or progress.step % every:
            return
        metric = "accuracy" if self.task == "classification" else "perplexity"
        self.model.eval()
        try:
            result = evaluate_model(self.model, self.tokenizer, self.eval_records, metric,
                                    self.config.batch_size, self.config.max_length)
        finally:
            self.model.train()
        progress.history[-1]["eval_" + metric] = result.value
        if on_event:
            on_event(TrainEvent(event.step, event.steps, event.loss, event.lr, event.tokens,
                                event.tokens_per_s, {metric: result.value}))

    def estimate_bytes(self) -> int:
        return memory_estimate(self.model, sum(p.numel() for p in self.params.values()),
                               self.config)


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite; the run stopped before applying that update."""


def activation_bytes(model: Any, tokens: int, gradient_checkpointing: bool = False) -> int:
    """Bytes of float32 activations a forward and backward pass over ``tokens`` tokens keeps:
    per block about 34 values per token and hidden unit (one block's worth, plus each block's
    input, with gradient checkpointing), and three copies of a language model's logits (a
    classifier's are a few values per example)."""
    cfg = model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 0)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    logits = 3 * tokens * vocab * 4 if model.get_output_embeddings() is not None else 0
    if gradient_checkpointing:
        return tokens * hidden * layers * 4 + tokens * hidden * 34 * 4 + logits
    return tokens * hidden * layers * 34 * 4 + logits


def memory_estimate(model: Any, trainable: int, config: TrainConfig) -> int:
    """Bytes a CPU float32 run holds, roughly: the weights, the gradients and AdamW's two
    moments of the trainable ones, and the activations (:func:`activation_bytes`)."""
    total = sum(p.numel() for p in model.parameters())
    tokens = config.batch_size * config.max_length
    return total * 4 + trainable * 12 + activation_bytes(model, tokens,
                                                         config.gradient_checkpointing)


def finetune(model: str | Path | Weights, data: str | Path, *, out: str | Path,
             hooks: Sequence[GradientTransform] = (), progress: TrainCallback | None = None,
             force: bool = False, dtype: str | torch.dtype | None = None,
             shard_size: int | str = "5GB", recipe_text: str | None = None,
             optimizer: OptimizerFactory | None = None, **settings: Any) -> TrainResult:
    """Fine-tune ``model`` (a path, a Hub id or a lazy ``Weights`` expression, materialised
    once) on the JSONL file ``data`` and write the result to ``out``.

    ``settings`` are the fields of :class:`surgery.train.TrainConfig` (``steps`` or
    ``epochs``, ``lr``, ``batch_size``, ``grad_accum``, ``max_length``, ``schedule``,
    ``warmup``, ``weight_decay``, ``clip``, ``seed``, ``device``, ``objective``,
    ``trainable``, ``eval_data``, ``eval_every``, ``checkpoint_every``, ...). ``hooks`` are
    gradient transforms; ``progress`` gets a :class:`TrainEvent` after every update;
    ``optimizer`` builds the optimiser from the trainable parameters and the settings
    (default: AdamW, :func:`make_optimizer`).

    With ``checkpoint_every`` (and on Ctrl-C) the training state goes into ``OUT.partial``;
    rerunning the same call resumes there, with the result of an uninterrupted run.
    """
    config = parse_config(settings)
    adapter, adapter_record = None, None
    if config.adapter is not None:
        model, adapter, adapter_record = prepare_adapter(model, config.adapter)
    source = resolve_source(model)
    trainer = Trainer(source, data, config, hooks, optimizer, adapter)
    save_args: dict[str, Any] = {"dtype": dtype, "shard_size": shard_size, "device": "cpu",
                                 "seed": config.seed, "recipe_text": recipe_text}
    outdir = OutputDir(Path(out), force=force, inputs=[ck.root for ck in source.checkpoints])
    if trainer.rank == 0:  # the other processes of a multi-process run only train
        outdir.start(output_fingerprint(trainer.node, **save_args))
    ddp.barrier()
    scratch = outdir.scratch() if trainer.rank == 0 else outdir.partial / SCRATCH
    interrupt = _Interrupt()
    try:
        with interrupt.installed():
            done = trainer.run(Progress(), progress, scratch, interrupt)
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        raise UsageError(f"out of memory while training ({str(e).splitlines()[0]}); the "
                         f"estimate for these settings is {trainer.estimate_bytes() / 1e9:.2f} "
                         "GB: lower batch_size or max_length, or set gradient_checkpointing"
                         ) from None
    trainer.node.capture()
    history = done.history
    record = {**trainer.describe(), "steps": done.step, "data": trainer.data.summary(),
              "trainable_params": sum(p.numel() for p in trainer.params.values()),
              "frozen_params": trainer.frozen,
              "transforms": {t.name: len(names) for t, names in trainer.transforms},
              "loss_first": history[0]["loss"] if history else None,
              "loss_last": history[-1]["loss"] if history else None,
              "history": history,
              "resumed_from_update": trainer.resumed_from, "adapter": adapter_record,
              "device": trainer.device.type, "model": source.label}
    if trainer.rank != 0:
        ddp.barrier()  # rank 0 writes the output
        return TrainResult(Path(out), done.step, history, trainer.data.summary(),
                           record["trainable_params"], trainer.frozen, record["transforms"],
                           trainer.resumed_from, None,
                           json.loads((Path(out) / "provenance.json").read_text()))
    saved = save(trainer.node, out, force=force, extra_provenance={"training": record},
                 extra_sections={"Fine-tuning": card_section(record)}, **save_args)
    if adapter is not None:  # the trained adapter too, for the model training started from
        trained = detach_trained(trainer.model, adapter)
        trained.base_model = str(source.directory)
        trained.save(saved.path / "adapter", force=True)
    ddp.barrier()
    return TrainResult(saved.path, done.step, history, trainer.data.summary(),
                       record["trainable_params"], trainer.frozen, record["transforms"],
                       trainer.resumed_from, saved, saved.provenance)


def card_section(record: dict[str, Any]) -> str:
    s = record["settings"]
    data = record["data"]
    first, last = record["loss_first"], record["loss_last"]
    lines = [f"Fine-tuned from `{record['model']}` with objective `{record['objective']['name']}` "
             f"for {record['steps']} updates (batch {s['batch_size']} x {s['grad_accum']}, "
             f"lr {s['lr']:g}, {s['schedule']} schedule, seed {s['seed']}) on "
             f"`{Path(data['path']).name}` ({data['examples']} examples, sha256 "
             f"`{data['sha256'][:16]}...`).",
             "",
             f"- trainable parameters: {record['trainable_params']:,} "
             f"(frozen {record['frozen_params']:,}; set: {record['trainable']})"]
    if first is not None:
        lines.append(f"- loss: {first:.4f} at the first update, {last:.4f} at the last")
    if data["truncated"] or data["dropped"]:
        lines.append(f"- {data['truncated']} example(s) truncated at {s['max_length']} tokens, "
                     f"{data['dropped']} dropped with no target left")
    for name, count in record["transforms"].items():
        lines.append(f"- {name}: on {count} tensor(s)")
    if record.get("adapter"):
        a = record["adapter"]
        lines.append(f"- adapter: {a['method']} rank {a['r']} on {a['layers']} layer(s), "
                     "merged into this checkpoint; trained A and B in `adapter/`")
    return "\n".join(lines)
