"""Direct I/O: large reads and writes that bypass the page cache (``O_DIRECT``).

Measured on the 2-core VM this project is benchmarked on (bench/RESULTS.md): a cold 2 GB
safetensors file read through the page cache ran at 1.4 GB/s and cost 0.9 s of kernel CPU; read
with O_DIRECT it ran at 2.0 GB/s for 0.05 s. Writing 2 GB and fsync'ing it took 7.4 s (6.5 s of
kernel CPU) through the page cache, 1.0 s (0.2 s) direct. A merge streams every byte once, so the
cache buys nothing and its CPU is taken from the arithmetic.

The cache does win when a file is already in it (a rerun on a model that fits in memory: 6.5
GB/s against 1.6 GB/s), so :func:`mostly_cached` asks the kernel (``mincore``) and such files
are read through the cache. ``WEIGHT_SURGERY_DIRECT_IO=off`` turns direct I/O off everywhere.

O_DIRECT needs the file offset, the length and the memory address aligned to the device's
block size; :data:`ALIGN` (4096) covers every common device. Where the platform or the file
system has no O_DIRECT (macOS, tmpfs on older kernels) everything goes through the cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import queue
import sys
import threading
from functools import cache

import torch

ALIGN = 4096
O_DIRECT: int = getattr(os, "O_DIRECT", 0)
# Reads smaller than this go through the page cache: the saving is per byte, the cost of a
# cache miss per read.
DIRECT_MIN_BYTES = 256 << 10
# Each file being written holds two staging buffers of this size (a multiple of ALIGN).
STAGE_BYTES = 8 << 20


def enabled() -> bool:
    """Whether this platform has O_DIRECT and the user has not turned it off."""
    setting = os.environ.get("WEIGHT_SURGERY_DIRECT_IO", "auto").strip().lower()
    return bool(O_DIRECT) and setting not in ("0", "off", "no", "false")


def span(start: int, nbytes: int) -> tuple[int, int]:
    """The aligned byte range [lo, hi) of a file that covers [start, start + nbytes)."""
    lo = start - start % ALIGN
    hi = -(-(start + nbytes) // ALIGN) * ALIGN
    return lo, hi


def buffer_size(nbytes: int) -> int:
    """Bytes of a buffer that holds the aligned span of any ``nbytes``-long range, at an
    aligned address: one block more on each side."""
    return -(-nbytes // ALIGN) * ALIGN + 2 * ALIGN


def aligned(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The first ``nbytes`` of ``buf`` (a flat uint8 CPU tensor of at least ``nbytes + ALIGN``
    bytes) that start at an ALIGN-aligned address."""
    pad = -buf.data_ptr() % ALIGN
    return buf.narrow(0, pad, nbytes)


def open_direct(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int | None:
    """``os.open`` with O_DIRECT added, or None where the file system refuses it."""
    if not enabled():
        return None
    try:
        return os.open(path, flags | O_DIRECT, mode)
    except OSError as e:
        if e.errno in (22, 95):  # EINVAL, EOPNOTSUPP: this file system has no direct I/O
            return None
        raise


def open_uncached(path: str | os.PathLike[str]) -> int | None:
    """A descriptor for direct reads of ``path``, or None when its reads should go through
    the page cache (no O_DIRECT here, or the file is mostly cached already)."""
    fd = open_direct(path, os.O_RDONLY)
    if fd is not None and mostly_cached(fd):
        os.close(fd)
        return None
    return fd


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


def mostly_cached(fd: int) -> bool:
    """Whether at least half of the file's pages are in the page cache (``mincore``). Maps
    the file without touching it, so nothing is read; False where this cannot be asked."""
    size = os.fstat(fd).st_size
    lib = _libc()
    if lib is None or size == 0:
        return False
    addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return False
    try:
        page = mmap.PAGESIZE
        vec = (ctypes.c_ubyte * (-(-size // page)))()
        if lib.mincore(addr, size, vec) != 0:
            return False
        resident = torch.frombuffer(vec, dtype=torch.uint8).bitwise_and(1).sum().item()
        return 2 * resident >= len(vec)
    finally:
        lib.munmap(addr, size)


class SequentialFile:
    """A new file written front to back: bytes are gathered in two aligned buffers of
    ``stage_bytes``, and each full one is written (with O_DIRECT where the file system has
    it) on a thread of its own while the other fills. :meth:`finish` writes the rest and
    fsyncs; an error of the writing thread is raised by the next call."""

    def __init__(self, path: str | os.PathLike[str], stage_bytes: int = STAGE_BYTES) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = open_direct(path, flags)
        self.direct = fd is not None
        self.fd = fd if fd is not None else os.open(path, flags, 0o644)
        self.stage_bytes = stage_bytes
        self.free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(2):
            self.free.put(aligned(torch.empty(stage_bytes + ALIGN, dtype=torch.uint8),
                                  stage_bytes))
        self.todo: queue.Queue[tuple[torch.Tensor, int, int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.buf: torch.Tensor | None = self.free.get()
        self.used = 0  # bytes in ``buf``
        self.offset = 0  # file offset of ``buf``'s first byte
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="surgery-write", daemon=True)
        self.thread.start()

    def write(self, data: bytes | torch.Tensor) -> None:
        """Append ``data``: bytes, or a flat uint8 CPU tensor (copied by torch, which lets
        the other threads run meanwhile)."""
        if not len(data):
            return
        src = data if isinstance(data, torch.Tensor) else torch.frombuffer(
            bytearray(data), dtype=torch.uint8)
        done = 0
        while done < len(src):
            if self.buf is None:
                self.buf = self._take()
            n = min(len(src) - done, self.stage_bytes - self.used)
            self.buf[self.used:self.used + n].copy_(src[done:done + n])
            self.used += n
            done += n
            if self.used == self.stage_bytes:
                self._submit()

    def _take(self) -> torch.Tensor:
        while True:
            self._raise()
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _submit(self) -> None:
        assert self.buf is not None
        self._raise()
        self.todo.put((self.buf, self.used, self.offset))
        self.offset += self.used
        self.buf, self.used = None, 0

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            buf, n, offset = item
            try:
                if self.error is None:
                    self._pwrite(memoryview(buf.numpy()), n, offset)
            except BaseException as e:  # raised again on the caller's thread
                self.error = e
            finally:
                self.free.put(buf)

    def _pwrite(self, buf: memoryview, n: int, offset: int) -> None:
        """Write the first ``n`` bytes of ``buf`` at ``offset``."""
        if self.direct and n % ALIGN:  # the tail: zero-padded, cut by finish()
            padded = -(-n // ALIGN) * ALIGN
            buf[n:padded] = bytes(padded - n)
            n = padded
        view = buf[:n]
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                if not self.direct or e.errno != 22:
                    raise
                # EINVAL: this file system wants other alignment; go on through the cache.
                os.close(self.fd)
                self.fd = os.open(self.path, os.O_WRONLY)
                self.direct = False

    def finish(self) -> None:
        """Write what is left, wait for the writes, cut the padding and fsync."""
        if self.used:
            self._submit()
        self._stop()
        self._raise()
        os.ftruncate(self.fd, self.offset)
        os.fsync(self.fd)
        self._close()

    def abort(self) -> None:
        """Stop writing and close the file (the caller removes it)."""
        self._stop()
        self._close()

    def _stop(self) -> None:
        if self.thread.is_alive():
            self.todo.put(None)
            self.thread.join()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
