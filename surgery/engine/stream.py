"""Streaming evaluation: one output tensor at a time, reads prefetched on a thread.

The reader thread walks ahead of the computation, reading the leaf tensors the next outputs need
into memory, bounded by a byte budget, so reading overlaps computing. Peak memory is the budget
plus the few tensors being computed, whatever the model size.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from surgery.checkpoint import Checkpoint
from surgery.engine.buffers import BufferPool
from surgery.errors import UsageError
from surgery.expr.node import EvalContext, LoadNode, Node, Reduction, TensorSpec

DEFAULT_PREFETCH_BYTES = 512 * 1024 * 1024
# Row-wise graphs compute large tensors in blocks of about this many elements.
ROW_BLOCK_ELEMENTS = 16 * 1024 * 1024
# Freed buffers kept for reuse: about one layer's reads, float32 conversions and outputs.
POOL_BYTES = 512 * 1024 * 1024


@dataclass
class ProgressEvent:
    """Where a run stands: ``phase`` is "reduce" (statistics pass) or "write"."""

    phase: str
    done: int
    total: int
    bytes_done: int
    bytes_total: int
    name: str


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class Profile:
    """Where the time went. Reading, computing and writing run on three threads at once, so
    the parts overlap: ``read_s`` is the time the computation waited for the reader,
    ``compute_s`` the time spent computing (reductions and outputs), ``write_s`` the time the
    writer spent writing and hashing shards, ``write_wait_s`` the time finished tensors waited
    for the writer to take them."""

    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    write_wait_s: float = 0.0
    wall_s: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    passes: list[str] = field(default_factory=list)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


Fetched = dict[tuple[int, str], torch.Tensor]


class Prefetcher:
    """Reads the leaf tensors of each planned item on a thread, ahead of use."""

    _END = object()

    def __init__(self, plan: list[list[tuple[Checkpoint, str]]], budget: int, pin: bool,
                 pool: BufferPool | None = None) -> None:
        self.plan = plan
        self.budget = budget
        self.pin = pin
        self.pool = pool
        self.in_flight = 0
        self.cond = threading.Condition()
        self.out: queue.Queue[object] = queue.Queue()
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="surgery-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for reads in self.plan:
                size = sum(ck.info(n).nbytes for ck, n in reads)
                with self.cond:
                    # Always admit one item, even one larger than the budget.
                    while self.in_flight and self.in_flight + size > self.budget and not self.stop:
                        self.cond.wait()
                    if self.stop:
                        return
                    self.in_flight += size
                fetched: Fetched = {}
                for ck, n in reads:
                    if self.pool is not None:  # straight into a reused (pinned for CUDA) buffer
                        t = ck.read(n, self.pool.take(ck.info(n).nbytes))
                    else:
                        t = ck.read(n)
                        t = t.pin_memory() if self.pin else t
                    fetched[(id(ck), n)] = t
                self.out.put((size, fetched))
            self.out.put(self._END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self.out.put(e)

    def __iter__(self) -> Iterator[Fetched]:
        while True:
            item = self.out.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            size, fetched = item  # type: ignore[misc]
            yield fetched
            with self.cond:
                self.in_flight -= size
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        while self.thread.is_alive():
            try:
                self.out.get(timeout=0.05)
            except queue.Empty:
                pass
            with self.cond:
                self.cond.notify_all()


@dataclass
class StreamOptions:
    device: torch.device
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES
    progress: ProgressFn | None = None
    profile: Profile = field(default_factory=Profile)


def _upload(fetched: Fetched, device: torch.device, stream: torch.cuda.Stream
            ) -> tuple[Fetched, torch.cuda.Event]:
    """Start copying pinned CPU tensors to the GPU on a side stream; the event marks the end."""
    with torch.cuda.stream(stream):
        moved = {k: t.to(device, non_blocking=True) for k, t in fetched.items()}
        done = torch.cuda.Event()
        done.record(stream)
    return moved, done


def _stream(jobs: list[tuple[str, list[tuple[Checkpoint, str]]]], opts: StreamOptions,
            phase: str, work: Callable[[str, EvalContext], float | None],
            pool: BufferPool | None = None) -> None:
    """Run ``work`` for each job name with its reads prefetched; report progress.

    With a ``pool``, read buffers (and the context's conversions) come from it and go back
    once ``work`` returns, so ``work`` must copy out whatever it keeps. On CUDA the next job's
    inputs are copied to the GPU on a side stream while the current job computes.
    """
    total_bytes = sum(ck.info(n).nbytes for _, reads in jobs for ck, n in reads)
    cuda = opts.device.type == "cuda"
    prefetch = Prefetcher([reads for _, reads in jobs], opts.prefetch_bytes, pin=cuda, pool=pool)
    copy_stream = torch.cuda.Stream(opts.device) if cuda else None
    done_bytes = 0
    prof = opts.profile
    prof.passes.append(phase)
    try:
        it = iter(prefetch)
        ahead: tuple[Fetched, Fetched, torch.cuda.Event | None] | None = None
        for i, (name, reads) in enumerate(jobs):
            t0 = time.perf_counter()
            if ahead is None:
                host = next(it)
                ahead = (host, *_upload(host, opts.device, copy_stream)) if copy_stream \
                    else (host, host, None)
            host, fetched, uploaded = ahead
            ahead = None
            if copy_stream is not None and i + 1 < len(jobs):
                nxt = next(it)  # overlap the next upload with this computation
                ahead = (nxt, *_upload(nxt, opts.device, copy_stream))
            t1 = time.perf_counter()
            prof.read_s += t1 - t0
            if uploaded is not None:
                current = torch.cuda.current_stream(opts.device)
                current.wait_event(uploaded)
                for t in fetched.values():
                    t.record_stream(current)
            ctx = EvalContext(name, opts.device, dict(fetched), opts.seed, opts.compute_dtype,
                              pool=pool if not cuda else None)
            waited = work(name, ctx) or 0.0
            prof.compute_s += time.perf_counter() - t1 - waited
            prof.write_wait_s += waited
            if pool is not None:
                # work() has copied its output off these buffers (synchronously on CUDA, so the
                # uploads from the pinned read buffers are complete too).
                for t in [*host.values(), *ctx.scratch]:
                    pool.give(t)
            size = sum(ck.info(n).nbytes for ck, n in reads)
            done_bytes += size
            prof.bytes_read += size
            if opts.progress:
                opts.progress(ProgressEvent(phase, i + 1, len(jobs), done_bytes, total_bytes, name))
        for _ in it:  # drain the end marker so the thread finishes
            pass
    finally:
        prefetch.close()


def pending_reductions(root: Node) -> list[Reduction]:
    return [r for node in root.walk() for r in node.reductions() if not r.resolved]


def resolve_reductions(root: Node, opts: StreamOptions) -> None:
    """Compute every whole-model statistic the graph needs, in as few passes as the
    dependencies allow: all reductions whose inputs need nothing unresolved share one pass."""
    while True:
        pending = pending_reductions(root)
        if not pending:
            return
        ready = [r for r in pending
                 if not any(pending_reductions(n) for n in r.inputs)]
        if not ready:
            raise RuntimeError("reductions depend on each other in a cycle")
        wanted = {id(r): set(r.names()) for r in ready}
        order: list[str] = []
        seen: set[str] = set()
        for r in ready:
            for n in r.names():
                if n not in seen:
                    seen.add(n)
                    order.append(n)
        jobs = []
        for name in order:
            reads: dict[tuple[int, str], tuple[Checkpoint, str]] = {}
            for r in ready:
                if name in wanted[id(r)]:
                    for node in r.inputs:
                        for ck, n in node.reads(name):
                            reads.setdefault((id(ck), n), (ck, n))
            jobs.append((name, list(reads.values())))

        def work(name: str, ctx: EvalContext, ready: list[Reduction] = ready,
                 wanted: dict[int, set[str]] = wanted) -> None:
            for r in ready:
                if name in wanted[id(r)]:
                    r.update(name, [ctx.to_compute(ctx.value(n, name)) for n in r.inputs])

        _stream(jobs, opts, "reduce", work)
        for r in ready:
            r.resolve()


def stream_tensors(root: Node, names: list[str], opts: StreamOptions,
                   out_dtype: Callable[[str], torch.dtype], reuse_outputs: bool = False
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor in its output dtype) for each of ``names``, in order.

    Runs the reduction passes first, then computes on a thread of its own, so reading (the
    prefetch thread), computing and the consumer's writing overlap. With ``reuse_outputs`` a
    yielded tensor's memory is reused once the consumer asks for the next one, so the consumer
    must be done with it by then (the writer is).
    """
    resolve_reductions(root, opts)
    results: queue.Queue[object] = queue.Queue(maxsize=2)
    end = object()
    stop = threading.Event()
    cuda = opts.device.type == "cuda"
    pool = BufferPool(POOL_BYTES, pin=cuda)

    def work(name: str, ctx: EvalContext) -> float:
        spec = root.spec(name)
        rows = _row_block(root, spec, cuda)
        if rows and reuse_outputs:
            out = pool.tensor(spec.shape, out_dtype(name))
            for start in range(0, spec.shape[0], rows):
                n = min(rows, spec.shape[0] - start)
                part = EvalContext(name, ctx.device, {k: v.narrow(0, start, n) for k, v in
                                                      ctx.fetched.items()},
                                   ctx.seed, ctx.compute_dtype, pool=ctx.pool)
                out.narrow(0, start, n).copy_(part.value(root, name))
                for buf in part.scratch:
                    pool.give(buf)
        else:
            t = ctx.value(root, name)
            if tuple(t.shape) != spec.shape:
                raise RuntimeError(
                    f"{name}: computed shape {list(t.shape)} != planned {spec.shape}")
            if reuse_outputs:  # one pass: cast and copy off the device into a reused buffer
                out = pool.tensor(spec.shape, out_dtype(name)).copy_(t)
            else:
                out = t.to(out_dtype(name)).to("cpu").contiguous()
        t0 = time.perf_counter()
        while not stop.is_set():
            try:
                results.put((name, out), timeout=0.1)
                return time.perf_counter() - t0
            except queue.Full:
                continue
        raise _Stopped

    jobs = [(n, root.reads(n)) for n in names]
    error: list[BaseException] = []

    def produce() -> None:
        try:
            _stream(jobs, opts, "write", work, pool)
        except _Stopped:
            pass
        except BaseException as e:
            error.append(e)
        finally:
            results.put(end)

    producer = threading.Thread(target=produce, name="surgery-compute", daemon=True)
    producer.start()
    try:
        while (item := results.get()) is not end:
            yield item  # type: ignore[misc]
            if reuse_outputs:
                pool.give(item[1])  # type: ignore[index]
    finally:
        stop.set()
        while producer.is_alive():
            try:
                results.get(timeout=0.05)
            except queue.Empty:
                pass
        producer.join()
    if error:
        raise error[0]


def _row_block(root: Node, spec: TensorSpec, cuda: bool) -> int:
    """Rows per block when ``root`` is row-wise all the way down and the tensor is large
    enough for blocks to save memory (CPU only); 0 to compute it whole."""
    if cuda or len(spec.shape) < 1 or spec.numel <= ROW_BLOCK_ELEMENTS:
        return 0
    if not all(isinstance(n, LoadNode) or getattr(n, "rowwise", False) for n in root.walk()):
        return 0
    return max(1, ROW_BLOCK_ELEMENTS * spec.shape[0] // spec.numel)


class _Stopped(Exception):
    """The consumer of a stream went away; the producer winds down quietly."""
