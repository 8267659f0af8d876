"""Metrics of a transformers model on a JSONL file.

- ``perplexity``: exp of the mean token loss over every scored token of the file (completion
  tokens for prompt+completion records, all tokens for text records); token-weighted, so
  batching does not change it.
- ``exact_match``: the share of prompts whose greedy generation, stripped, equals the
  completion, stripped.
- ``accuracy``: the share of text+label records a sequence classifier labels correctly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from surgery.checkpoint import parse_hub_id
from surgery.data import Record, encode_classification, encode_lm, pad_batch, read_records
from surgery.data import subsample as subsample_records
from surgery.engine.stream import resolve_device
from surgery.errors import DataError, UsageError

METRICS = {"perplexity": False, "exact_match": True, "accuracy": True}  # higher is better?
Progress = Callable[[int, int], None]  # (examples done, examples total)


@dataclass
class EvalResult:
    metric: str
    value: float
    higher_is_better: bool
    samples: int
    tokens: int
    mean_loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_model(path: str | Path, metric: str, device: str | torch.device | None = "auto"
               ) -> tuple[Any, Any]:
    """The model (causal LM, or sequence classifier for ``accuracy``) and its tokenizer, in
    evaluation mode, float32, on ``device``."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the library reports progress only through callbacks
    _check_metric(metric)
    if not Path(path).exists() and parse_hub_id(str(path)) is None:
        raise UsageError(f"{path}: no such file or directory")
    classify = metric == "accuracy"
    auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    try:
        check_architecture(AutoConfig.from_pretrained(str(path)).to_dict(), metric, str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = auto.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot load as a transformers model "
                         f"({str(e).splitlines()[0]})") from None
    return model.to(resolve_device(device)).eval(), tokenizer


def check_architecture(config: dict, metric: str, where: str) -> None:
    """Fail unless config.json's architecture suits ``metric``: a model of the other kind would
    load with a freshly initialised head and score noise. Unknown architectures pass."""
    arch = (config.get("architectures") or [""])[0]
    classify = metric == "accuracy"
    suffixes = ("ForSequenceClassification",) if classify else ("ForCausalLM", "LMHeadModel")
    if arch and not arch.endswith(suffixes):
        kind = "a sequence classifier" if classify else "a causal language model"
        raise UsageError(f"{where}: metric {metric} needs {kind}, but the checkpoint is {arch}")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UsageError(f"metric {metric!r} is not one of {', '.join(METRICS)}")


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    if size < 1:
        raise UsageError(f"batch_size must be at least 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, records: Sequence[Record], batch_size: int = 8,
               max_length: int = 1024, progress: Progress | None = None) -> EvalResult:
    encoded = [encode_lm(tokenizer, r, max_length) for r in records]
    device = next(model.parameters()).device
    total_loss, total_tokens, done = 0.0, 0, 0
    for batch in _batches(encoded, batch_size):
        b = {k: v.to(device) for k, v in pad_batch(batch, _pad_id(tokenizer)).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        targets = b["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                               ignore_index=-100, reduction="sum")
        total_loss += float(loss)
        total_tokens += int((targets != -100).sum())
        done += len(batch)
        if progress:
            progress(done, len(encoded))
    if total_tokens == 0:
        raise DataError("no token to score: every example is a single token")
    mean = total_loss / total_tokens
    return EvalResult("perplexity", math.exp(mean), False, len(encoded), total_tokens, mean)


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, records: Sequence[Record], batch_size: int = 8,
                max_length: int = 1024, progress: Progress | None = None) -> EvalResult:
    if any(r.prompt is None for r in records):
        raise DataError("exact_match needs prompt+completion records")
    encoded = [encode_lm(tokenizer, r, max_length) for r in records]
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    correct, done, tokens = 0, 0, 0
    for rec_batch, enc_batch in zip(_batches(records, batch_size), _batches(encoded, batch_size),
                                    strict=True):
        prompts = [type(e)(e.input_ids[:e.prompt_len], [], e.prompt_len) for e in enc_batch]
        b = {k: v.to(device) for k, v in pad_batch(prompts, pad, left=True).items()}
        new = max(len(e.input_ids) - e.prompt_len for e in enc_batch)
        out = model.generate(**b, max_new_tokens=new, do_sample=False, pad_token_id=pad)
        for rec, row in zip(rec_batch, out[:, b["input_ids"].shape[1]:], strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            correct += text.strip() == (rec.completion or "").strip()
        tokens += int(b["attention_mask"].sum())
        done += len(rec_batch)
        if progress:
            progress(done, len(records))
    return EvalResult("exact_match", correct / len(records), True, len(records), tokens)


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, records: Sequence[Record], batch_size: int = 8,
             max_length: int = 512, progress: Progress | None = None) -> EvalResult:
    if any(r.label is None for r in records):
        raise DataError("accuracy needs text+label records")
    cfg = model.config
    encoded = [encode_classification(tokenizer, r, max_length, cfg.label2id or {},
                                     cfg.num_labels) for r in records]
    device = next(model.parameters()).device
    correct, done, tokens = 0, 0, 0
    for batch in _batches(encoded, batch_size):
        b = {k: v.to(device) for k, v in pad_batch(batch, _pad_id(tokenizer)).items()}
        pred = model(**b).logits.argmax(-1).cpu()
        correct += int((pred == torch.tensor([e.labels[0] for e in batch])).sum())
        tokens += int(b["attention_mask"].sum())
        done += len(batch)
        if progress:
            progress(done, len(encoded))
    return EvalResult("accuracy", correct / len(encoded), True, len(encoded), tokens)


_FUNCS = {"perplexity": perplexity, "exact_match": exact_match, "accuracy": accuracy}


def evaluate_model(model: Any, tokenizer: Any, records: Sequence[Record], metric: str,
                   batch_size: int = 8, max_length: int = 1024,
                   progress: Progress | None = None) -> EvalResult:
    """Score an already loaded model on records."""
    _check_metric(metric)
    return _FUNCS[metric](model, tokenizer, records, batch_size, max_length, progress)


def evaluate(model_dir: str | Path, data: str | Path, metric: str, *, batch_size: int = 8,
             max_samples: int | None = None, seed: int = 0, max_length: int = 1024,
             device: str | torch.device | None = "auto",
             progress: Progress | None = None) -> EvalResult:
    """Load ``model_dir`` and score it on the JSONL file ``data`` (optionally ``max_samples``
    records drawn with ``seed``)."""
    records = subsample_records(read_records(data), max_samples, seed)
    model, tokenizer = load_model(model_dir, metric, device)
    return evaluate_model(model, tokenizer, records, metric, batch_size, max_length, progress)
