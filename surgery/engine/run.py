"""Evaluating a graph into an output directory: plan, stream, shard, record provenance."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from surgery.checkpoint import Checkpoint, directio
from surgery.checkpoint.hashing import Cancelled, cached_sha256
from surgery.engine.stream import (
    DEFAULT_PREFETCH_BYTES,
    READ_AHEAD,
    ROW_BLOCK_ELEMENTS,
    SHARED_AHEAD_BYTES,
    Profile,
    ProgressFn,
    StreamOptions,
    default_threads,
    resolve_device,
    rowwise_names,
    shared_read_bytes,
    stream_tensors,
)
from surgery.errors import RunError, UsageError
from surgery.expr.node import PIECE_ELEMENTS, Node, statistic_requests
from surgery.writer import (
    OutputDir,
    PlannedTensor,
    ShardWriter,
    parse_size,
    plan_shards,
    render_card,
    shard_names,
    write_index,
)

DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return DTYPE_ALIASES[value.lower()]
    except KeyError:
        raise UsageError(
            f"dtype {value!r} is not one of {', '.join(sorted(DTYPE_ALIASES))}"
        ) from None


def version_of(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


@dataclass
class SaveResult:
    path: Path
    shards: list[str]
    reused_shards: list[str]
    profile: Profile
    provenance: dict[str, Any]


def plan_output(root: Node, dtype: torch.dtype | None, shard_size: int
                ) -> list[list[PlannedTensor]]:
    """The output tensors, with their final dtypes, split into shards."""
    planned = []
    for name in root.names():
        spec = root.spec(name)
        out = dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype
        planned.append(PlannedTensor(name, spec.shape, out))
    return plan_shards(planned, shard_size)


def _input_record(ck: Checkpoint) -> dict[str, Any]:
    files = [{"name": h.path.name, "header_sha256": hashlib.sha256(h.header_bytes).hexdigest()}
             for h in ck.headers] or [{"name": f.name, "header_sha256": ""}
                                      for f in sorted({t.file for t in ck.tensors.values()})]
    return {"source": ck.source, "revision": ck.revision, "files": files}


def provenance_record(root: Node, seed: int, dtype: torch.dtype | None,
                      recipe_text: str | None, device: torch.device) -> dict[str, Any]:
    """What made this output, without absolute machine state (no times, no host names), so
    that the record, and therefore the shards, are the same on every rerun. The kind of
    device computed on is recorded: a GPU may round a fused multiply-add once where the CPU
    rounds twice, so its float32 results can differ from the CPU's in the last bit."""
    return {
        "toolkit": {"name": "weight-surgery", "version": version_of("weight-surgery")},
        "versions": {p: version_of(p) for p in ("torch", "safetensors", "transformers")},
        "seed": seed,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch.") if dtype else None,
        "inputs": [_input_record(ck) for ck in dict.fromkeys(root.checkpoints())],
        "operations": [n.op for n in root.walk()],
        "expression": root.describe(),
        "recipe_sha256": hashlib.sha256(recipe_text.encode()).hexdigest() if recipe_text else None,
    }


class _InputHasher:
    """Hashes every input file on a thread while the merge runs (cached across runs)."""

    def __init__(self, checkpoints: list[Checkpoint]) -> None:
        self.digests: dict[Path, str] = {p: d for ck in checkpoints
                                         for p, d in ck.known_sha256().items()}
        # Remote files the graph does not read are never downloaded, so never hashed here.
        self.files = sorted({f for ck in checkpoints for f in ck.files
                             if f not in self.digests and f.is_file()})
        self.error: OSError | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="surgery-hash", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for f in self.files:
                self.digests[f] = cached_sha256(f, cancelled=self.stop.is_set)
        except Cancelled:
            pass
        except OSError as e:
            self.error = e

    def close(self) -> None:
        """Stops hashing (within one chunk) and waits for the thread: a run that fails must
        not leave it running into the interpreter's exit, where a thread still hashing when
        the process ends can abort it."""
        self.stop.set()
        self.thread.join()

    def fill(self, provenance: dict[str, Any], checkpoints: list[Checkpoint]) -> None:
        self.thread.join()
        for item, ck in zip(provenance["inputs"], dict.fromkeys(checkpoints), strict=True):
            for rec, path in zip(item["files"], ck.files, strict=False):
                if path in self.digests:
                    rec["sha256"] = self.digests[path]


