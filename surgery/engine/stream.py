"""Streaming evaluation: one output tensor at a time, reads prefetched on a thread.

The reader thread walks ahead of the computation, reading the leaf tensors the next outputs need
into memory, bounded by a byte budget, so reading overlaps computing. Peak memory is the budget
plus the few tensors being computed, whatever the model size.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from surgery.checkpoint import Checkpoint
from surgery.engine.buffers import BufferPool
from surgery.errors import UsageError
from surgery.expr.node import EvalContext, Node, Reduction, statistic_requests

# The reader runs at most this many bytes ahead of the computation, or one job's reads when a
# job needs more (a whole-tensor job of a graph that is not row-wise).
DEFAULT_PREFETCH_BYTES = 128 * 1024 * 1024
# Row-wise graphs read, compute and write large tensors in pieces of about this many elements
# (8 MB per bf16 input), so memory does not grow with the largest tensor ...
ROW_BLOCK_ELEMENTS = 4 * 1024 * 1024
# ... and evaluate each piece in blocks of about this many elements, small enough that the float32
# conversions of the inputs are still in the CPU's cache when the arithmetic reads them, large
# enough that Python's per-operation overhead (under the GIL, which the compute threads share)
# is small: measured on 2 cores, 256K beat 64K by 1.3x for task arithmetic and 1.7x for DARE
# on two threads (four 67M-element bf16 inputs).
CACHE_BLOCK_ELEMENTS = 256 * 1024
# A row-wise tensor with whole-tensor statistics whose inputs take at most this many bytes as
# stored is read once, whole, by the statistics, and its blocks compute from views of those
# reads; a larger one is read twice, in pieces for its statistics and in blocks for its
# values, so memory stays bounded by this. It covers the embeddings and output head of a 1B
# model across four inputs (4 x 131 MB), which at 256 MB were read twice (1.05 GB of 9.88).
SHARED_READ_BYTES = 640 * 1024 * 1024
# Such a tensor is read once the statistics of the tensor this many before it are done (or
# when its own are asked for): measured on 2 cores at 1B, Model Stock took 14.0 s with 2
# against 16.0 s with 1 (the reads then wait for the statistics instead of overlapping them).
READ_AHEAD = 2
# ... and, unless its own statistics are asked for, while the whole reads held (not yet let go)
# stay within this many bytes with it, or none are held: measured on 2 cores at 1B, DELLA's
# peak was 1.33 GB with 512 MB against 1.42 GB with 768 MB, in the same time.
SHARED_AHEAD_BYTES = 512 * 1024 * 1024


def shared_read_bytes(reads: Iterable[tuple[Checkpoint, str]]) -> int:
    """The bytes of a tensor's reads when they are few enough to be read once, whole, for
    its statistics and its blocks (see ``SHARED_READ_BYTES``); 0 when they are not."""
    nbytes = sum(ck.info(n).nbytes for ck, n in reads)
    return nbytes if nbytes <= SHARED_READ_BYTES else 0


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
    for the writer to take them. Whole-tensor statistics computed ahead (see
    :class:`Lookahead`) took ``statistics_s`` on their thread, and the computation waited
    ``statistics_wait_s`` for them."""

    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    write_wait_s: float = 0.0
    statistics_s: float = 0.0
    statistics_wait_s: float = 0.0
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
Rows = tuple[int, int] | None


@dataclass(frozen=True)
class Job:
    """One unit of streaming: output tensor ``name`` (or its rows ``rows=(start, count)``)
    and the leaf tensors it reads (the same rows of each)."""

    name: str
    reads: list[tuple[Checkpoint, str]]
    rows: Rows = None

    def read_bytes(self, ck: Checkpoint, n: str) -> int:
        info = ck.info(n)
        if self.rows is None:
            return info.nbytes
        return info.nbytes // info.shape[0] * self.rows[1]

    @property
    def nbytes(self) -> int:
        return sum(self.read_bytes(ck, n) for ck, n in self.reads)


