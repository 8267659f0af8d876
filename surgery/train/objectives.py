"""Training objectives: the loss of a batch from the model's outputs.

T is the set of target positions: completion tokens of prompt+completion data, every token of
text (the token each position predicts: labels shifted by one), or one class per example for a
classifier. p_t = softmax(z_t)[y_t] under the model being trained, q_t under the frozen
reference (the starting model). Each objective returns the *sum* over the batch's targets; the
loop divides by the number of targets of the whole update, so the loss is a token-weighted mean
and gradient accumulation gives the value of one large batch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from surgery.data.tokenize import IGNORE
from surgery.errors import UsageError
from surgery.evaluate.layers import find_blocks
from surgery.expr import seeded_generator
from surgery.train.config import TrainConfig
from surgery.train.data import Batch, Task

SFT_REF = "supervised fine-tuning (token-level cross-entropy)"
DFT_REF = "Dynamic Fine-Tuning (DFT), arXiv 2508.05629"
ASFT_REF = "Anchored Supervised Fine-Tuning (ASFT), arXiv 2509.23753"
MASKED_THOUGHT_REF = "Masked Thought, arXiv 2403.02178"
SORTED_REF = "Sorted Fine-Tuning (SoFT), arXiv 2309.08968"


def targets(batch: Batch, task: Task) -> int:
    """|T| of a batch."""
    if task == "classification":
        return int(batch.labels.numel())
    return int((batch.labels[:, 1:] != IGNORE).sum())


def scored(logits: torch.Tensor, batch: Batch, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at the target positions (|T| x V, float32) and the targets (|T|)."""
    if task == "classification":
        return logits.float(), batch.labels
    labels = batch.labels[:, 1:]
    keep = labels != IGNORE
    return logits[:, :-1][keep].float(), labels[keep]


def _nll(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z, y, reduction="none")


class Objective(ABC):
    """A loss over the target positions; ``prepare`` may change the model's inputs first."""

    name: str
    reference: str
    needs_reference_model = False
    tasks: tuple[Task, ...] = ("lm", "classification")

    def prepare(self, batch: Batch, seed: int) -> Batch:
        return batch

    @abstractmethod
    def loss_sum(self, model: Any, batch: Batch, task: Task,
                 reference: Any | None) -> torch.Tensor: ...

    def params(self) -> dict[str, Any]:
        return {}


def _forward(model: Any, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


class Sft(Objective):
    """L = −mean_t log p_t."""

    name, reference = "sft", SFT_REF

    def loss_sum(self, model: Any, batch: Batch, task: Task,
                 reference: Any | None) -> torch.Tensor:
        logits = _forward(model, batch)
        if task == "classification":
            return _nll(logits.float(), batch.labels).sum()
        # Over every position, the ignored ones adding nothing: gathering the target rows
        # first would cost two more logits-sized buffers in backward (the gather's and the
        # shift's), which the allocator faults in afresh at every update.
        shifted = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE)
        return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(),
                               ignore_index=IGNORE, reduction="sum")


