"""Reusable byte buffers for the write pass.

A fresh multi-megabyte allocation is returned to the OS when freed and page-faults again on
its next first touch; measured on a 2-core VM, converting a 16M-element bf16 tensor to float32
into a fresh tensor took 5-8x longer than into an existing one. Models repeat the same tensor
shapes layer after layer, so the engine keeps freed buffers by size and hands them out again.
"""

from __future__ import annotations

import threading

import torch


class BufferPool:
    """Freed flat uint8 CPU tensors, most recently freed first, holding at most ``limit``
    bytes: when full, the longest-unused buffers are dropped, so the sizes of the first
    tensors (embeddings) do not crowd out those that recur (every layer's)."""

    def __init__(self, limit: int, pin: bool = False) -> None:
        self.limit = limit
        self.pin = pin
        self.held = 0
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            for i in range(len(self.free) - 1, -1, -1):
                if self.free[i].numel() == nbytes:
                    self.held -= nbytes
                    return self.free.pop(i)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` backed by a pooled buffer."""
        numel = 1
        for d in shape:
            numel *= d
        return self.take(numel * dtype.itemsize).view(dtype).view(shape)

    def give(self, t: torch.Tensor) -> None:
        """Return the buffer behind a tensor made by :meth:`take` or :meth:`tensor`."""
        flat = t.reshape(-1).view(torch.uint8)
        if flat.numel() == 0 or flat.numel() > self.limit:
            return
        with self.lock:
            self.free.append(flat)
            self.held += flat.numel()
            while self.held > self.limit:
                self.held -= self.free.pop(0).numel()