class Prefetcher:
    """Reads the leaf tensors of each planned job on a thread, ahead of use."""

    _END = object()

    def __init__(self, plan: list[Job], budget: int, pin: bool,
                 pool: BufferPool | None = None,
                 borrow: Callable[[Job], Fetched | None] | None = None) -> None:
        self.plan = plan
        # Views of tensors read elsewhere (see Lookahead.borrow), given to a job in place of
        # its reads; they are not the pool's, so they are not handed back to it.
        self.borrow = borrow
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
            for job in self.plan:
                size = job.nbytes
                with self.cond:
                    # Always admit one item, even one larger than the budget.
                    while self.in_flight and self.in_flight + size > self.budget and not self.stop:
                        self.cond.wait()
                    if self.stop:
                        return
                    self.in_flight += size
                borrowed = self.borrow(job) if self.borrow is not None else None
                if borrowed is not None:
                    self.out.put((size, borrowed, False))
                    continue
                fetched: Fetched = {}
                for ck, n in job.reads:
                    if self.pool is not None:  # straight into a reused (pinned for CUDA) buffer
                        t = ck.read(n, self.pool.take(ck.read_size(n, job.rows)), job.rows)
                    else:
                        t = ck.read(n, rows=job.rows)
                        t = t.pin_memory() if self.pin else t
                    fetched[(id(ck), n)] = t
                self.out.put((size, fetched, True))
            self.out.put(self._END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self.out.put(e)

    def __iter__(self) -> Iterator[tuple[Fetched, bool]]:
        """Each job's reads, and whether they are the pool's (to be handed back)."""
        while True:
            item = self.out.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            size, fetched, pooled = item  # type: ignore[misc]
            yield fetched, pooled
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
    # CPU threads computing the blocks of a row-wise tensor; None: one per core.
    threads: int | None = None


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Workers:
    """Threads that share the blocks of one tensor: the calling thread and ``count - 1``
    helpers, each with one intra-op torch thread (the blocks are too small to split further)."""

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self.pool = ThreadPoolExecutor(self.count - 1, "surgery-compute",
                                       initializer=torch.set_num_threads, initargs=(1,)) \
            if self.count > 1 else None

    def map(self, fn: Callable[[object], object], items: Iterable[object]) -> list[object]:
        """``[fn(x) for x in items]``, each thread taking the next item as it is free (so a
        thread slowed by others' work on a shared core does not hold the rest up)."""
        items = list(items)
        if self.pool is None or len(items) < 2:
            return [fn(x) for x in items]
        out: list[object] = [None] * len(items)
        taken = itertools.count()  # next() on a count is atomic under the GIL
        failed: list[BaseException] = []

        def drain() -> None:
            while not failed and (i := next(taken)) < len(items):
                try:
                    out[i] = fn(items[i])
                except BaseException as e:
                    failed.append(e)

        futures = [self.pool.submit(drain) for _ in range(min(self.count, len(items)) - 1)]
        try:
            drain()
        finally:
            for f in futures:
                f.result()  # waits for all
        if failed:
            raise failed[0]
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class Lookahead:
    """The whole-tensor statistics of a row-wise graph's nodes (see ``ElementwiseNode``),
    computed on a thread of their own one tensor ahead of the computation: they read their
    pieces from the checkpoints, so those reads overlap the computing of the tensor before.
    :meth:`of` gives a tensor's statistics, for the contexts of all its blocks.

    A tensor whose reads take at most ``SHARED_READ_BYTES`` (``shared``) is read whole
    instead, once: the statistics' pieces and the blocks' reads (:meth:`borrow`, for the
    reader thread) are views of those tensors, held until the computation moves on."""

    def __init__(self, root: Node, jobs: list[Job], opts: StreamOptions, threads: int) -> None:
        self.root = root
        self.opts = opts
        names = [job.name for job in jobs]
        # (A scalar is computed whole, its statistics with it.)
        self.requests = {n: r for n in dict.fromkeys(names)
                         if root.spec(n).shape and (r := statistic_requests(root, n))}
        self.order = list(self.requests)
        self.position = {n: i for i, n in enumerate(self.order)}
        self.reads = {job.name: job.reads for job in jobs}
        self.shared = {n: b for n in self.order if (b := shared_read_bytes(self.reads[n]))}
        self.futures: dict[str, Future[tuple[dict, Fetched]]] = {}
        self.submitted = 0
        # The whole reads of shared tensors, on a thread of their own (see READ_AHEAD), so
        # that reading overlaps computing.
        self.read_futures: dict[str, Future[Fetched]] = {}
        self.read_submitted = 0
        self.held: dict[str, int] = {}  # the bytes of the whole reads started and not let go
        self.last_ahead = -1  # the furthest position whose read was asked for
        self.reader = ThreadPoolExecutor(1, "surgery-shared-read") if self.shared else None
        self.lock = threading.Lock()  # submissions come from the compute and reader threads
        self.current: tuple[str | None, dict] = (None, {})
        self.pool = ThreadPoolExecutor(1, "surgery-statistics", initializer=torch.set_num_threads,
                                       initargs=(1,)) if self.order else None
        # Threads of their own, among which each statistic shares its pieces (ctx.map).
        self.workers = Workers(threads) if self.order else None

    def _future(self, name: str, ahead: int) -> Future[tuple[dict, Fetched]]:
        """The computation of ``name``'s statistics, started (with those before it, and
        ``ahead`` more after it, and the whole reads of those that are shared) if it was not
        yet."""
        assert self.pool is not None
        with self.lock:
            ahead = min(self.position[name] + ahead, len(self.order) - 1)
            self._read_ahead(ahead, force=True)
            while self.submitted <= ahead:
                n = self.order[self.submitted]
                self.futures[n] = self.pool.submit(self._compute, n)
                self.submitted += 1
            return self.futures[name]

    def _read_ahead(self, last: int, force: bool = False) -> None:
        """Start the whole reads of the shared tensors up to position ``last``, in order:
        with ``force`` whatever they hold, else while the bytes held stay within
        SHARED_AHEAD_BYTES (see there); then those asked for before that this let wait.
        Under the lock."""
        forced = last if force else -1
        self.last_ahead = max(self.last_ahead, last)
        end = min(self.last_ahead, len(self.order) - 1)
        while self.reader is not None and self.read_submitted <= end:
            n = self.order[self.read_submitted]
            if n in self.shared:
                size = self.shared[n]
                if (self.read_submitted > forced and self.held
                        and sum(self.held.values()) + size > SHARED_AHEAD_BYTES):
                    return
                self.held[n] = size
                self.read_futures[n] = self.reader.submit(self._read, n)
            self.read_submitted += 1

    def of(self, name: str) -> dict:
        """The statistics of tensor ``name`` (waiting for them), with the next tensor's
        started; the same dict for every call until another tensor is asked for. Tensors
        must be asked for in the order of ``names``; the tensors read for the one before are
        let go."""
        if self.current[0] == name:
            return self.current[1]
        with self.lock:  # the tensor before is computed: its reads go (before the wait)
            if self.current[0] is not None:
                self.futures.pop(self.current[0], None)
                if self.held.pop(self.current[0], None) is not None:
                    self._read_ahead(self.last_ahead)
        self.current = (None, {})
        stats: dict = {}
        if self.pool is not None and name in self.requests:
            t0 = time.perf_counter()
            stats = self._future(name, 1).result()[0]
            self.opts.profile.statistics_wait_s += time.perf_counter() - t0
        self.current = (name, stats)
        return stats

    def borrow(self, job: Job) -> Fetched | None:
        """For a job of a shared tensor, views of the tensors its statistics read (waiting
        for them) in place of its own reads; None for any other job."""
        if job.name not in self.shared:
            return None
        # Nothing further ahead than the computation starts: each held tensor costs memory.
        whole = self._future(job.name, 0).result()[1]
        if job.rows is None:
            return dict(whole)
        return {key: t.narrow(0, *job.rows) for key, t in whole.items()}

    def _compute(self, name: str) -> tuple[dict, Fetched]:
        t0 = time.perf_counter()
        spec = self.root.spec(name)
        with self.lock:
            read = self.read_futures.pop(name, None)
        sources = read.result() if read is not None else {}
        # Rows set, nothing fetched: the statistics read their pieces from the checkpoints
        # (or take them from the whole tensors just read).
        ctx = EvalContext(name, self.opts.device, {}, self.opts.seed, self.opts.compute_dtype,
                          rows=(0, spec.shape[0]), workers=self.workers, sources=sources)
        for node, sub in self.requests[name]:
            ctx.statistic(node, sub)
        with self.lock:
            self._read_ahead(self.position[name] + READ_AHEAD)
        self.opts.profile.statistics_s += time.perf_counter() - t0
        return ctx.statistics, sources

    def _read(self, name: str) -> Fetched:
        # Into one buffer (one allocation, handed back to the system whole once let go, where
        # many would leave the heap fragmented), several reads in flight.
        reads = self.reads[name]
        sizes = [ck.read_size(n) for ck, n in reads]
        buf = torch.empty(sum(sizes), dtype=torch.uint8)
        starts = list(itertools.accumulate(sizes, initial=0))
        assert self.workers is not None
        got = self.workers.map(lambda i: reads[i][0].read(
            reads[i][1], buf.narrow(0, starts[i], sizes[i])), range(len(reads)))
        return {(id(ck), n): t for (ck, n), t in zip(reads, got, strict=True)}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.reader is not None:
            self.reader.shutdown(wait=True, cancel_futures=True)
        if self.workers is not None:
            self.workers.close()


def _upload(fetched: Fetched, device: torch.device, stream: torch.cuda.Stream
            ) -> tuple[Fetched, torch.cuda.Event]:
    """Start copying pinned CPU tensors to the GPU on a side stream; the event marks the end."""
    with torch.cuda.stream(stream):
        moved = {k: t.to(device, non_blocking=True) for k, t in fetched.items()}
        done = torch.cuda.Event()
        done.record(stream)
    return moved, done


def _stream(jobs: list[Job], opts: StreamOptions, phase: str,
            work: Callable[[Job, EvalContext], float | None],
            pool: BufferPool | None = None,
            borrow: Callable[[Job], Fetched | None] | None = None) -> None:
    """Run ``work`` for each job with its reads prefetched; report progress.

    With a ``pool``, read buffers (and the context's conversions) come from it and go back
    once ``work`` returns, so ``work`` must copy out whatever it keeps. On CUDA the next job's
    inputs are copied to the GPU on a side stream while the current job computes.
    """
    total_bytes = sum(job.nbytes for job in jobs)
    # What is read, counted where it is read: whole-tensor statistics read too.
    checkpoints = list({id(ck): ck for job in jobs for ck, _ in job.reads}.values())
    read_before = sum(ck.bytes_read for ck in checkpoints)
    cuda = opts.device.type == "cuda"
    prefetch = Prefetcher(jobs, opts.prefetch_bytes, pin=cuda, pool=pool, borrow=borrow)
    copy_stream = torch.cuda.Stream(opts.device) if cuda else None
    done_bytes = 0
    prof = opts.profile
    prof.passes.append(phase)
    try:
        it = iter(prefetch)
        ahead: tuple[tuple[Fetched, bool], Fetched, torch.cuda.Event | None] | None = None
        for i, job in enumerate(jobs):
            t0 = time.perf_counter()
            if ahead is None:
                host = next(it)
                ahead = (host, *_upload(host[0], opts.device, copy_stream)) if copy_stream \
                    else (host, host[0], None)
            (host_reads, pooled), fetched, uploaded = ahead
            ahead = None
            if copy_stream is not None and i + 1 < len(jobs):
                nxt = next(it)  # overlap the next upload with this computation
                ahead = (nxt, *_upload(nxt[0], opts.device, copy_stream))
            t1 = time.perf_counter()
            prof.read_s += t1 - t0
            if uploaded is not None:
                current = torch.cuda.current_stream(opts.device)
                current.wait_event(uploaded)
                for t in fetched.values():
                    t.record_stream(current)
            ctx = EvalContext(job.name, opts.device, dict(fetched), opts.seed,
                              opts.compute_dtype, pool=pool if not cuda else None)
            stats_waited = prof.statistics_wait_s
            waited = work(job, ctx) or 0.0
            stats_waited = prof.statistics_wait_s - stats_waited
            prof.compute_s += time.perf_counter() - t1 - waited - stats_waited
            prof.write_wait_s += waited
            if pool is not None:
                # work() has copied its output off these buffers (synchronously on CUDA, so the
                # uploads from the pinned read buffers are complete too).
                for t in [*(host_reads.values() if pooled else ()), *ctx.scratch]:
                    pool.give(t)
            done_bytes += job.nbytes
            if opts.progress:
                opts.progress(ProgressEvent(phase, i + 1, len(jobs), done_bytes, total_bytes,
                                            job.name))
        for _ in it:  # drain the end marker so the thread finishes
            pass
    finally:
        prefetch.close()
        prof.bytes_read += sum(ck.bytes_read for ck in checkpoints) - read_before


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
            jobs.append(Job(name, list(reads.values())))

        def work(job: Job, ctx: EvalContext, ready: list[Reduction] = ready,
                 wanted: dict[int, set[str]] = wanted) -> None:
            name = job.name
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
    must be done with it by then (the writer is), and a large tensor of a row-wise graph comes
    as consecutive blocks of its rows, each yielded under its name.
    """
    resolve_reductions(root, opts)
    results: queue.Queue[object] = queue.Queue(maxsize=2)
    end = object()
    stop = threading.Event()
    cuda = opts.device.type == "cuda"
    by_rows = rowwise_names(root, names) if reuse_outputs and not cuda else set()
    jobs = [job for n in names for job in _jobs(root, n, n in by_rows)]
    budget = max(opts.prefetch_bytes, max((j.nbytes for j in jobs), default=0))
    # Freed buffers kept for reuse, as many bytes as the reader may hold ahead.
    pool = BufferPool(budget, pin=cuda)

    workers = Workers(1 if cuda else opts.threads or default_threads())
    # A row-wise tensor comes in several jobs, which share its whole-tensor statistics,
    # computed ahead on twice as many threads as compute blocks: they wait on their reads.
    lookahead = Lookahead(root, [job for job in jobs if job.name in by_rows], opts,
                          2 * workers.count) if by_rows else None

    def work(job: Job, ctx: EvalContext) -> float:
        name = job.name
        spec = root.spec(name)
        if lookahead is not None and spec.shape and name in by_rows:
            stats = lookahead.of(name)
            first, rows = job.rows or (0, spec.shape[0])
            out = pool.tensor((rows, *spec.shape[1:]), out_dtype(name))
            step = max(1, CACHE_BLOCK_ELEMENTS * spec.shape[0] // max(spec.numel, 1))

            def block(start: int) -> None:
                n = min(step, rows - start)
                part = EvalContext(name, ctx.device, {k: v.narrow(0, start, n) for k, v in
                                                      ctx.fetched.items()},
                                   ctx.seed, ctx.compute_dtype, pool=ctx.pool,
                                   rows=(first + start, n), statistics=stats)
                out.narrow(0, start, n).copy_(part.value(root, name))
                for buf in part.scratch:
                    pool.give(buf)

            workers.map(block, range(0, rows, step))
        else:
            t = ctx.value(root, name)
            if tuple(t.shape) != spec.shape:
                raise RuntimeError(
                    f"{name}: computed shape {list(t.shape)} != planned {spec.shape}")
            if reuse_outputs:  # one pass: cast and copy off the device into a reused buffer
                out = pool.tensor(spec.shape, out_dtype(name)).copy_(t)
            else:
                out = t.to(out_dtype(name)).to("cpu").contiguous()
                if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                    # t may be a read buffer or scratch of the pool, reused once work()
                    # returns: the consumer keeps the tensor, so it gets a copy of its own.
                    out = out.clone()
        t0 = time.perf_counter()
        while not stop.is_set():
            try:
                results.put((name, out), timeout=0.1)
                return time.perf_counter() - t0
            except queue.Full:
                continue
        raise _Stopped

    error: list[BaseException] = []

    def produce() -> None:
        if not cuda:
            # Methods compute in cache-sized blocks, too small to split between cores: the
            # blocks of a tensor are shared among worker threads instead, each with one
            # intra-op thread (a setting of that thread only).
            torch.set_num_threads(1)
        try:
            _stream(jobs, dataclasses.replace(opts, prefetch_bytes=budget), "write", work, pool,
                    lookahead.borrow if lookahead is not None else None)
        except _Stopped:
            pass
        except BaseException as e:
            error.append(e)
        finally:
            workers.close()
            if lookahead is not None:
                lookahead.close()
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


def is_rowwise(root: Node, name: str) -> bool:
    """Whether every element of output tensor ``name`` depends only on the same element of
    the inputs (every node computing it says so: ``Node.rowwise_tensor``), so it can be read,
    computed and written in row pieces."""
    seen: set[tuple[int, str]] = set()

    def visit(node: Node, sub: str) -> bool:
        if (id(node), sub) in seen:
            return True
        seen.add((id(node), sub))
        return node.rowwise_tensor(sub) and all(visit(child, n)
                                                for child, n in node.input_names(sub))

    return visit(root, name)


def rowwise_names(root: Node, names: list[str]) -> set[str]:
    """Which of ``names`` are row-wise (:func:`is_rowwise`)."""
    return {n for n in names if is_rowwise(root, n)}


def _jobs(root: Node, name: str, rowwise: bool) -> list[Job]:
    """The jobs computing output tensor ``name``: one, or for a large tensor of a row-wise
    graph one per block of about ``ROW_BLOCK_ELEMENTS`` elements."""
    reads = root.reads(name)
    spec = root.spec(name)
    if not rowwise or len(spec.shape) < 1 or spec.numel <= ROW_BLOCK_ELEMENTS:
        return [Job(name, reads)]
    step = max(1, ROW_BLOCK_ELEMENTS * spec.shape[0] // spec.numel)
    return [Job(name, reads, (start, min(step, spec.shape[0] - start)))
            for start in range(0, spec.shape[0], step)]


class _Stopped(Exception):
    """The consumer of a stream went away; the producer winds down quietly."""
