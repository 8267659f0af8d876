"""Self-data distillation (arXiv 2410.09982): the teacher (the unpruned model) regenerates
the completions of a prompt+completion file by greedy decoding; the pruned model is then
fine-tuned on those instead of the original responses. Only the data changes, not the loss.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.data import Encoded, pad_batch, read_records
from surgery.errors import DataError, OutputExistsError, UsageError
from surgery.evaluate.metrics import load_model
from surgery.expr import Weights
from surgery.train.data import chat_prompt, encode_prompt
from surgery.train.model import resolve_source

DISTILL_REF = "Self-Data Distillation for pruned LLMs, arXiv 2410.09982"


@dataclass
class DistillResult:
    path: Path
    records: int
    empty: int  # prompts the teacher answered with nothing (left out)


@torch.no_grad()
def distill_data(teacher: str | Path | Weights, data: str | Path, out: str | Path, *,
                 max_new_tokens: int = 128, batch_size: int = 8, max_length: int = 1024,
                 device: str = "auto", force: bool = False, chat: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> DistillResult:
    """Write ``out``: the records of ``data`` with each completion replaced by the teacher's
    greedy continuation of its prompt (at most ``max_new_tokens`` tokens, ended by EOS).

    With ``chat`` the teacher continues the prompt as its chat template renders it (a user
    turn and the opening of the assistant's, as the fine-tune step's ``chat: true`` encodes
    it), so an instruct teacher answers as it was trained to; the file keeps the plain
    prompt, for a student fine-tuned with ``chat: true``."""
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    target = Path(out)
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists; pass --force (force=True) to "
                                "replace it")
    records = read_records(data)
    if records[0].kind != "completion":
        raise DataError(f"{data}: distillation regenerates completions; the file holds "
                        f"{records[0].kind} records, not prompt+completion")
    source = resolve_source(teacher)
    if chat:  # no chat template: say so before the weights load
        from transformers import AutoTokenizer

        chat_prompt(AutoTokenizer.from_pretrained(str(source.directory)), records[0].prompt,
                    source.label)
    model, tokenizer = load_model(source.directory, "perplexity", device)
    pad = next((int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                if t is not None), 0)
    dev = next(model.parameters()).device
    rows: list[dict[str, str]] = []
    empty = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, r.prompt, chat, f"{data}:{r.line}")[-max_length:]
                   for r in chunk]
        batch = {k: v.to(dev) for k, v in pad_batch([Encoded(p, [], len(p)) for p in prompts],
                                                     pad, left=True).items()}
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=pad)
        for rec, row in zip(chunk, generated[:, batch["input_ids"].shape[1]:], strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            if not tokenizer(text, add_special_tokens=False)["input_ids"]:
                empty += 1
                continue
            rows.append({"prompt": rec.prompt or "", "completion": text})
        if progress:
            progress(min(start + batch_size, len(records)), len(records))
    if not rows:
        raise DataError(f"{data}: the teacher {source.label} answered every prompt with "
                        "nothing; nothing to distill")
    write_jsonl(target, rows)
    return DistillResult(target, len(rows), empty)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write atomically: a half-written file never takes the name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    os.replace(tmp, path)
