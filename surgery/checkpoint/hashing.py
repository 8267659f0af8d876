"""SHA-256 of input files, cached by (path, size, mtime) so repeated runs hash once."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("WEIGHT_SURGERY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "weight-surgery"
    )
    return Path(root)


def file_sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    sha = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha.update(view[:n])
    return sha.hexdigest()


def cached_sha256(path: Path) -> str:
    """The file's SHA-256, from the cache when its size and mtime are unchanged."""
    st = os.stat(path)
    key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    store = cache_dir() / "sha256.json"
    with _LOCK:
        cache = _load(store)
        if key in cache:
            return cache[key]
    digest = file_sha256(path)
    with _LOCK:
        cache = _load(store)
        cache[key] = digest
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, sort_keys=True))
            os.replace(tmp, store)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    return digest


def _load(store: Path) -> dict[str, str]:
    try:
        data = json.loads(store.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
