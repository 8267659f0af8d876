"""Skill localization by grafting (Panigrahi et al., arXiv 2302.06600), and multi-task stitching.

A fine-tune θ1 = θ0 + τ holds its skill in few entries. Grafting finds them: over the graftable
tensors (block weights, ``attention`` and ``mlp`` kinds, by default) a relaxed mask

    γ = b + (1 − 2b) · σ(S − c)

starts at the base patch b, the top-K entries of |τ| (K = ⌊sparsity · N⌋ of the N graftable
entries; one global threshold, ties to the earlier tensor and lower index, as
:func:`surgery.methods.sparse.sparsify`), with S drawn uniform in [0, 1) (seeded) and c = 10, so
γ starts within σ(−9) ≈ 1e-4 of b. S alone is optimised, by plain gradient steps
S ← S − lr · ∂L/∂S on the task loss of the grafted model θ0 + γ ⊙ τ (base and τ frozen; the
model runs through ``torch.func.functional_call`` with the grafted tensors, so only S has a
gradient). ∂γ/∂S = (1 − 2b) σ'(S − c) is about 1e-4, hence the large default lr 1e7. Every
``score_every`` steps (and before the first) the mask is rounded and the grafted model
θ0 + round(γ) ⊙ τ scored on the training data plus the validation data; the best rounded mask
is kept and the result is θ0 + round(γ) ⊙ τ with it, written by the streaming engine, and the
mask as the bit-packed :class:`~surgery.methods.sparse.Mask` file.

Multi-task stitching: θ0 + Σi (mi / cover) ⊙ τi, cover the number of masks holding the entry;
entries no mask holds stay θ0 (:func:`graft_stitch`).

Memory: beside the fine-tuned model, θ0, τ, S and S's gradient per graftable entry (float32:
16 bytes each) and the base patch (1 byte); the kept mask is bit-packed. The model runs in
float32 on every device (no bf16 autocast: ∂γ/∂S is about 1e-4, and a bf16 loss would lose
the steps' signal).

Where we differ from the reference code (``princeton-nlp/Skill-Localization-by-grafting``,
``graft_Trainer``), and why:

- Rounding keeps exactly K entries (the K largest γ, ties to the lower index) by default
  (``rounding: top_k``), so the graft has the sparsity asked for; the reference rounds at 1/2
  and lets the count drift with the optimisation. ``rounding: half`` is the reference's rule.
  The two agree whenever the count has not drifted (in particular at the start, where both give
  the base patch).
- The loss is the fine-tune step's token-weighted mean over the update (as
  :mod:`surgery.train.objectives`); the reference averages per-batch means.
- Candidates are compared on train + validation accuracy, ties broken by the lower loss (a
  classifier's accuracy on a small set ties often); for causal LMs the score is the negated
  mean token loss (perplexity's log), as they have no accuracy. The reference keeps the first
  best accuracy sum and scores LMs by option accuracy on prompt-based tasks.
- The model is in evaluation mode throughout (no dropout), which the reference reaches after
  its first evaluation; the gradient is then that of the model which is scored.
- Tensors outside the graftable set keep the fine-tune's values (``rest: finetuned``), as in the
  reference, whose model is the fine-tune with only the trainable tensors reset: a classifier's
  new head exists only in the fine-tune. ``rest: base`` takes them from θ0 instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator

from surgery.checkpoint import open_checkpoint
from surgery.checkpoint.hashing import cache_dir
from surgery.data import Record, read_records
from surgery.data.tokenize import IGNORE
from surgery.engine import resolve_device, save
from surgery.engine.run import SaveResult
from surgery.errors import DataError, ShapeMismatchError, UsageError
from surgery.expr import EvalContext, LoadNode, Node, TensorSpec, Weights
from surgery.expr.node import check_compatible
from surgery.expr.weights import weights_label
from surgery.methods.registry import Operation
from surgery.methods.soup import Params
from surgery.methods.sparse import GlobalTopK, Mask, keep_top, load_mask
from surgery.train.config import TrainConfig
from surgery.train.data import (
    Batch,
    TrainData,
    check_fits,
    file_sha256,
    load_train_data,
    make_batch,
    task_of,
)
from surgery.train.hooks import TrainableSet
from surgery.train.loop import activation_bytes, micro_batches
from surgery.train.model import content_key, load_for_training, resolve_source
from surgery.train.objectives import targets
from surgery.train.operations import TrainingPlan, meta_model, tokenizer_of

GRAFT_REF = "Skill localization by grafting (Panigrahi et al.), arXiv 2302.06600"
DEFAULT_GRAFTABLE = ("attention", "mlp")


class GraftConfig(Params):
    """Settings of one grafting run (the Python API, ``op: graft`` and ``surgery graft``)."""

    sparsity: float = Field(description="share K/N of the graftable entries the mask keeps")
    steps: int = Field(100, ge=1, description="gradient steps on S")
    lr: float = Field(1e7, gt=0, description="step size on S (gradients through γ are tiny)")
    sigmoid_bias: float = Field(10.0, description="c of γ = b + (1 − 2b)·σ(S − c)")
    score_every: int = Field(5, ge=1, description="steps between rounding and scoring")
    batch_size: int = Field(8, ge=1, description="examples per forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes per step")
    max_length: int = Field(512, ge=2)
    seed: int = Field(0, description="draws S's initial values and the data order")
    device: str = "auto"
    trainable: str | list[str] = Field(
        default_factory=lambda: list(DEFAULT_GRAFTABLE),
        description="graftable tensors: names, kinds, globs or re: patterns (default: block "
                    "weights, kinds attention and mlp)")
    eval_data: str | None = Field(None, description="validation JSONL added to the score")
    rest: Literal["finetuned", "base"] = Field(
        "finetuned", description="tensors outside the graftable set: the fine-tune's or θ0's")
    rounding: Literal["top_k", "half"] = Field(
        "top_k", description="top_k: exactly K entries; half: γ > 1/2 (the reference's)")
    chat: bool = False
    add_eos: bool = True

    @field_validator("sparsity")
    @classmethod
    def _in_range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"{v} is outside (0, 1]")
        return v

    @field_validator("trainable")
    @classmethod
    def _not_hft(cls, v: str | list[str]) -> str | list[str]:
        if v == "hft":
            raise ValueError("hft is a training set of the fine-tune step, not of grafting; "
                             "give kinds, names or patterns")
        return v


def parse_graft_config(settings: dict[str, Any]) -> GraftConfig:
    """``GraftConfig`` from keyword settings, with pydantic's complaint as one line."""
    try:
        return GraftConfig.model_validate(settings)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise UsageError(f"graft: unknown parameter {where!r}") from None
        msg = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"graft: {where + ': ' if where else ''}{msg}") from None


