"""Training examples from the JSONL files of :mod:`surgery.data`.

- ``text``: a causal LM learns every token;
- ``prompt`` + ``completion``: only completion tokens are targets (with ``chat``, the pair is
  rendered by the tokenizer's chat template, the assistant turn being the completion);
- ``text`` + ``label``: a sequence classifier; string labels are mapped to ids (sorted) and
  the map goes into config.json.

An example longer than ``max_length`` keeps its first ``max_length`` tokens and is counted as
truncated; one left with no target is dropped and counted; a file left with none is an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from surgery.data import Encoded, Record, pad_batch, read_records
from surgery.data.tokenize import IGNORE, label_id
from surgery.errors import DataError

Task = Literal["lm", "classification"]


@dataclass
class TrainData:
    """Tokenized examples of one file, with what tokenizing them cost."""

    path: str
    sha256: str
    task: Task
    kind: str  # text | completion | label
    examples: list[Encoded]
    truncated: int = 0
    dropped: int = 0
    label2id: dict[str, int] | None = None
    lines: list[int] = field(default_factory=list)  # file line of each example

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "examples": len(self.examples),
                "kind": self.kind, "tokens": self.tokens, "truncated": self.truncated,
                "dropped": self.dropped}


def file_sha256(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read data file ({e.strerror})") from None


def task_of(records: Sequence[Record]) -> Task:
    return "classification" if records[0].kind == "label" else "lm"


def check_fits(task: Task, config: Mapping[str, Any], data: str, model: str) -> None:
    """Fail when the data's shape does not suit the model: labels for a causal LM, text or
    prompt+completion for a sequence classifier."""
    arch = (config.get("architectures") or [""])[0]
    if task == "classification" and arch.endswith(("ForCausalLM", "LMHeadModel")):
        raise DataError(f"{data}: text+label records train a sequence classifier, but {model} "
                        f"is a causal language model ({arch}); give text or "
                        "prompt+completion records")
    if task == "lm" and arch.endswith("ForSequenceClassification"):
        raise DataError(f"{data}: text or prompt+completion records train a causal language "
                        f"model, but {model} is a sequence classifier ({arch}); give "
                        "text+label records")


def classes(records: Sequence[Record], config: Mapping[str, Any]
            ) -> tuple[dict[str, int] | None, int]:
    """The label map and the class count of classification records. String labels keep the
    model's own map when it covers them, else get their names' sorted order; integer labels
    have no map and at least as many classes as the model has."""
    names = sorted({r.label for r in records if isinstance(r.label, str)})
    if names:
        own = {str(k): int(v) for k, v in (config.get("label2id") or {}).items()}
        mapping = own if own and set(names) <= set(own) else \
            {name: i for i, name in enumerate(names)}
        return mapping, max(mapping.values()) + 1
    have = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
    return None, max(have, 1 + max(int(r.label) for r in records if isinstance(r.label, int)))


def chat_prompt(tokenizer: Any, prompt: str | None, where: str) -> str:
    """``prompt`` as the model's chat template renders a user turn and the opening of the
    assistant's answer (the text a chat model continues)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat is on, but the model's tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(tokenizer: Any, prompt: str | None, chat: bool, where: str) -> list[int]:
    """The token ids of an example's prompt: through the chat template with ``chat``, else
    the text with the tokenizer's special tokens (what the model continues)."""
    if chat:
        return tokenizer(chat_prompt(tokenizer, prompt, where),
                         add_special_tokens=False)["input_ids"]
    return tokenizer(prompt or "", add_special_tokens=True)["input_ids"]


def _chat_completion(tokenizer: Any, record: Record, where: str) -> str:
    """The text the chat template puts after the rendered prompt for the answer."""
    prompt = chat_prompt(tokenizer, record.prompt, where)
    user = [{"role": "user", "content": record.prompt}]
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": record.completion}], tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template renders the prompt differently with and "
                        "without the answer; use chat: false and format the prompt yourself")
    return full[len(prompt):]


def encode_example(tokenizer: Any, record: Record, max_length: int, *, chat: bool,
                   add_eos: bool, where: str) -> tuple[Encoded, bool]:
    """One language-model example and whether it was truncated."""
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    if record.prompt is None:
        ids = tokenizer(record.text or "", add_special_tokens=True)["input_ids"] + eos
        labels = list(ids)
        prompt_len = 0
    else:
        prompt = encode_prompt(tokenizer, record.prompt, chat, where)
        if chat:
            completion = tokenizer(_chat_completion(tokenizer, record, where),
                                   add_special_tokens=False)["input_ids"]
        else:
            completion = tokenizer(record.completion or "",
                                   add_special_tokens=False)["input_ids"] + eos
        if not completion:
            raise DataError(f"{where}: the completion tokenizes to nothing")
        ids = prompt + completion
        labels = [IGNORE] * len(prompt) + completion
        prompt_len = len(prompt)
    cut = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], min(prompt_len, max_length)), cut


def load_train_data(path: str | Path, tokenizer: Any, config: Mapping[str, Any], *,
                    max_length: int, chat: bool = False, add_eos: bool = True,
                    model: str = "the model") -> TrainData:
    """Read and tokenize a JSONL file for training ``model`` (whose config.json is
    ``config``)."""
    records = read_records(path)
    task = task_of(records)
    check_fits(task, config, str(path), model)
    if chat and records[0].kind != "completion":
        raise DataError(f"{path}: chat applies to prompt+completion records, not "
                        f"{records[0].kind} records")
    data = TrainData(str(path), file_sha256(path), task, records[0].kind, [])
    if task == "classification":
        data.label2id, num_labels = classes(records, config)
        for r in records:
            ids = tokenizer(r.text or "", add_special_tokens=True)["input_ids"]
            data.truncated += len(ids) > max_length
            label = label_id(r, data.label2id or {}, num_labels)
            data.examples.append(Encoded(ids[:max_length], [label], len(ids[:max_length])))
            data.lines.append(r.line)
        return data
    for r in records:
        where = f"{path}:{r.line}"
        enc, cut = encode_example(tokenizer, r, max_length, chat=chat, add_eos=add_eos,
                                  where=where)
        data.truncated += cut
        if all(t == IGNORE for t in enc.labels[1:]):  # nothing left to predict
            data.dropped += 1
            continue
        data.examples.append(enc)
        data.lines.append(r.line)
    if not data.examples:
        raise DataError(f"{path}: every example loses its whole completion to truncation at "
                        f"max_length {max_length}; raise max_length")
    return data


@dataclass
class Batch:
    """One forward pass: padded tensors, and which examples (and epoch) they hold."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # token labels (IGNORE where not scored), or one class per row
    index: list[int]
    epoch: int

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device), self.index, self.epoch)


def make_batch(data: TrainData, index: Sequence[int], epoch: int, pad_id: int) -> Batch:
    items = [data.examples[i] for i in index]
    padded = pad_batch(items, pad_id)
    labels = padded["labels"] if data.task == "lm" else \
        torch.tensor([e.labels[0] for e in items])
    return Batch(padded["input_ids"], padded["attention_mask"], labels, list(index), epoch)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order examples are taken in during ``epoch``: a permutation seeded by (seed,
    epoch), so a resumed run takes the same examples as an uninterrupted one."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) & ((1 << 63) - 1))
    return torch.randperm(count, generator=gen).tolist()
