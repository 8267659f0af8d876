"""Reading and validating safetensors headers without touching tensor bytes.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data.
Every entry is checked before anything is allocated for it: known dtype, a shape of
non-negative integers, offsets inside the data section whose length matches the shape, and no
two tensors sharing bytes. A hostile file is rejected with the file and tensor named.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch

from surgery.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """The parsed header of one safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: bytes
    file_size: int


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_header(path: Path) -> Header:
    """Parse and validate the header of ``path``; read no tensor data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = header_length(path, prefix, size)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    return parse_header(path, raw, size)


def header_length(path: Path | str, prefix: bytes, size: int) -> int:
    """The JSON header length declared by the first 8 bytes of a file of ``size`` bytes."""
    if size < 8 or len(prefix) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(
            f"{path}: corrupt safetensors header (declares {n} header bytes, "
            f"file has {size}); the file is truncated or not safetensors"
        )
    return n


def parse_header(path: Path, raw: bytes, size: int) -> Header:
    """Validate the JSON header ``raw`` of a file of ``size`` bytes that will live at ``path``
    (local, or where a remote file will be downloaded to)."""
    n = len(raw)
    try:
        table = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (__metadata__ must map str to str)"
        )
    data_start = 8 + n
    data_len = size - data_start
    tensors = {name: _entry(path, name, spec, data_start, data_len) for name, spec in table.items()}
    _check_layout(path, tensors, data_len)
    return Header(path=path, tensors=tensors, metadata=metadata, header_bytes=raw, file_size=size)


def _entry(path: Path, name: str, spec: object, data_start: int, data_len: int) -> TensorInfo:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad("header entry must have exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise bad(f"unsupported dtype {spec['dtype']!r}")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"invalid shape {shape!r}")
    offsets = spec["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise bad(f"data_offsets {offsets} run past the end of the data ({data_len} bytes)")
    numel = math.prod(shape)
    if numel * dtype_size(dtype) != end - begin:
        raise bad(f"data_offsets {offsets} hold {end - begin} bytes, shape {shape} needs "
                  f"{numel * dtype_size(dtype)}")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """No two tensors share bytes, and no byte of the data section belongs to no tensor (as the
    reference reader requires: hidden or trailing bytes are refused, not skipped)."""
    ordered = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.start)
    for prev, cur in pairwise(ordered):
        if cur.start < prev.end:
            raise CheckpointError(
                f"{path}: tensors {prev.name!r} and {cur.name!r} overlap in the data section"
            )
    covered = sum(t.nbytes for t in ordered)
    if covered != data_len:
        raise CheckpointError(
            f"{path}: {data_len - covered} bytes of the data section belong to no tensor "
            "(hidden or trailing data); not a valid safetensors file"
        )