def needed_files(root: Node, names: list[str] | None = None, statistics: bool = True
                 ) -> dict[Checkpoint, list[Path]]:
    """The weight files of each input that evaluating ``names`` of ``root`` (default: all)
    reads, and with ``statistics`` the files its statistics passes read."""
    files: dict[Checkpoint, set[Path]] = {}

    def add(node: Node, name: str) -> None:
        for ck, n in node.reads(name):
            files.setdefault(ck, set()).add(ck.info(n).file)

    for name in root.names() if names is None else names:
        add(root, name)
    for node in root.walk() if statistics else ():
        for r in node.reductions():
            for name in r.names():
                for inp in r.inputs:
                    add(inp, name)
    return {ck: sorted(fs) for ck, fs in files.items()}


def download_bytes(root: Node) -> int:
    """Bytes of remote weight files a run of ``root`` will download (not already cached)."""
    return sum(ck.known_size(f) for ck, fs in needed_files(root).items() for f in ck.missing(fs))


def _shard_metadata(provenance: dict[str, Any]) -> dict[str, str]:
    return {"format": "pt",
            "weight_surgery": json.dumps({k: provenance[k] for k in (
                "toolkit", "seed", "dtype", "inputs", "recipe_sha256")}, sort_keys=True)}


def _fingerprint(shards: list[list[PlannedTensor]], shard_meta: dict[str, str],
                 provenance: dict[str, Any]) -> str:
    plan_doc = [[(t.name, t.shape, str(t.dtype)) for t in s] for s in shards]
    return hashlib.sha256(json.dumps(
        [plan_doc, shard_meta, provenance["expression"], provenance["device"]], sort_keys=True,
        default=str
    ).encode()).hexdigest()


def output_fingerprint(root: Node, *, dtype: str | torch.dtype | None = None,
                       shard_size: int | str = "5GB", device: str | torch.device | None = "auto",
                       seed: int = 0, recipe_text: str | None = None) -> str:
    """The fingerprint :func:`save` gives ``OUT.partial`` for these arguments: a producer that
    works in ``OUT.partial`` before saving (the fine-tune step keeps its training state there)
    starts the directory with it, so that the save keeps what it left."""
    out_dtype = parse_dtype(dtype)
    shards = plan_output(root, out_dtype, parse_size(shard_size))
    provenance = provenance_record(root, seed, out_dtype, recipe_text, resolve_device(device))
    return _fingerprint(shards, _shard_metadata(provenance), provenance)


@dataclass
class PlannedOutput:
    """What :func:`save` (or a distributed executor) decides before writing: the output
    directory, shards, their metadata and provenance, and the shards a resumed run keeps."""

    path: Path
    out: OutputDir
    shards: list[list[PlannedTensor]]
    fnames: list[str]
    out_dtype: torch.dtype | None
    device: torch.device
    provenance: dict[str, Any]
    shard_meta: dict[str, str]
    reused: dict[str, str]
    checkpoints: list[Checkpoint]

    @property
    def todo(self) -> list[tuple[str, list[PlannedTensor]]]:
        return [(f, s) for f, s in zip(self.fnames, self.shards, strict=True)
                if f not in self.reused]

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {t.name: t.dtype for s in self.shards for t in s}


