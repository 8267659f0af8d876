"""A lazy view of a model: config.json, tokenizer files and the tensor table from headers.

Opening a checkpoint reads headers only; tensor bytes are read one tensor at a time with
positional reads (``os.preadv``), straight into the buffer the tensor will use; large reads of
files not already in the page cache bypass it (``directio``).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.checkpoint import directio
from surgery.checkpoint.header import Header, TensorInfo, read_header
from surgery.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class Checkpoint:
    """Tensor table and side files of one model. ``source`` is what the user named
    (a path or ``org/name@rev``); ``revision`` is the resolved commit for Hub inputs."""

    source: str
    root: Path
    tensors: dict[str, TensorInfo]
    config: dict
    headers: list[Header]
    revision: str | None = None
    tokenizer_files: list[Path] = field(default_factory=list)
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    # O_DIRECT descriptors, or None for files read through the page cache.
    _direct_fds: dict[Path, int | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Bytes of tensor data read by :meth:`read` so far (from any thread).
    bytes_read: int = field(default=0, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without open descriptors or locks (a Ray task opens its own)."""
        state = dict(self.__dict__)
        state.update(_fds={}, _direct_fds={}, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def files(self) -> list[Path]:
        return [h.path for h in self.headers]

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.source}: no tensor named {name!r}") from None

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def _direct_fd(self, path: Path) -> int | None:
        """A descriptor for direct reads of ``path``, or None when its reads should go through
        the page cache (no O_DIRECT here, or the file is mostly cached already)."""
        if path not in self._direct_fds:
            self._fd(path)  # fetches a remote file first
        with self._lock:
            if path not in self._direct_fds:
                self._direct_fds[path] = directio.open_uncached(path)
            return self._direct_fds[path]

    def _direct_span(self, info: TensorInfo, offset: int, nbytes: int) -> tuple[int, int] | None:
        """The aligned file range a direct read of these bytes takes, or None for a read
        through the page cache."""
        start = info.start + offset
        if nbytes < directio.DIRECT_MIN_BYTES or start % info.dtype.itemsize \
                or self._direct_fd(info.file) is None:
            return None
        return directio.span(start, nbytes)

    def read_size(self, name: str, rows: tuple[int, int] | None = None) -> int:
        """Bytes of the buffer :meth:`read` needs as ``out`` for this tensor or row range."""
        info = self.info(name)
        _, offset, nbytes = _row_range(info, rows)
        if self._direct_span(info, offset, nbytes) is None:
            return nbytes
        # Whatever the range's offset, so that pieces of one size reuse one buffer size.
        return directio.buffer_size(nbytes)

    def read(self, name: str, out: torch.Tensor | None = None,
             rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor from disk into a fresh CPU tensor of its stored dtype, or into
        ``out`` (a contiguous CPU uint8 tensor of :meth:`read_size` bytes) when given; the
        result may be a view into part of ``out``. ``rows=(start, count)`` reads only those
        rows (first dimension), one contiguous range."""
        info = self.info(name)
        shape, offset, nbytes = _row_range(info, rows)
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        with self._lock:
            self.bytes_read += nbytes
        direct = self._direct_span(info, offset, nbytes)
        if direct is not None:
            size = directio.buffer_size(nbytes)
            buf = out if out is not None else torch.empty(size, dtype=torch.uint8)
            if buf.numel() < size:
                raise ValueError(f"{name}: read buffer of {buf.numel()} bytes, {size} needed")
            got = self._read_direct(info, name, direct, info.start + offset + nbytes,
                                    directio.aligned(buf, direct[1] - direct[0]))
            if got is not None:
                skip = info.start + offset - direct[0]
                return got.narrow(0, skip, nbytes).view(info.dtype).view(shape)
            # The file system refused the direct read: read the plain way from now on.
            buf = buf.narrow(0, 0, nbytes)
        elif out is not None:
            buf = out.narrow(0, 0, nbytes)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        self._read_into(self._fd(info.file), info, name, info.start + offset,
                        memoryview(buf.numpy()))
        return buf.view(info.dtype).view(shape)

    def _read_direct(self, info: TensorInfo, name: str, direct: tuple[int, int], end: int,
                     region: torch.Tensor) -> torch.Tensor | None:
        """Read the aligned range ``direct`` (of which bytes up to ``end`` are needed) into
        ``region``; None when the file system refuses direct reads of this file."""
        lo, _ = direct
        fd = self._direct_fd(info.file)
        view = memoryview(region.numpy())
        done = 0
        try:
            while lo + done < end:
                if (lo + done) % directio.ALIGN:  # a short read mid-file: finish it cached
                    self._read_into(self._fd(info.file), info, name, lo + done,
                                    view[done:end - lo])
                    break
                got = os.preadv(fd, [view[done:]], lo + done)
                if got <= 0:
                    raise CheckpointError(f"{info.file}: tensor {name!r} is truncated on disk")
                done += got
        except OSError as e:
            if e.errno != 22:  # EINVAL: this file system wants other alignment
                raise
            with self._lock:
                self._direct_fds[info.file] = None
            assert fd is not None
            os.close(fd)
            return None
        return region

    @staticmethod
    def _read_into(fd: int, info: TensorInfo, name: str, start: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise CheckpointError(f"{info.file}: tensor {name!r} is truncated on disk")
            done += got

    def missing(self, files: list[Path] | None = None) -> list[Path]:
        """Weight files (all, or of ``files``) that must be downloaded before reading."""
        return []

    def fetch(self, files: list[Path] | None = None) -> None:
        """Make the weight files (all, or ``files``) local; local checkpoints already are."""

    def known_size(self, path: Path) -> int:
        """Size in bytes of one weight file of this checkpoint."""
        return next(h.file_size for h in self.headers if h.path == path)

    def known_sha256(self) -> dict[Path, str]:
        """SHA-256 of weight files known without hashing them (from the Hub's listing)."""
        return {}

    def __post_init__(self) -> None:
        # Closes the descriptors when the checkpoint is collected or at interpreter exit.
        self._finalizer = weakref.finalize(self, _close_all, self._fds, self._direct_fds)

    def close(self) -> None:
        with self._lock:
            _close_fds(self._fds)
            _close_fds(self._direct_fds)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


def _row_range(info: TensorInfo, rows: tuple[int, int] | None
               ) -> tuple[tuple[int, ...], int, int]:
    """Shape, byte offset within the tensor and byte count of a row range (all when None)."""
    if rows is None:
        return info.shape, 0, info.nbytes
    start, count = rows
    if not info.shape or start < 0 or count < 0 or start + count > info.shape[0]:
        raise CheckpointError(f"{info.file}: tensor {info.name!r} has no rows "
                              f"{start}..{start + count} (shape {list(info.shape)})")
    row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
    return (count, *info.shape[1:]), start * row_bytes, count * row_bytes


def _close_fds(fds: dict[Path, int] | dict[Path, int | None]) -> None:
    for fd in fds.values():
        if fd is not None:
            os.close(fd)
    fds.clear()


def _close_all(*tables: dict[Path, int] | dict[Path, int | None]) -> None:
    for fds in tables:
        _close_fds(fds)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot parse JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (root / name).is_file():
                raise CheckpointError(f"{index}: shard {name!r} is listed but missing")
        return [root / name for name in files]
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    found = sorted(root.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise CheckpointError(
            f"{root}: several .safetensors files and no {INDEX_NAME}; "
            "say which one to use by passing its path"
        )
    pickles = [n for n in PICKLE_NAMES if (root / n).exists()]
    if pickles:
        raise CheckpointError(
            f"{root}: only pickle weights ({pickles[0]}); pickles are never unpickled by default. "
            "Convert to safetensors, or pass allow_pickle=True / --allow-pickle to load them with "
            "torch.load(weights_only=True)"
        )
    raise CheckpointError(f"{root}: no model.safetensors or {INDEX_NAME} found")


def open_local(path: Path, source: str | None = None, revision: str | None = None) -> Checkpoint:
    """Open a local model directory or a single .safetensors file, reading headers only."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file or a model directory")
        root, files = path.parent, [path]
        config: dict = {}
    else:
        root, files = path, _weight_files(path)
        config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    headers = [read_header(f) for f in files]
    tensors: dict[str, TensorInfo] = {}
    for header in headers:
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
            if name in tensors:
                raise CheckpointError(
                    f"{path}: tensor {name!r} appears in both {tensors[name].file.name} "
                    f"and {header.path.name}"
                )
            tensors[name] = info
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    tokenizer = [root / n for n in TOKENIZER_FILES if path.is_dir() and (root / n).is_file()]
    return Checkpoint(
        source=source or str(path),
        root=root,
        tensors=tensors,
        config=config,
        headers=headers,
        revision=revision,
        tokenizer_files=tokenizer,
    )


@dataclass(eq=False)
class PickleCheckpoint(Checkpoint):
    """Weights from a PyTorch pickle, loaded with ``torch.load(weights_only=True, mmap=True)``.

    Only built when the user asks for it explicitly; the restricted unpickler refuses code.
    """

    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def read_size(self, name: str, rows: tuple[int, int] | None = None) -> int:
        return _row_range(self.info(name), rows)[2]

    def read(self, name: str, out: torch.Tensor | None = None,
             rows: tuple[int, int] | None = None) -> torch.Tensor:
        info = self.info(name)
        shape, _, nbytes = _row_range(info, rows)
        src = self.state[name] if rows is None else self.state[name].narrow(0, *rows)
        with self._lock:
            self.bytes_read += nbytes
        if out is None or not nbytes:
            return src.clone()
        return out.view(info.dtype).view(shape).copy_(src)


def open_pickle(root: Path, source: str | None = None) -> PickleCheckpoint:
    """Open ``pytorch_model.bin`` (or its sharded index) with the weights-only unpickler."""
    index = root / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted({root / f for f in _read_json(index).get("weight_map", {}).values()})
    else:
        files = [f for f in (root / n for n in PICKLE_NAMES) if f.is_file() and f.suffix != ".json"]
    if not files:
        raise CheckpointError(f"{root}: no pickle weights found")
    state: dict[str, torch.Tensor] = {}
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # the unpickler raises many types for hostile input
            raise CheckpointError(f"{file}: refused by the weights-only unpickler ({e})") from e
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{file}: does not hold a state dict")
        for name, t in loaded.items():
            if not isinstance(t, torch.Tensor):
                continue
            state[name] = t
            nbytes = t.numel() * t.element_size()
            tensors[name] = TensorInfo(name, file, t.dtype, tuple(t.shape), 0, nbytes)
    config = _read_json(root / "config.json") if (root / "config.json").is_file() else {}
    tokenizer = [root / n for n in TOKENIZER_FILES if (root / n).is_file()]
    return PickleCheckpoint(
        source=source or str(root), root=root, tensors=tensors, config=config, headers=[],
        tokenizer_files=tokenizer, state=state,
    )