def dft_terms(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−sg(p_t) · log p_t per target."""
    logp = -_nll(z, y)
    return -logp.detach().exp() * logp


class Dft(Objective):
    """Dynamic Fine-Tuning (arXiv 2508.05629): L = −mean_t sg(p_t) · log p_t, each token's
    cross-entropy weighted by its own (gradient-stopped) probability."""

    name, reference = "dft", DFT_REF

    def loss_sum(self, model: Any, batch: Batch, task: Task,
                 reference: Any | None) -> torch.Tensor:
        z, y = scored(_forward(model, batch), batch, task)
        return dft_terms(z, y).sum()


class Asft(Objective):
    """Anchored SFT (arXiv 2509.23753): L = L_dft + λ · mean_t KL, the KL between the full
    next-token distributions of the trained model P_t and of the frozen starting model Q_t.

    The reference code (``zhuchichi56/ASFT``, ``train_v2.py``) computes
    ``F.kl_div(log_softmax(z), softmax(z_ref))``, which is KL(Q_t ‖ P_t): that direction is the
    default here (``reference_to_model``); ``model_to_reference`` gives KL(P_t ‖ Q_t), the
    direction METHODS.md writes. λ defaults to 0.05, the value of the reference README's
    command (its script's own default is 0.1).
    """

    name, reference = "asft", ASFT_REF
    needs_reference_model = True

    def __init__(self, lam: float = 0.05, direction: str = "reference_to_model") -> None:
        self.lam = lam
        self.direction = direction

    def params(self) -> dict[str, Any]:
        return {"lambda": self.lam, "kl": self.direction}

    def loss_sum(self, model: Any, batch: Batch, task: Task,
                 reference: Any | None) -> torch.Tensor:
        assert reference is not None
        z, y = scored(_forward(model, batch), batch, task)
        with torch.no_grad():
            zq, _ = scored(_forward(reference, batch), batch, task)
        logp, logq = F.log_softmax(z, -1), F.log_softmax(zq, -1)
        if self.direction == "reference_to_model":
            kl = (logq.exp() * (logq - logp)).sum(-1)
        else:
            kl = (logp.exp() * (logp - logq)).sum(-1)
        return (dft_terms(z, y) + self.lam * kl).sum()


class MaskedThought(Objective):
    """Masked Thought (arXiv 2403.02178): SFT where, before the forward pass, each completion
    token of the *input* is replaced by a mask token with probability p, drawn per (seed,
    example index, epoch); the targets stay the original tokens and prompts are never
    masked."""

    name, reference = "masked_thought", MASKED_THOUGHT_REF
    tasks = ("lm",)

    def __init__(self, prob: float, mask_id: int) -> None:
        self.prob = prob
        self.mask_id = mask_id

    def params(self) -> dict[str, Any]:
        return {"mask_prob": self.prob, "mask_token_id": self.mask_id}

    def prepare(self, batch: Batch, seed: int) -> Batch:
        ids = batch.input_ids.clone()
        completion = batch.labels != IGNORE
        for row, example in enumerate(batch.index):
            gen = seeded_generator(seed, f"example {example}", f"masked-thought-{batch.epoch}")
            draw = torch.rand(ids.shape[1], generator=gen) < self.prob
            ids[row][draw & completion[row].cpu()] = self.mask_id
        return Batch(ids, batch.attention_mask, batch.labels, batch.index, batch.epoch)

    def loss_sum(self, model: Any, batch: Batch, task: Task,
                 reference: Any | None) -> torch.Tensor:
        return Sft().loss_sum(model, batch, task, reference)


def final_norm(model: Any) -> torch.nn.Module:
    """The norm a causal LM applies after its last block, before the head."""
    base = model.base_model
    for attr in ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f"):
        module = getattr(base, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UsageError(f"{type(model).__name__}: no final norm found (norm, ln_f, ...); "
                     "objective sorted cannot build its sub-model exits")


def exits(num_layers: int, every: int | None) -> list[int]:
    """E = {k, 2k, ..., L} (L always included); k defaults to ⌈L/4⌉."""
    k = every or max(1, math.ceil(num_layers / 4))
    if k > num_layers:
        raise UsageError(f"exit_every {k} is more than the model's {num_layers} blocks")
    return sorted({*range(k, num_layers + 1, k), num_layers})


class Sorted(Objective):
    """Sorted Fine-Tuning (arXiv 2309.08968): L = Σ_{e∈E} L_sft(head(norm(h_e))), h_e the
    hidden state after block e, through the model's own final norm and head (shared, not
    copied), E = {k, 2k, ..., L}. The sub-model of the first e blocks is then extracted with
    ``keep_first_layers(e)``; its loss equals this exit's term."""

    name, reference = "sorted", SORTED_REF
    tasks = ("lm",)

    def __init__(self, every: int | None = None) -> None:
        self.every = every
        self.exits: list[int] | None = None

    def params(self) -> dict[str, Any]:
        return {"exits": self.exits, "exit_every": self.every}

    def loss_sum(self, model: Any, batch: Batch, task: Task,
                 reference: Any | None) -> torch.Tensor:
        blocks = find_blocks(model)
        self.exits = exits(len(blocks), self.every)
        captured: dict[int, torch.Tensor] = {}

        def hook(e: int) -> Any:
            def keep(_: Any, __: Any, output: Any) -> None:
                captured[e] = output[0] if isinstance(output, tuple) else output
            return keep

        early = [e for e in self.exits if e < len(blocks)]
        handles = [blocks[e - 1].register_forward_hook(hook(e)) for e in early]
        try:
            logits = _forward(model, batch)
        finally:
            for h in handles:
                h.remove()
        z, y = scored(logits, batch, task)
        total = _nll(z, y).sum()
        keep = batch.labels[:, 1:] != IGNORE
        norm, head = final_norm(model), model.get_output_embeddings()
        for e in early:
            h = captured[e][:, :-1][keep]
            total = total + _nll(head(norm(h)).float(), y).sum()
        return total


def mask_token_id(tokenizer: Any, token: str | None) -> int:
    if token is not None:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise UsageError(f"mask_token {token!r} is not in the tokenizer's vocabulary")
        return int(tid)
    for tid in (tokenizer.unk_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    raise UsageError("masked_thought: the tokenizer has no unk or pad token; set mask_token")


def make_objective(config: TrainConfig, tokenizer: Any, task: Task) -> Objective:
    objective: Objective
    if config.objective == "sft":
        objective = Sft()
    elif config.objective == "dft":
        objective = Dft()
    elif config.objective == "asft":
        objective = Asft(config.asft_lambda, config.asft_kl)
    elif config.objective == "masked_thought":
        objective = MaskedThought(config.mask_prob, mask_token_id(tokenizer, config.mask_token))
    else:
        objective = Sorted(config.exit_every)
    if task not in objective.tasks:
        raise UsageError(f"objective {objective.name} trains causal language models; the "
                         "data is text+label (a classifier)")
    return objective
