"""Reusable byte buffers for the write pass.

A fresh multi-megabyte allocation is returned to the OS when freed and page-faults again on
its next first touch; measured on a 2-core VM, converting a 16M-element bf16 tensor to float32
into a fresh tensor took 5-8x longer than into an existing one. Models repeat the same tensor
shapes layer after layer, so the engine keeps freed buffers by size and hands them out again.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

import torch


class BufferPool:
    """Freed flat uint8 CPU tensors, most recently freed first, holding at most ``limit``
    bytes: when full, the longest-unused buffers are dropped, so the sizes of the first
    tensors (embeddings) do not crowd out those that recur (every layer's). Free buffers are
    kept by size, so taking and giving cost the same however many are held."""

    def __init__(self, limit: int, pin: bool = False) -> None:
        self.limit = limit
        self.pin = pin
        self.held = 0
        # size -> (when freed, buffer), oldest first; a model has few distinct sizes, so
        # finding the oldest of all is a short scan of the sizes' first entries.
        self.free: dict[int, deque[tuple[int, torch.Tensor]]] = {}
        self.clock = itertools.count()
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            same = self.free.get(nbytes)
            if same:
                self.held -= nbytes
                return same.pop()[1]
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` backed by a pooled buffer."""
        numel = 1
        for d in shape:
            numel *= d
        return self.take(numel * dtype.itemsize).view(dtype).view(shape)

    def give(self, t: torch.Tensor) -> None:
        """Return the buffer behind a tensor made by :meth:`take` or :meth:`tensor`."""
        # The whole buffer, also when ``t`` views part of it (a read's aligned span).
        flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        size = flat.numel()
        if size == 0 or size > self.limit:
            return
        with self.lock:
            self.free.setdefault(size, deque()).append((next(self.clock), flat))
            self.held += size
            while self.held > self.limit:
                oldest = min(self.free, key=lambda n: self.free[n][0][0] if self.free[n]
                             else float("inf"))
                self.held -= self.free[oldest].popleft()[1].numel()
