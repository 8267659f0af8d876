"""Floor 1: reading checkpoints (headers, tensor bytes, side files). Knows nothing of methods."""

from __future__ import annotations

from pathlib import Path

from surgery.checkpoint.checkpoint import Checkpoint, open_local, open_pickle
from surgery.checkpoint.header import DTYPE_NAMES, DTYPES, TensorInfo, dtype_size, read_header
from surgery.checkpoint.hub import HubRef, RemoteCheckpoint, open_remote, parse_hub_id
from surgery.errors import CheckpointError

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "Checkpoint",
    "HubRef",
    "RemoteCheckpoint",
    "TensorInfo",
    "dtype_size",
    "open_checkpoint",
    "parse_hub_id",
    "read_header",
]


def open_checkpoint(spec: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a local path or a Hub id (``org/name[@revision]``), reading headers only."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if allow_pickle and path.is_dir() and not any(path.glob("*.safetensors")):
            return open_pickle(path, source=text)
        return open_local(path, source=text)
    ref = parse_hub_id(text)
    if ref is None:
        raise CheckpointError(f"{text}: no such file or directory")
    return open_remote(text, ref)

