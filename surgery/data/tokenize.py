"""Tokenization with the model's own tokenizer, and right-padded batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from surgery.data.jsonl import Record
from surgery.errors import DataError

IGNORE = -100  # label value the loss skips


@dataclass
class Encoded:
    """One tokenized example: ids, the labels the loss sees (IGNORE where not scored)."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int


def encode_lm(tokenizer: Any, record: Record, max_length: int) -> Encoded:
    """Text: every token is a target. Prompt + completion: the prompt is tokenized with the
    tokenizer's special tokens, the completion without, and only completion tokens are targets;
    an overlong prompt loses its start, so the completion is always scored whole."""
    if record.prompt is None:
        ids = tokenizer(record.text or "", add_special_tokens=True)["input_ids"][:max_length]
        return Encoded(ids, list(ids), 0)
    prompt = tokenizer(record.prompt, add_special_tokens=True)["input_ids"]
    completion = tokenizer(record.completion or "", add_special_tokens=False)["input_ids"]
    if not completion:
        raise DataError(f"line {record.line}: the completion tokenizes to nothing")
    if len(completion) >= max_length:
        raise DataError(f"line {record.line}: the completion has {len(completion)} tokens, "
                        f"not fewer than max_length {max_length}")
    prompt = prompt[max(0, len(prompt) + len(completion) - max_length):]
    return Encoded(prompt + completion, [IGNORE] * len(prompt) + completion, len(prompt))


def label_id(record: Record, label2id: Mapping[str, int], num_labels: int) -> int:
    label = record.label
    if isinstance(label, str):
        if label not in label2id:
            raise DataError(f"line {record.line}: label {label!r} is not one of the model's "
                            f"labels {sorted(label2id)}")
        return int(label2id[label])
    if label is None or not 0 <= label < num_labels:
        raise DataError(f"line {record.line}: label {label!r} is outside 0..{num_labels - 1}")
    return label


def encode_classification(tokenizer: Any, record: Record, max_length: int,
                          label2id: Mapping[str, int], num_labels: int) -> Encoded:
    ids = tokenizer(record.text or "", add_special_tokens=True, truncation=True,
                    max_length=max_length)["input_ids"]
    return Encoded(ids, [label_id(record, label2id, num_labels)], len(ids))


def pad_batch(items: Sequence[Encoded], pad_id: int, left: bool = False
              ) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask padded right (or left, for generation); right-padded
    batches of language-model examples also get token labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in items)
    ids, mask, labels = [], [], []
    for e in items:
        pad = width - len(e.input_ids)
        if left:
            ids.append([pad_id] * pad + e.input_ids)
            mask.append([0] * pad + [1] * len(e.input_ids))
        else:
            ids.append(e.input_ids + [pad_id] * pad)
            mask.append([1] * len(e.input_ids) + [0] * pad)
            if len(e.labels) == len(e.input_ids):
                labels.append(e.labels + [IGNORE] * pad)
    out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if len(labels) == len(items):
        out["labels"] = torch.tensor(labels)
    return out
