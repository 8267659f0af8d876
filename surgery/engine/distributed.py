"""Shard-parallel saves on a Ray cluster: the same output as :func:`surgery.engine.save`, byte
for byte, with each output shard computed by a Ray task that reads only the byte ranges of its
own tensors.

The driver validates and plans (shards, metadata, provenance), trains or searches whatever the
graph needs once, and computes the whole-model reductions once (LiNeS norms, global top-K
thresholds, greedy-soup choices); it then ships the resolved graph to the cluster (one object,
small: headers and reduction results, no weights). Each task evaluates its shard's tensors with
the ordinary engine and writes the shard into ``OUT.partial/`` (a file system every node sees),
re-reads it to check its SHA-256, and returns the hash; the driver records it, so an
interrupted run resumes per shard, as a local one does. A task whose worker dies, or that
raises, is retried by Ray (``retries``); when the retries are spent the error names the shard
and the node it last ran on. The driver then writes index, config, tokenizer, provenance and
card and renames the output into place.

``address``: ``local`` starts a Ray cluster on this machine for the run (``workers`` CPUs),
``auto`` joins the running cluster, anything else is a cluster address (``ray://...`` or
``host:port``). Inputs on the Hub are fetched by each task, only the files its shard reads.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch

from surgery.checkpoint import Checkpoint
from surgery.checkpoint.hashing import file_sha256
from surgery.engine.run import (
    SaveResult,
    _InputHasher,
    failures_reported,
    finish_save,
    needed_files,
    plan_save,
    write_shards,
)
from surgery.engine.stream import (
    DEFAULT_PREFETCH_BYTES,
    ProgressEvent,
    ProgressFn,
    StreamOptions,
    resolve_reductions,
)
from surgery.errors import RunError, UsageError
from surgery.expr.node import Node
from surgery.writer import PlannedTensor

# Fault injection for tests: when this names a folder holding a file ``kill-<shard name>``, the
# task of that shard deletes the file and kills its own worker process halfway through the
# shard, as a node lost mid-shard would (tests/test_ray.py).
KILL_ONCE_ENV = "WEIGHT_SURGERY_RAY_KILL_ONCE"


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("the Ray executor needs Ray: pip install 'weight-surgery[ray]'"
                         ) from None
    return ray


def connect(address: str = "local", workers: int | None = None) -> Any:
    """Join (or start, for ``local``) a Ray cluster; returns the ``ray`` module."""
    ray = _ray()
    _register_serializers(ray)
    if ray.is_initialized():
        return ray
    env = {"env_vars": {k: v for k, v in os.environ.items()
                        if k.startswith("WEIGHT_SURGERY_") or k in ("HF_ENDPOINT", "HF_HOME")}}
    try:
        if address == "local":
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False,
                     log_to_driver=False, runtime_env=env, logging_level=logging.ERROR)
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=env,
                     logging_level=logging.ERROR)
    except ConnectionError as e:
        raise UsageError(f"--ray {address}: cannot join the cluster ({e})") from None
    return ray


def _register_serializers(ray: Any) -> None:
    # Graph nodes hold locks for their lazy state; a task gets fresh ones.
    lock_type = type(threading.Lock())
    ray.util.register_serializer(lock_type, serializer=lambda _: None,
                                 deserializer=lambda _: threading.Lock())


def _prepare(root: Node, opts: StreamOptions) -> None:
    """Everything the driver does once for all tasks: training and searches the graph needs,
    and the whole-model reductions."""
    for node in root.walk():
        trained = getattr(type(node), "checkpoint", None)
        if isinstance(trained, property):
            node.checkpoint  # noqa: B018  (trains, or finds the cached result)
    resolve_reductions(root, opts)


class _Progress:
    """A Ray actor summing the tasks' progress (bytes and tensors written) and remembering
    where each shard last started."""

    def __init__(self) -> None:
        self.bytes = 0
        self.tensors = 0
        self.nodes: dict[str, str] = {}

    def add(self, nbytes: int, tensors: int) -> None:
        self.bytes += nbytes
        self.tensors += tensors

    def started(self, shard: str, node: str) -> None:
        self.nodes[shard] = node

    def state(self) -> tuple[int, int, dict[str, str]]:
        return self.bytes, self.tensors, dict(self.nodes)


def _node_name() -> str:
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # outside Ray (never in a task)
        ip = "?"
    return f"{socket.gethostname()} ({ip})"


def _write_one(root: Node, fname: str, shard: list[PlannedTensor], folder: str,
               shard_meta: dict[str, str], dtypes: dict[str, torch.dtype], seed: int,
               device: str, threads: int | None, prefetch: int, progress: Any
               ) -> tuple[str, str, str]:
    """One Ray task: compute and write shard ``fname``; returns (name, SHA-256, node)."""
    node = _node_name()
    import ray

    ray.get(progress.started.remote(fname, node))  # delivered even if this worker dies
    # The reductions are resolved on the driver: only this shard's own tensors are read.
    for ck, files in needed_files(root, [t.name for t in shard], statistics=False).items():
        ck.fetch(files)
    opts = StreamOptions(device=torch.device(device), seed=seed, prefetch_bytes=prefetch,
                         progress=_Report(progress, _kill_once(fname), len(shard)),
                         threads=threads)
    done: list[str] = []
    write_shards(root, [(fname, shard)], Path(folder), shard_meta, dtypes, opts,
                 lambda _, sha: done.append(sha))
    on_disk = file_sha256(Path(folder) / fname)
    if on_disk != done[0]:  # a torn write on a shared file system: Ray retries the task
        raise OSError(f"{fname}: written with SHA-256 {done[0][:12]}, read back as "
                      f"{on_disk[:12]} on {node}")
    return fname, done[0], node


def _kill_once(fname: str) -> Path | None:
    """The marker that asks this shard's task to kill its worker (tests only; see
    :data:`KILL_ONCE_ENV`)."""
    folder = os.environ.get(KILL_ONCE_ENV)
    marker = Path(folder) / f"kill-{fname}" if folder else None
    return marker if marker is not None and marker.is_file() else None


class _Report:
    """A task's progress callback: sends what it wrote to the progress actor."""

    def __init__(self, actor: Any, kill: Path | None, tensors: int) -> None:
        self.actor, self.kill, self.half = actor, kill, max(1, tensors // 2)
        self.last = 0

    def __call__(self, e: ProgressEvent) -> None:
        self.actor.add.remote(e.bytes_done - self.last, 1)
        self.last = e.bytes_done
        if self.kill is not None and e.done >= self.half:
            self.kill.unlink()  # once: the retry finds no marker
            os._exit(1)


def _where(ray: Any, actor: Any, fname: str, wait_s: float = 5.0) -> str:
    """The node shard ``fname`` last started on (its task's message to the progress actor
    may trail the failure the driver sees: wait a little for it)."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = ray.get(actor.state.remote())[2]
        if fname in nodes or time.monotonic() > deadline:
            return nodes.get(fname, "an unknown node")
        time.sleep(0.05)


def save_ray(root: Node, path: str | Path, *, address: str = "local",
             workers: int | None = None, dtype: str | torch.dtype | None = None,
             shard_size: int | str = "5GB", device: str = "cpu", seed: int = 0,
             force: bool = False, progress: ProgressFn | None = None,
             recipe_text: str | None = None, tokenizer_from: Checkpoint | None = None,
             prefetch_bytes: int = DEFAULT_PREFETCH_BYTES, hash_inputs: bool = True,
             extra_sections: dict[str, str] | None = None,
             extra_provenance: dict[str, Any] | None = None, retries: int = 3,
             threads_per_task: int | None = 1, chat_template: str | None = None
             ) -> SaveResult:
    """:func:`surgery.engine.save` with one Ray task per output shard (see the module
    docstring); the output's bytes equal a single-process save of the same graph."""
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"device {device!r}: the Ray executor computes on cpu or cuda")
    started = time.perf_counter()
    plan = plan_save(root, path, dtype=dtype, shard_size=shard_size, device=device, seed=seed,
                     force=force, recipe_text=recipe_text, extra_provenance=extra_provenance)
    opts = StreamOptions(device=plan.device, seed=seed, prefetch_bytes=prefetch_bytes,
                         progress=progress)
    ray = connect(address, workers)
    hasher = _InputHasher(plan.checkpoints) if hash_inputs else None
    with failures_reported(plan, hasher):
        _prepare(root, opts)
        todo = plan.todo
        total_bytes = sum(t.nbytes for _, s in todo for t in s)
        total_tensors = sum(len(s) for _, s in todo)
        actor = ray.remote(_Progress).options(num_cpus=0).remote()
        task = ray.remote(_write_one).options(
            max_retries=retries, retry_exceptions=[OSError],
            num_cpus=threads_per_task or 1,
            num_gpus=1 if plan.device.type == "cuda" else 0)
        graph = ray.put(root)
        pending = {task.remote(graph, fname, shard, str(plan.out.partial), plan.shard_meta,
                               plan.dtypes, seed, plan.device.type, threads_per_task,
                               prefetch_bytes, actor): fname for fname, shard in todo}
        failed: list[tuple[str, str, str]] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            done_bytes, done_tensors, _ = ray.get(actor.state.remote())
            if progress is not None and total_tensors:
                progress(ProgressEvent("write", min(done_tensors, total_tensors),
                                       total_tensors, min(done_bytes, total_bytes),
                                       total_bytes, ""))
            for ref in ready:
                fname = pending.pop(ref)
                try:
                    name, sha, _ = ray.get(ref)
                except Exception as e:
                    # The other shards still finish and are recorded: the rerun redoes only
                    # the ones that failed.
                    cause = getattr(e, "cause", None) or e
                    failed.append((fname, _where(ray, actor, fname),
                                   str(cause).strip().splitlines()[-1]))
                    continue
                plan.out.record_shard(name, sha)
        if failed:
            fname, where, why = failed[0]
            more = f" (and {len(failed) - 1} other shard(s))" if len(failed) > 1 else ""
            raise RunError(f"shard {fname} failed on {where} after {retries} retries: {why}"
                           f"{more}; the {len(todo) - len(failed)} finished shard(s) stay in "
                           f"{plan.out.partial}, reused by rerunning the same command")
        if progress is not None and total_tensors:
            progress(ProgressEvent("write", total_tensors, total_tensors, total_bytes,
                                   total_bytes, ""))
        ray.kill(actor)
        final = finish_save(plan, root, recipe_text, tokenizer_from, hasher, extra_sections,
                            chat_template)
    opts.profile.wall_s = time.perf_counter() - started
    return SaveResult(final, plan.fnames, sorted(plan.reused), opts.profile, plan.provenance)