def plan_save(root: Node, path: str | Path, *, dtype: str | torch.dtype | None = None,
              shard_size: int | str = "5GB", device: str | torch.device | None = "auto",
              seed: int = 0, force: bool = False, recipe_text: str | None = None,
              extra_provenance: dict[str, Any] | None = None) -> PlannedOutput:
    """Plan the output and start ``OUT.partial`` (keeping the verified shards of a matching
    interrupted run)."""
    out_dtype = parse_dtype(dtype)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as e:
        raise UsageError(f"shard_size: {e}") from None
    dev = resolve_device(device)
    checkpoints = list(dict.fromkeys(root.checkpoints()))
    out = OutputDir(Path(path), force=force, inputs=[ck.root for ck in checkpoints])
    shards = plan_output(root, out_dtype, shard_bytes)
    fnames = shard_names(len(shards))
    provenance = provenance_record(root, seed, out_dtype, recipe_text, dev)
    shard_meta = _shard_metadata(provenance)
    fingerprint = _fingerprint(shards, shard_meta, provenance)
    if extra_provenance:
        provenance.update(extra_provenance)
    reused = out.start(fingerprint)
    return PlannedOutput(Path(path), out, shards, fnames, out_dtype, dev, provenance,
                         shard_meta, reused, checkpoints)


def write_shards(root: Node, todo: list[tuple[str, list[PlannedTensor]]], folder: Path,
                 shard_meta: dict[str, str], dtypes: dict[str, torch.dtype],
                 opts: StreamOptions, on_shard: Any = None) -> None:
    """Compute and write the shards ``todo`` into ``folder``, calling ``on_shard(name,
    sha256)`` as each is complete (an unfinished shard is deleted)."""
    names = [t.name for _, shard in todo for t in shard]
    stream = stream_tensors(root, names, opts, dtypes.__getitem__, reuse_outputs=True)
    try:
        for fname, shard in todo:
            writer = ShardWriter(folder / fname, shard, shard_meta)
            try:
                for _ in shard:
                    complete = False
                    while not complete:  # the whole tensor, or its blocks of rows in order
                        name, tensor = next(stream)
                        t0 = time.perf_counter()
                        complete = writer.add(name, tensor)
                        opts.profile.write_s += time.perf_counter() - t0
                        opts.profile.bytes_written += tensor.numel() * tensor.element_size()
                t0 = time.perf_counter()
                sha = writer.finish()
                if on_shard is not None:
                    on_shard(fname, sha)
                opts.profile.write_s += time.perf_counter() - t0
            except BaseException:
                writer.abort()
                raise
    finally:
        stream.close()


