"""The fine-tune step on several processes (``torchrun`` / ``accelerate launch``): data
parallel over the forward passes of each update, with the gradient transforms, trainable sets,
objectives and resumable state unchanged.

Each update takes ``batch_size × grad_accum`` examples, as on one process, in ``grad_accum``
forward passes; with N processes each runs ``grad_accum / N`` of them (contiguous, rank r the
r-th share), its loss divided by the target count of the whole update. The gradients are then
summed across processes (an all-reduce, gloo on the CPU, NCCL on GPUs), so every process holds
the gradient a single process would have accumulated, and applies the same transforms,
clipping and AdamW step: the replicas stay equal without broadcasting weights. Rank 0 alone
writes checkpoints and the output; the others wait for it and return.

This is plain data parallelism by all-reduce rather than torch's DDP wrapper: the wrapper
averages gradients over processes and splits batches itself, while the loop's token-weighted
loss over the whole update needs sums over passes chosen by the loop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from surgery.errors import UsageError


def world(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, number of processes): joins the process group a launcher describes in the
    environment (``WORLD_SIZE`` > 1), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_available():
        raise UsageError("WORLD_SIZE is set, but this torch has no torch.distributed")
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def device_for_rank(device: torch.device) -> torch.device:
    """Each process of a multi-GPU launch on its own GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check_divides(grad_accum: int, size: int) -> None:
    if size > 1 and grad_accum % size:
        raise UsageError(f"grad_accum {grad_accum} does not divide among {size} processes: "
                         f"each runs grad_accum / {size} of an update's forward passes; set "
                         f"grad_accum to a multiple of {size}")


def share(passes: Sequence[object], rank: int, size: int) -> list[object]:
    """This process's contiguous share of an update's forward passes."""
    per = len(passes) // size
    return list(passes[rank * per:(rank + 1) * per])


def all_reduce(params: Sequence[torch.nn.Parameter], loss: float, tokens: int
               ) -> tuple[float, int]:
    """Sum the gradients (one flat buffer), the loss and the token count over processes."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        if p.grad is None:
            p.grad = g
        p.grad.copy_(flat[offset:offset + n].view_as(g))
        offset += n
    stats = torch.tensor([loss, float(tokens)], dtype=torch.float64)
    dist.all_reduce(stats)
    return float(stats[0]), int(stats[1])


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