def relaxed_mask(S: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """γ = b + (1 − 2b) · σ(S − c), b a boolean (or 0/1) base patch."""
    bf = b.to(S.dtype)
    return bf + (1.0 - 2.0 * bf) * torch.sigmoid(S - c)


def memory_estimate(model: Any, graftable: int, config: GraftConfig, length: int) -> int:
    """Bytes a grafting run holds, roughly (float32): the fine-tuned model; per graftable entry
    θ0, τ, S and S's gradient, and what a forward pass keeps of them for backward (γ,
    σ(S − c), 1 − 2b and the grafted tensor), 32 bytes; the base patch and two rounded masks,
    3 bytes; with ``rest: base`` θ0's copy of every other parameter; and the activations of a
    forward and backward pass of ``batch_size`` examples of ``length`` tokens, the longest
    example of the data (:func:`surgery.train.loop.activation_bytes`)."""
    total = sum(p.numel() for p in model.parameters())
    rest = (total - graftable) * 4 if config.rest == "base" else 0
    return total * 4 + graftable * 35 + rest + activation_bytes(model,
                                                                config.batch_size * length)


def _weights(model: str | Path | Weights) -> Weights:
    return model if isinstance(model, Weights) else Weights(LoadNode(open_checkpoint(str(model))))


def check_pair(base: Weights, finetuned: Weights, op: str) -> None:
    """A fine-tune of ``base``'s architecture: same model type, tensor names and shapes."""
    a, b = base.node.config().get("model_type"), finetuned.node.config().get("model_type")
    if a and b and a != b:
        raise ShapeMismatchError(f"{op}: {weights_label(finetuned)} is a {b} model, the base "
                                 f"{weights_label(base)} a {a} model; give a fine-tune of the base")
    check_compatible((base.node, finetuned.node), op)


def graftable_names(base: Weights, rules: str | Sequence[str]) -> list[str]:
    """The floating tensors of ``base`` the mask covers, in the base's order."""
    floating = [n for n in base.names if base.spec(n).dtype.is_floating_point]
    return TrainableSet(rules).select(floating)


def check_parameters(names: Sequence[str], model: Any, label: str) -> None:
    """Every graftable tensor is a parameter of the transformers model that trains the mask."""
    own = {n for n, _ in model.named_parameters()}
    missing = [n for n in names if n not in own]
    if missing:
        raise UsageError(f"graft: tensor {missing[0]!r} of {label} is not a parameter of "
                         f"the transformers model {type(model).__name__}")


def check_data(path: str | Path, config: dict[str, Any], label: str,
               kind: str | None = None) -> list[Record]:
    """The file's records, after checking they suit the model (and are of ``kind``)."""
    records = read_records(path)
    check_fits(task_of(records), config, str(path), label)
    if kind is not None and records[0].kind != kind:
        raise DataError(f"{path}: holds {records[0].kind} records, the training data "
                        f"{kind} records")
    return records


def check_inputs(base: Weights, finetuned: Weights, data: str | Path, config: GraftConfig
                 ) -> tuple[list[Record], list[str], int, int]:
    """The training records, the graftable tensors, their entry count N and K = ⌊sparsity·N⌋,
    after checking the data (and the validation data) against the fine-tune and that K ≥ 1."""
    label = weights_label(finetuned)
    cfg = finetuned.node.config()
    records = check_data(data, cfg, label)
    if config.eval_data:
        check_data(config.eval_data, cfg, label, records[0].kind)
    names = graftable_names(base, config.trainable)
    total = sum(base.spec(n).numel for n in names)
    k = math.floor(config.sparsity * total)
    if k < 1:
        raise UsageError(f"sparsity: {config.sparsity} keeps no entry of the {total} "
                         "graftable parameters")
    return records, names, total, k


@dataclass
class GraftEvent:
    """Reported after every step; ``score`` is set on the steps that round and score."""

    step: int
    steps: int
    loss: float
    seconds: float
    score: tuple[float, ...] | None = None
    best_step: int | None = None


GraftCallback = Callable[[GraftEvent], None]


def task_loss_sum(model: Any, batch: Batch, task: str) -> torch.Tensor:
    """The sum over the batch's targets of −log p_t (the ``sft`` objective's loss), in float32,
    or in float64 for a float64 model (the finite-difference check)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    z = logits if logits.dtype == torch.float64 else logits.float()
    if task == "classification":
        return F.cross_entropy(z, batch.labels, reduction="sum")
    shifted = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(z.flatten(0, 1), shifted.flatten(), ignore_index=IGNORE,
                           reduction="sum")


class _Grafted:
    """The transformers model called with given tensors in place of its own."""

    def __init__(self, model: Any, tensors: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.tensors = tensors

    def __call__(self, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.tensors, args=(), kwargs=kwargs)


class Grafter:
    """The state of one grafting run: the fine-tuned model (frozen), θ0 and τ of the
    graftable tensors, the base patch b and the mask logits S (the only tensors with a
    gradient)."""

    def __init__(self, base: str | Path | Weights, finetuned: str | Path | Weights,
                 data: str | Path, config: GraftConfig, dtype: torch.dtype = torch.float32
                 ) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.base, self.finetuned = _weights(base), _weights(finetuned)
        check_pair(self.base, self.finetuned, "graft")
        label = weights_label(self.finetuned)
        cfg = self.finetuned.node.config()
        records, self.names, self.total, self.k = check_inputs(self.base, self.finetuned, data,
                                                               config)
        source = resolve_source(self.finetuned)
        tc = self.train_config()
        self.model, self.tokenizer, self.task = load_for_training(
            source, records, tc, str(data))
        self.model.to(self.device, dtype).eval().requires_grad_(False)
        own = dict(self.model.named_parameters())
        check_parameters(self.names, self.model, label)
        load = dict(max_length=config.max_length, chat=config.chat, add_eos=config.add_eos,
                    model=label)
        self.data = load_train_data(data, self.tokenizer, cfg, **load)
        self.eval = load_train_data(config.eval_data, self.tokenizer, cfg, **load) \
            if config.eval_data else None
        if self.data.label2id:  # the fine-tune's own label map, which the data must follow
            want = {str(k): int(v) for k, v in (cfg.get("label2id") or {}).items()}
            if want and self.data.label2id != want:
                raise DataError(f"{data}: labels {sorted(self.data.label2id)} do not match "
                                f"the fine-tune's {sorted(want)}")
        self.pad_id = next((int(t) for t in (self.tokenizer.pad_token_id,
                                             self.tokenizer.eos_token_id) if t is not None), 0)
        self.fixed: dict[str, torch.Tensor] = {}
        if config.rest == "base":
            chosen = set(self.names)
            for name in own:
                if name not in chosen and name in self.base.names:
                    self.fixed[name] = self.base[name].to(self.device, dtype)
        self.theta0: list[torch.Tensor] = []
        self.tau: list[torch.Tensor] = []
        for name in self.names:
            t0 = self.base[name].to(self.device, dtype)
            self.theta0.append(t0)
            self.tau.append(own[name].detach() - t0)
        self.patch = self._top_k(self.tau)
        gen = torch.Generator().manual_seed(config.seed)
        self.S = [torch.rand(t.shape, generator=gen, dtype=dtype).to(self.device)
                  .requires_grad_(True) for t in self.tau]
        self.consumed = 0

    def train_config(self) -> TrainConfig:
        """The fine-tune step's settings that batching and loading read."""
        c = self.config
        return TrainConfig(steps=c.steps, batch_size=c.batch_size, grad_accum=c.grad_accum,
                           max_length=c.max_length, seed=c.seed, chat=c.chat,
                           add_eos=c.add_eos)

    def _top_k(self, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Boolean masks of the K largest |values| over every graftable tensor together: one
        global threshold, ties to the earlier tensor and the lower index (sparsify's
        selection, in memory O(K))."""
        reduction = GlobalTopK(self.base.node, self.names, self.k)
        for name, v in zip(self.names, values, strict=True):
            reduction.update(name, [v.detach()])
        threshold = reduction.finalize()
        out = []
        for name, v in zip(self.names, values, strict=True):
            flat = torch.zeros(v.numel(), dtype=torch.bool)
            flat[keep_top(v.detach().abs().flatten().cpu(), threshold.value,
                          threshold.ties.get(name, 0))] = True
            out.append(flat.reshape(v.shape).to(self.device))
        return out

    def gamma(self) -> list[torch.Tensor]:
        c = self.config.sigmoid_bias
        return [relaxed_mask(s, b, c) for s, b in zip(self.S, self.patch, strict=True)]

    def grafted(self, masks: Sequence[torch.Tensor]) -> _Grafted:
        """The model θ0 + m ⊙ τ on the graftable tensors (``rest`` elsewhere)."""
        tensors = dict(self.fixed)
        for name, t0, tau, m in zip(self.names, self.theta0, self.tau, masks, strict=True):
            tensors[name] = t0 + m.to(tau.dtype) * tau
        return _Grafted(self.model, tensors)

    def loss(self, batches: Sequence[Batch], count: int | None = None) -> torch.Tensor:
        """The task loss of θ0 + γ ⊙ τ over ``batches`` (a token- or example-weighted mean,
        over ``count`` targets if given), with the graph to S."""
        count = count or sum(targets(b, self.task) for b in batches)
        model = self.grafted(self.gamma())
        return sum((task_loss_sum(model, b.to(self.device), self.task) for b in batches),
                   torch.zeros((), device=self.device)) / count

    def step(self) -> float:
        """One gradient step S ← S − lr · ∂L/∂S; returns the loss before it."""
        passes, self.consumed = micro_batches(self.data, self.train_config(), self.consumed,
                                              self.pad_id)
        count = sum(targets(b, self.task) for b in passes)
        value = 0.0
        for b in passes:  # one graph per pass, as gradient accumulation in the fine-tune step
            loss = self.loss([b], count)
            loss.backward()
            value += float(loss.detach())
        with torch.no_grad():
            for s in self.S:
                assert s.grad is not None
                s.sub_(self.config.lr * s.grad)
                s.grad = None
        return value

    @torch.no_grad()
    def rounded(self) -> list[torch.Tensor]:
        """round(γ): the K largest γ (``top_k``) or γ > 1/2 (``half``)."""
        gamma = self.gamma()
        if self.config.rounding == "half":
            return [g > 0.5 for g in gamma]
        return self._top_k(gamma)

    @torch.no_grad()
    def _measure(self, model: _Grafted, data: TrainData) -> tuple[float, float]:
        """(accuracy, mean loss) of ``model`` on every example of ``data`` (accuracy 0 for a
        causal LM)."""
        correct, loss, count = 0, 0.0, 0
        size = self.config.batch_size
        for at in range(0, len(data.examples), size):
            b = make_batch(data, range(at, min(at + size, len(data.examples))), 0,
                           self.pad_id).to(self.device)
            loss += float(task_loss_sum(model, b, self.task))
            count += targets(b, self.task)
            if self.task == "classification":
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                correct += int((logits.argmax(-1) == b.labels).sum())
        return correct / len(data.examples), loss / count

    def score(self, masks: Sequence[torch.Tensor]) -> tuple[float, ...]:
        """Higher is better: (train + validation accuracy, −(train + validation loss)) for a
        classifier, −(train + validation mean token loss) for a causal LM."""
        model = self.grafted(masks)
        parts = [self._measure(model, d) for d in (self.data, self.eval) if d is not None]
        loss = -sum(p[1] for p in parts)
        if self.task == "classification":
            return (sum(p[0] for p in parts), loss)
        return (loss,)

    def to_mask(self, masks: Sequence[torch.Tensor]) -> Mask:
        return Mask.from_dense(dict(zip(self.names, masks, strict=True)))


@dataclass
class GraftRun:
    """The best rounded mask of a run and how it was found."""

    mask: Mask
    best_step: int
    best_score: tuple[float, ...]
    history: list[dict[str, Any]]
    k: int
    total: int
    seconds_per_step: float
    task: str
    data: dict[str, Any]


def localize(grafter: Grafter, progress: GraftCallback | None = None) -> GraftRun:
    """Optimise the mask of ``grafter`` and keep the best rounded one (train + validation)."""
    config = grafter.config
    best_masks = grafter.rounded()
    best_score, best_step = grafter.score(best_masks), 0
    history: list[dict[str, Any]] = [{"step": 0, "score": list(best_score)}]
    spent = 0.0
    for step in range(1, config.steps + 1):
        started = time.perf_counter()
        loss = grafter.step()
        spent += time.perf_counter() - started
        row: dict[str, Any] = {"step": step, "loss": loss}
        score = None
        if step % config.score_every == 0 or step == config.steps:
            masks = grafter.rounded()
            score = grafter.score(masks)
            row["score"] = list(score)
            if score > best_score:
                best_masks, best_score, best_step = masks, score, step
        history.append(row)
        if progress:
            progress(GraftEvent(step, config.steps, loss, spent / step, score, best_step))
    return GraftRun(grafter.to_mask(best_masks), best_step, best_score, history, grafter.k,
                    grafter.total, spent / config.steps, grafter.task, grafter.data.summary())


# --- The grafted and stitched models, as streaming nodes ---------------------------------


class MaskLike(Protocol):
    shapes: dict[str, tuple[int, ...]]

    def dense(self, name: str) -> torch.Tensor: ...


class GraftStitchNode(Node):
    """θ0 + Σi (mi / cover) ⊙ τi per tensor, τi = θi − θ0 and cover the number of masks
    holding the entry (entries no mask holds stay θ0). Tensors no mask covers come from
    ``rest`` (θ0 unless given: a graft keeps the fine-tune's there)."""

    reference = GRAFT_REF

    def __init__(self, base: Node, models: Sequence[Node], masks: Sequence[MaskLike],
                 op: str, labels: Sequence[str], rest: Node | None = None) -> None:
        super().__init__()
        if not models:
            raise UsageError(f"{op}: models: give at least one fine-tune")
        if len(models) != len(masks):
            raise UsageError(f"{op}: {len(models)} model(s) but {len(masks)} mask(s); give "
                             "one mask per fine-tune")
        self.op = op
        self.inputs = (base, *models)
        self.models = list(models)
        self.masks = list(masks)
        self.labels = list(labels)
        self.rest = rest
        for m in self.models:
            check_pair(Weights(base), Weights(m), op)
        names = set(base.names())
        for mask, label in zip(self.masks, self.labels, strict=True):
            for name, shape in mask.shapes.items():
                if name not in names:
                    raise ShapeMismatchError(f"{op}: tensor {name!r} of mask {label} is not in "
                                             "the base model")
                spec = base.spec(name)
                if tuple(spec.shape) != tuple(shape):
                    raise ShapeMismatchError(f"{op}: tensor {name!r} has shape {list(shape)} "
                                             f"in mask {label} but {list(spec.shape)} in the "
                                             "base model")
                if not spec.dtype.is_floating_point:
                    raise ShapeMismatchError(f"{op}: tensor {name!r} of the base model is "
                                             f"{spec.dtype}, not a floating tensor")

    def params(self) -> dict[str, Any]:
        return {"masks": self.labels, "rest": "finetuned" if self.rest is not None else "base"}

    def _list_names(self) -> list[str]:
        return self.inputs[0].names()

    def spec(self, name: str) -> TensorSpec:
        return self.inputs[0].spec(name)

    def config(self) -> dict:
        return (self.rest or self.inputs[0]).config()

    def _hits(self, name: str) -> list[int]:
        return [i for i, m in enumerate(self.masks) if name in m.shapes]

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        hits = self._hits(name)
        if not hits:
            return [(self.rest or self.inputs[0], name)]
        return [(self.inputs[0], name), *((self.models[i], name) for i in hits)]

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        hits = self._hits(name)
        if not hits:
            return ctx.value(self.rest or self.inputs[0], name)
        theta0 = ctx.to_compute(ctx.value(self.inputs[0], name))
        dense = [self.masks[i].dense(name).to(theta0.device) for i in hits]
        cover = torch.stack(dense).sum(0).clamp_min(1).to(theta0.dtype)
        acc = torch.zeros_like(theta0)
        for i, m in zip(hits, dense, strict=True):
            tau = ctx.to_compute(ctx.value(self.models[i], name)) - theta0
            acc += (m.to(theta0.dtype) / cover) * tau
        return theta0 + acc


class MaskFile:
    """A mask file opened for stitching (read whole: one bit per entry)."""

    def __init__(self, path: str | Path) -> None:
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such mask file")
        self.mask = load_mask(path)
        self.shapes = self.mask.shapes
        self.source = str(path)

    def dense(self, name: str) -> torch.Tensor:
        return self.mask.dense(name)


def graft_stitch(base: str | Path | Weights, finetuned: Sequence[str | Path | Weights],
                 masks: Sequence[str | Path | Mask],
                 rest: str | Path | Weights | None = None) -> Weights:
    """Several grafts into one multi-task model (arXiv 2302.06600):
    θ0 + Σi (mi / cover) ⊙ τi, cover the number of masks holding the entry; entries no mask
    holds stay θ0. Tensors no mask covers come from ``rest`` (default θ0; a fine-tune, as
    ``graft``'s ``rest: finetuned`` does, keeps e.g. a new head). Lazy: ``.save(path)``
    streams it."""
    b = _weights(base)
    models = [_weights(m) for m in finetuned]
    opened: list[MaskLike] = [m if isinstance(m, Mask) else MaskFile(m) for m in masks]
    labels = [getattr(m, "source", f"mask {i + 1}") for i, m in enumerate(opened)]
    kept = None
    if rest is not None:
        kept = _weights(rest).node
        check_pair(b, Weights(kept), "graft_stitch")
    return Weights(GraftStitchNode(b.node, [m.node for m in models], opened, "graft_stitch",
                                   labels, rest=kept))


# --- The Python API ------------------------------------------------------------------------


@dataclass
class GraftResult:
    path: Path
    mask: Mask
    mask_path: Path | None
    run: GraftRun
    saved: SaveResult
    provenance: dict[str, Any] = field(default_factory=dict)


def run_record(run: GraftRun, config: GraftConfig, data_sha: str,
               eval_sha: str | None) -> dict[str, Any]:
    return {"reference": GRAFT_REF, "settings": config.model_dump(mode="json"),
            "data": {**run.data, "sha256": data_sha}, "eval_data_sha256": eval_sha,
            "task": run.task, "k": run.k, "graftable_params": run.total,
            "kept": run.mask.count(), "best_step": run.best_step,
            "best_score": list(run.best_score), "seconds_per_step": run.seconds_per_step,
            "history": run.history}


def describe_score(task: str, score: Sequence[float], validation: bool) -> str:
    """A candidate's score in words (sums over the train and the validation data)."""
    over = "train + validation" if validation else "train"
    if task == "classification":
        return f"accuracy {score[0]:.4g}, loss {-score[1]:.4g} ({over})"
    return f"mean loss {-score[0]:.4g} ({over})"


def card_section(record: dict[str, Any]) -> str:
    s = record["settings"]
    return "\n".join([
        f"Grafted ({GRAFT_REF}): θ0 + m ⊙ τ with a mask m of {record['kept']:,} of "
        f"{record['graftable_params']:,} graftable entries (sparsity {s['sparsity']:g}; set: "
        f"{s['trainable']}), optimised for {s['steps']} steps (lr {s['lr']:g}, c "
        f"{s['sigmoid_bias']:g}, seed {s['seed']}) on `{Path(record['data']['path']).name}`.",
        "",
        f"- best rounded mask at step {record['best_step']}: "
        f"{describe_score(record['task'], record['best_score'], bool(s['eval_data']))}",
        f"- other tensors: {s['rest']}'s values"])


def save_mask(mask: Mask, path: str | Path, force: bool = False) -> Path:
    """Write the mask file atomically (``PATH.partial``, then renamed)."""
    p = Path(path)
    if p.exists() and not force:
        raise UsageError(f"{p}: exists; pass force to replace it")
    partial = mask.save(p.with_name(p.name + ".partial"))
    partial.replace(p)
    return p


def graft(base: str | Path | Weights, finetuned: str | Path | Weights, data: str | Path, *,
          sparsity: float, out: str | Path, mask_out: str | Path | None = None,
          progress: GraftCallback | None = None, force: bool = False,
          dtype: str | torch.dtype | None = None, shard_size: int | str = "5GB",
          **settings: Any) -> GraftResult:
    """Localize the skill of ``finetuned`` in ``sparsity`` of its graftable entries and write
    the graft θ0 + round(γ) ⊙ τ to ``out`` (and the mask to ``mask_out``); see the module
    docstring for the method. ``settings`` are the fields of :class:`GraftConfig` (``steps``,
    ``lr``, ``sigmoid_bias``, ``score_every``, ``batch_size``, ``trainable``, ``eval_data``,
    ``rest``, ``rounding``, ``seed``, ``device``, ...); ``progress`` gets a
    :class:`GraftEvent` after every step. Every check (sparsity, architectures, data, paths)
    runs before the optimisation."""
    config = parse_graft_config({"sparsity": sparsity, **settings})
    out_path = Path(out)
    if out_path.exists() and not force:
        raise UsageError(f"{out_path}: exists; pass force to replace it")
    if mask_out is not None and Path(mask_out).exists() and not force:
        raise UsageError(f"{mask_out}: exists; pass force to replace it")
    grafter = Grafter(base, finetuned, data, config)
    run = localize(grafter, progress)
    record = run_record(run, config, file_sha256(data),
                        file_sha256(config.eval_data) if config.eval_data else None)
    mask_path = save_mask(run.mask, mask_out, force=True) if mask_out is not None else None
    base_node, tuned = grafter.base.node, grafter.finetuned.node
    del grafter  # the model, θ0, τ and S go before the graft is written
    node = GraftStitchNode(base_node, [tuned], [run.mask], "graft",
                           [str(mask_path) if mask_path else "<trained>"],
                           rest=tuned if config.rest == "finetuned" else None)
    saved = save(node, out_path, force=force, dtype=dtype, shard_size=shard_size,
                 device="cpu", seed=config.seed, extra_provenance={"graft": record},
                 extra_sections={"Grafting": card_section(record)})
    return GraftResult(saved.path, run.mask, mask_path, run, saved, saved.provenance)


# --- Recipe steps ----------------------------------------------------------------------------


class GraftParams(GraftConfig):
    base: str
    model: str
    data: str = Field(description="JSONL file the mask is optimised on")
    mask: str | None = Field(None, description="also write the mask file here")


class GraftStitchParams(Params):
    base: str
    models: list[str] = Field(min_length=1)
    masks: list[str] = Field(min_length=1, description="one mask file per model")


class TrainedMask:
    """The mask an ``op: graft`` step optimises, on first use, into the cache
    (``$WEIGHT_SURGERY_CACHE/graft/<key>``, keyed by the inputs' bytes, settings and data);
    copied to ``mask`` when given."""

    def __init__(self, base: Weights, finetuned: Weights, params: GraftParams) -> None:
        self.base, self.finetuned, self.params = base, finetuned, params
        self.config = GraftConfig.model_validate(params.model_dump(
            exclude={"base", "model", "data", "mask"}, exclude_unset=True))
        label = weights_label(finetuned)
        cfg = finetuned.node.config()
        records, names, _, _ = check_inputs(base, finetuned, params.data, self.config)
        # The model the mask trains through, on the meta device, and the tokenized data: a
        # tensor that is no parameter of it, or data too long for max_length, fails here,
        # before anything is read or trained.
        self.meta = meta_model(cfg, task_of(records), records, label)
        check_parameters(names, self.meta, label)
        c = self.config
        self.encoded = load_train_data(params.data, tokenizer_of(finetuned), cfg,
                                       max_length=c.max_length, chat=c.chat,
                                       add_eos=c.add_eos, model=label)
        self.shapes = {n: tuple(base.spec(n).shape) for n in names}
        self.source = params.mask or "<trained>"
        self.on_event: GraftCallback | None = None
        self._mask: Mask | None = None
        self._key: str | None = None
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        if self._key is None:
            evals = file_sha256(self.config.eval_data) if self.config.eval_data else None
            doc = [content_key(self.base.node), content_key(self.finetuned.node),
                   self.config.model_dump(mode="json", exclude={"device"}),
                   file_sha256(self.params.data), evals]
            self._key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
        return self._key

    @property
    def folder(self) -> Path:
        return cache_dir() / "graft" / self.key

    @property
    def mask(self) -> Mask:
        with self._lock:
            if self._mask is None:
                path, record = self.folder / "mask.safetensors", self.folder / "graft.json"
                if not (path.is_file() and record.is_file()):
                    grafter = Grafter(self.base, self.finetuned, self.params.data, self.config)
                    run = localize(grafter, self.on_event)
                    self.folder.mkdir(parents=True, exist_ok=True)
                    save_mask(run.mask, path, force=True)
                    evals = file_sha256(self.config.eval_data) if self.config.eval_data \
                        else None
                    text = json.dumps(run_record(run, self.config,
                                                 file_sha256(self.params.data), evals))
                    record.with_name("graft.json.partial").write_text(text)
                    record.with_name("graft.json.partial").replace(record)
                self._mask = load_mask(path)
                if self.params.mask:
                    save_mask(self._mask, self.params.mask, force=True)
            return self._mask

    def plan(self) -> TrainingPlan:
        """What ``surgery plan`` says of the mask's optimisation: its memory estimate
        (:func:`memory_estimate`) and tokens per step."""
        graftable = sum(math.prod(s) for s in self.shapes.values())
        k = math.floor(self.config.sparsity * graftable)
        data = self.encoded
        per_example = data.tokens / max(1, len(data.examples))
        return TrainingPlan(
            memory_estimate(self.meta, graftable, self.config,
                            max(len(e.input_ids) for e in data.examples)),
            per_example * self.config.batch_size * self.config.grad_accum,
            len(data.examples), data.truncated,
            f"a mask of {k:,} of {graftable:,} graftable entries",
            "the model, θ0, τ, the mask logits and their gradient, activations", "grafting")

    def record(self) -> dict[str, Any]:
        self.mask  # noqa: B018  (optimises first if needed)
        return json.loads((self.folder / "graft.json").read_text())

    def dense(self, name: str) -> torch.Tensor:
        return self.mask.dense(name)


class GraftNode(GraftStitchNode):
    """The model of an ``op: graft`` step: θ0 + round(γ) ⊙ τ with its trained mask."""

    def __init__(self, base: Weights, finetuned: Weights, mask: TrainedMask) -> None:
        super().__init__(base.node, [finetuned.node], [mask], "graft", [mask.source],
                         rest=finetuned.node if mask.config.rest == "finetuned" else None)
        self.trained = mask

    def params(self) -> dict[str, Any]:
        return {"settings": self.trained.config.model_dump(mode="json", exclude_unset=True),
                "data": Path(self.trained.params.data).name, "cache_key": self.trained.key}

    def card_sections(self) -> dict[str, str]:
        return {"Grafting": card_section(self.trained.record())}

    def provenance_records(self) -> dict[str, Any]:
        return {"graft": {**self.trained.record(), "cache": str(self.trained.folder)}}


def _build_graft(p: GraftParams, get: Callable[[str], Weights]) -> Weights:
    base, finetuned = get(p.base), get(p.model)
    check_pair(base, finetuned, "graft")
    return Weights(GraftNode(base, finetuned, TrainedMask(base, finetuned, p)))


def _build_graft_stitch(p: GraftStitchParams, get: Callable[[str], Weights]) -> Weights:
    if len(p.models) != len(p.masks):
        raise UsageError(f"graft_stitch: {len(p.models)} model(s) but {len(p.masks)} mask(s); "
                         "give one mask per model")
    return graft_stitch(get(p.base), [get(m) for m in p.models], p.masks)


GRAFT_OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("graft", "Localize a fine-tune's skill in a sparse mask (grafting) and keep "
                  "θ0 + m ⊙ τ", GRAFT_REF, GraftParams, ("base", "model"), _build_graft),
        Operation("graft_stitch", "Stitch grafts (mask files) into one multi-task model",
                  GRAFT_REF, GraftStitchParams, ("base", "models"), _build_graft_stitch),
    )
}