def finish_save(plan: PlannedOutput, root: Node, recipe_text: str | None,
                tokenizer_from: Checkpoint | None, hasher: _InputHasher | None,
                extra_sections: dict[str, str] | None, chat_template: str | None = None
                ) -> Path:
    """Index, config, tokenizer (with ``chat_template``, when given, as its
    chat_template.jinja), provenance and card; then rename ``OUT.partial`` into place."""
    out, provenance, checkpoints = plan.out, plan.provenance, plan.checkpoints
    _write_side_files(out, root, plan.shards, plan.fnames, plan.out_dtype, recipe_text,
                      output_tokenizer(root, checkpoints, tokenizer_from), chat_template)
    if hasher:
        hasher.fill(provenance, checkpoints)
    for key, records in _node_records(root).items():
        provenance[key] = records[0] if len(records) == 1 else records
    sections = {k: v for n in root.walk() for k, v in n.card_sections().items()}
    sections.update(extra_sections or {})
    if sections:
        provenance["sections"] = sections
    out.write_text("provenance.json", json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    refs = {n.op: n.reference for n in root.walk() if n.reference}
    out.write_text("README.md", render_card(provenance, root.config(), recipe_text, refs,
                                            plan.path.name))
    return out.commit()


def output_tokenizer(root: Node, checkpoints: list[Checkpoint],
                     tokenizer_from: Checkpoint | None) -> list[Path]:
    """The tokenizer files an output gets: ``tokenizer_from``'s when given, else the
    vocabulary a node of the graph made (an aligned vocabulary), else the first input's that
    has any."""
    if tokenizer_from is not None:
        return list(tokenizer_from.tokenizer_files)
    return graph_tokenizer(root) or next(
        (list(c.tokenizer_files) for c in checkpoints if c.tokenizer_files), [])


def graph_tokenizer(root: Node) -> list[Path]:
    """The tokenizer files a node of the graph made (an aligned vocabulary); empty: none."""
    for node in root.walk():
        files = node.tokenizer_files()
        if files:
            return files
    return []


@contextmanager
def failures_reported(plan: PlannedOutput, hasher: _InputHasher | None) -> Iterator[None]:
    """A full disk or memory failure while writing becomes a one-line RunError; the input
    hasher stops either way."""
    try:
        yield
    except (OSError, MemoryError, RuntimeError) as e:
        error = run_failed(e, plan.out.partial)
        if error is None:
            raise
        raise error from e
    finally:
        if hasher:
            hasher.close()


def run_failed(e: BaseException, partial: Path) -> RunError | None:
    """The RunError a failed write becomes (disk, memory), or None to re-raise ``e``."""
    if isinstance(e, OSError):
        return RunError(
            f"{e.filename or partial}: run failed ({e.strerror}); nothing was replaced, "
            f"the partial output in {partial} is resumed by rerunning the same command")
    if isinstance(e, MemoryError | RuntimeError) and _out_of_memory(e):
        why = str(e).strip().splitlines()[0] if str(e).strip() else "allocation failed"
        return RunError(
            f"out of memory during the run ({why}); "
            f"nothing was replaced; free memory or lower prefetch_bytes, then rerun the same "
            f"command to resume from {partial}")
    return None


def save(root: Node, path: str | Path, *, dtype: str | torch.dtype | None = None,
         shard_size: int | str = "5GB", device: str | torch.device | None = "auto",
         seed: int = 0, force: bool = False, progress: ProgressFn | None = None,
         recipe_text: str | None = None, tokenizer_from: Checkpoint | None = None,
         prefetch_bytes: int = DEFAULT_PREFETCH_BYTES, hash_inputs: bool = True,
         extra_sections: dict[str, str] | None = None,
         extra_provenance: dict[str, Any] | None = None,
         threads: int | None = None, chat_template: str | None = None) -> SaveResult:
    """Evaluate ``root`` tensor by tensor into the model directory ``path``. On the CPU the
    blocks of each tensor are computed by ``threads`` threads (default: one per core); the
    output does not depend on how many."""
    started = time.perf_counter()
    plan = plan_save(root, path, dtype=dtype, shard_size=shard_size, device=device, seed=seed,
                     force=force, recipe_text=recipe_text, extra_provenance=extra_provenance)
    for ck, files in needed_files(root).items():
        ck.fetch(files)
    hasher = _InputHasher(plan.checkpoints) if hash_inputs else None
    opts = StreamOptions(device=plan.device, seed=seed, prefetch_bytes=prefetch_bytes,
                         progress=progress, threads=threads)
    with failures_reported(plan, hasher):
        write_shards(root, plan.todo, plan.out.partial, plan.shard_meta, plan.dtypes, opts,
                     plan.out.record_shard)
        final = finish_save(plan, root, recipe_text, tokenizer_from, hasher, extra_sections,
                            chat_template)
    opts.profile.wall_s = time.perf_counter() - started
    return SaveResult(final, plan.fnames, sorted(plan.reused), opts.profile, plan.provenance)


def _node_records(root: Node) -> dict[str, list[Any]]:
    records: dict[str, list[Any]] = {}
    for node in root.walk():
        for key, value in node.provenance_records().items():
            records.setdefault(key, []).append(value)
    return records


def _out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, or torch's allocator failing (CPU or CUDA)."""
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text \
        or "out of memory" in text.lower()


def _write_side_files(out: OutputDir, root: Node, shards: list[list[PlannedTensor]],
                      fnames: list[str], dtype: torch.dtype | None, recipe_text: str | None,
                      tokenizer_files: list[Path], chat_template: str | None = None
                      ) -> None:
    if len(shards) > 1:
        write_index(out.path("model.safetensors.index.json"), zip(fnames, shards, strict=True))
    config = root.config()
    if config:
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = name
            if "torch_dtype" not in config and "dtype" not in config:
                config["dtype"] = name
        out.write_text("config.json", json.dumps(config, indent=2) + "\n")
    for f in tokenizer_files:
        out.copy_in(f)
    if chat_template is not None:
        # transformers reads chat_template.jinja before tokenizer_config.json's key
        out.write_text("chat_template.jinja", chat_template)
    if recipe_text is not None:
        out.write_text("recipe.yaml", recipe_text)


RUNTIME_BASE_BYTES = 256 * 1024 * 1024  # the interpreter with torch imported (measured 232 MB)


def estimate_peak_bytes(root: Node, dtype: torch.dtype | None = None,
                        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES) -> int:
    """Upper estimate of peak resident memory of a CPU run: the runtime, reads in flight (the
    prefetch budget, or one job if larger), the pool of reused buffers (as large as the budget),
    for the worst job its reads, one float32 value per graph node and two queued outputs, and
    the shard writer's staging buffers. A job is a whole tensor, or a row piece of about
    ``ROW_BLOCK_ELEMENTS`` elements when the graph is row-wise."""
    nodes = [n for n in root.walk() if n.inputs]
    by_rows = rowwise_names(root, root.names())
    worst_job = worst_read = 0
    for name in root.names():
        spec = root.spec(name)
        share = (ROW_BLOCK_ELEMENTS / spec.numel
                 if name in by_rows and spec.numel > ROW_BLOCK_ELEMENTS else 1.0)
        read = int(share * sum(ck.info(n).nbytes for ck, n in root.reads(name)))
        numel = int(share * spec.numel)
        out_size = numel * (dtype.itemsize if dtype and spec.dtype.is_floating_point
                            else spec.dtype.itemsize)
        worst_read = max(worst_read, read)
        worst_job = max(worst_job, read + len(nodes) * numel * 4 + 2 * out_size)
    in_flight = max(prefetch_bytes, worst_read)
    staging = 2 * directio.STAGE_BYTES  # the shard writer's two staging buffers
    return (RUNTIME_BASE_BYTES + in_flight + prefetch_bytes + worst_job + staging
            + _statistics_bytes(root, by_rows))


def _statistics_bytes(root: Node, by_rows: set[str]) -> int:
    """Whole-tensor statistics (see ``ElementwiseNode``): what computing the largest holds,
    and on each of the threads computing them (twice the compute threads, a tensor ahead,
    in a row-wise graph), a piece of every input it reads, as stored and as float32, and
    the comparison masks of a scan."""
    worst = pieces = 0
    shared: list[int] = []
    for name in root.names():
        requests = statistic_requests(root, name)
        if not requests:
            continue
        worst = max(worst, sum(node.statistic_bytes(sub) for node, sub in requests))
        inputs = len(root.reads(name))
        pieces = max(pieces, inputs * PIECE_ELEMENTS * (8 + 4) + 2 * PIECE_ELEMENTS)
        if name in by_rows:
            shared.append(shared_read_bytes(root.reads(name)))
    # Tensors read whole for their statistics and blocks (see stream.Lookahead), in the
    # order they are computed: the one being computed and the next one's statistics, whatever
    # their size, and the READ_AHEAD after those within SHARED_AHEAD_BYTES.
    held = max((sum(shared[i:i + 2])
                + min(SHARED_AHEAD_BYTES, sum(shared[i + 2:i + 2 + READ_AHEAD]))
                for i in range(len(shared))), default=0)
    return worst + (2 * default_threads() if by_rows else 1) * pieces + held
