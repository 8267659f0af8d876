"""Writing safetensors shards as a stream: the header first (all shapes are known from the
plan), then each tensor's bytes as it is computed, through two 8 MB staging buffers written
around the page cache (``directio.SequentialFile``). Nothing is held beyond the tensor in hand."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.checkpoint import DTYPE_NAMES, dtype_size
from surgery.checkpoint.directio import SequentialFile

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(value: int | str) -> int:
    """``2GB``, ``500MB``, ``1.5GiB`` or a byte count, to bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"cannot read {value!r} as a size (try 2GB, 500MB or a byte count)")
    unit = (match[2] or "").upper().removesuffix("B")
    size = int(float(match[1]) * _UNITS[unit])
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return dtype_size(self.dtype) * math.prod(self.shape)


def plan_shards(tensors: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a tensor larger
    than that gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def encode_header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header, padded with spaces to a multiple of 8 bytes."""
    table: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for t in tensors:
        table[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(table, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Writes one shard: header, then tensors in planned order; hashes what it writes."""

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str]) -> None:
        self.path = path
        self.expected = iter(tensors)
        self.current: PlannedTensor | None = None
        self.rows_left = 0
        self.sha = hashlib.sha256()
        self.finished = False
        self.file = SequentialFile(path)
        self._write(encode_header(tensors, metadata))

    def _write(self, data: bytes | torch.Tensor) -> None:
        self.sha.update(data if isinstance(data, bytes) else tensor_bytes(data))
        self.file.write(data)

    def add(self, name: str, t: torch.Tensor) -> bool:
        """Write the next planned tensor, whole or as its next block of rows (first
        dimension); True once all of it is written."""
        planned = self.current or next(self.expected, None)
        rows = t.shape[0] if t.dim() else 1
        if planned is None or planned.name != name or planned.dtype != t.dtype \
                or planned.shape[1:] != tuple(t.shape[1:]) or len(planned.shape) != t.dim() \
                or rows > (self.rows_left if self.current else (planned.shape or (1,))[0]):
            raise RuntimeError(f"{self.path.name}: tensor {name!r} does not match the plan")
        if self.current is None:
            self.current, self.rows_left = planned, (planned.shape or (1,))[0]
        if t.numel():
            self._write(t.reshape(-1).view(torch.uint8))
        self.rows_left -= rows
        if self.rows_left:
            return False
        self.current = None
        return True

    def finish(self) -> str:
        if self.current is not None or next(self.expected, None) is not None:
            raise RuntimeError(f"{self.path.name}: ended before all planned tensors were written")
        self.file.finish()
        self.finished = True
        return self.sha.hexdigest()

    def abort(self) -> None:
        """Close and delete the unfinished shard, freeing its space; a rerun writes it again.
        A finished shard stays: it may be recorded already (interrupted while recording)."""
        if self.finished:
            return
        with contextlib.suppress(OSError):  # closing on a full disk fails; the caller says why
            self.file.abort()
        self.path.unlink(missing_ok=True)


def write_index(path: Path, shards: Iterable[tuple[str, list[PlannedTensor]]]) -> None:
    weight_map: dict[str, str] = {}
    total = 0
    for fname, tensors in shards:
        for t in tensors:
            weight_map[t.name] = fname
            total += t.nbytes
    doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    path.write_text(json.dumps(doc, indent=2) + "\n")

