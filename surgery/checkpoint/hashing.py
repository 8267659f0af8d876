"""SHA-256 of input files, cached by (path, size, mtime) so repeated runs hash once."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

from surgery.checkpoint import directio

_LOCK = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("WEIGHT_SURGERY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "weight-surgery"
    )
    return Path(root)


class Cancelled(Exception):
    """Hashing was stopped by its ``cancelled`` callable before the file's end."""


def file_sha256(path: Path, chunk: int = 16 * 1024 * 1024,
                cancelled: Callable[[], bool] | None = None) -> str:
    """SHA-256 of a file, read around the page cache unless the file is mostly in it
    (:mod:`surgery.checkpoint.directio`): hashing a model's inputs on its first run then
    costs the disk's time, not the cache's CPU, which the merge running beside it needs.
    ``cancelled`` is asked before each chunk; when it says so, :class:`Cancelled` is raised."""
    sha = hashlib.sha256()
    view = memoryview(mmap.mmap(-1, chunk))  # page-aligned, as direct reads need
    fd = directio.open_uncached(path)
    plain = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while True:
            if cancelled is not None and cancelled():
                raise Cancelled(path)
            # A direct read goes on only from an aligned offset (a short read ends there).
            use = fd if fd is not None and offset % directio.ALIGN == 0 else plain
            n = os.preadv(use, [view], offset)
            if not n:
                break
            sha.update(view[:n])
            offset += n
    finally:
        os.close(plain)
        if fd is not None:
            os.close(fd)
    return sha.hexdigest()


def cached_sha256(path: Path, cancelled: Callable[[], bool] | None = None) -> str:
    """The file's SHA-256, from the cache when its size and mtime are unchanged
    (``cancelled`` as in :func:`file_sha256`)."""
    st = os.stat(path)
    key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    store = cache_dir() / "sha256.json"
    with _LOCK:
        cache = _load(store)
        if key in cache:
            return cache[key]
    digest = file_sha256(path, cancelled=cancelled)
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
