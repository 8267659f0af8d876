"""JSONL data files. Each line is one object of one of three shapes:

- ``{"text": ...}``: language-model text (loss on every token);
- ``{"prompt": ..., "completion": ...}``: loss and exact match on the completion only;
- ``{"text": ..., "label": ...}``: a classification example (label: int or a label name).

Blank lines are skipped; anything else malformed is an error naming the file and line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import DataError

_SHAPES = ({"text"}, {"prompt", "completion"}, {"text", "label"})


@dataclass(frozen=True)
class Record:
    """One example; exactly one of the three shapes is filled."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    label: int | str | None = None
    line: int = 0

    @property
    def kind(self) -> str:
        if self.prompt is not None:
            return "completion"
        return "label" if self.label is not None else "text"

    @property
    def full_text(self) -> str:
        """The whole string a language model reads (prompt and completion joined)."""
        if self.prompt is not None:
            return self.prompt + (self.completion or "")
        return self.text or ""


def _parse(obj: object, where: str, lineno: int) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if keys not in _SHAPES:
        raise DataError(f"{where}: keys {sorted(keys)} are not one of text | prompt+completion "
                        "| text+label")
    for key in keys - {"label"}:
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string")
    label = obj.get("label")
    if "label" in obj and (isinstance(label, bool) or not isinstance(label, int | str)):
        raise DataError(f"{where}: 'label' must be an integer or a string")
    return Record(obj.get("text"), obj.get("prompt"), obj.get("completion"), label, lineno)


def read_records(path: str | Path) -> list[Record]:
    """All records of a JSONL file, all of one shape."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{p}: cannot read data file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8 text") from None
    records: list[Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        rec = _parse(obj, where, lineno)
        if records and rec.kind != records[0].kind:
            raise DataError(f"{where}: a {rec.kind} record in a file of {records[0].kind} "
                            f"records (line {records[0].line})")
        records.append(rec)
    if not records:
        raise DataError(f"{p}: no records")
    return records


def subsample(records: Sequence[Record], n: int | None, seed: int = 0) -> list[Record]:
    """``n`` records drawn without replacement by a generator seeded with ``seed``, kept in file
    order; all records when ``n`` is None or not smaller than the file."""
    if n is None or n >= len(records):
        return list(records)
    if n < 1:
        raise DataError(f"max_samples must be at least 1, got {n}")
    picked = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in picked]
