"""The Ray executor against the single process on this machine, and a paper estimate of a
405B merge on N nodes. Run through ``python -m bench.merge --ray`` (writes bench/RESULTS-ray.md).

Each Ray configuration joins a cluster started beforehand (``ray start --head --num-cpus N``,
not timed: a cluster is up before users merge on it); the timed process is ``surgery apply
--ray auto``. Cold page cache before every process, as in bench.merge. Peak memory is the
driver's (wait4) and the largest Ray worker's (sampled every 50 ms with psutil).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.merge import METHODS, SIZES, Run, _digests, _gb, build_models, measure

SHARD = "500MB"


@dataclass
class RayRow:
    label: str
    run: Run
    worker_peak: int
    same_bytes: bool | None


class WorkerPeak:
    """Largest RSS of any Ray worker process while it runs."""

    def __init__(self) -> None:
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if "default_worker.py" in cmd or (p.info["name"] or "").startswith("ray::"):
                        self.peak = max(self.peak, p.info["memory_info"].rss)
                except (TypeError, AttributeError):
                    continue
            time.sleep(0.05)

    def __enter__(self) -> WorkerPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _ray(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], check=True,
                   capture_output=True, text=True, timeout=300)


def bench_ray(size: str, method: str, workers: list[int], work: Path, cache: Path,
              repeat: int = 1) -> list[RayRow]:
    dirs = build_models(SIZES[size], cache / size)
    files = sorted(p for d in dirs.values() for p in d.glob("*.safetensors"))
    step, _ = METHODS[method]
    cli = [sys.executable, "-c", "from surgery_cli.main import run; run()", "apply"]
    rows: list[RayRow] = []
    reference: dict[str, str] | None = None
    for n in [0, *workers]:
        recipe = work / "merge.yaml"  # one name: provenance records it
        recipe.write_text("inputs: " + json.dumps({k: str(v) for k, v in dirs.items()})
                          + f"\nsteps:\n  merged: {step}\n"
                          f"output: {{from: merged, path: {work / 'out'}, dtype: bfloat16, "
                          f"shard_size: {SHARD}}}\n")
        extra = [] if n == 0 else ["--ray", "auto"]
        if n:
            _ray("stop", "--force")
            _ray("start", "--head", f"--num-cpus={n}", "--disable-usage-stats",
                 "--include-dashboard=false")
        try:
            with WorkerPeak() as peak:
                run = measure([*cli, str(recipe), "--force", "--quiet", *extra], files,
                              work / f"ray-{n}.log", repeat=repeat, output=work / "out")
        finally:
            if n:
                _ray("stop", "--force")
        digest = _digests(work / "out") if run.ok else None
        digest = {k: v for k, v in (digest or {}).items() if k != "README.md"}
        if n == 0:
            reference = digest
        same = None if n == 0 or not run.ok else digest == reference
        label = "single process" if n == 0 else f"Ray, {n} worker{'s' if n > 1 else ''}"
        rows.append(RayRow(label, run, peak.peak, same))
        shutil.rmtree(work / "out", ignore_errors=True)
    return rows


def estimate(params: float = 405e9, models: int = 4, bandwidth: float = 2e9,
             nodes: tuple[int, ...] = (1, 4, 8, 16, 32, 64)) -> str:
    """Bytes each node reads and writes, and the time at ``bandwidth`` bytes/s per node, for a
    bf16 merge of ``models`` inputs (a base and fine-tunes) into one output."""
    size = params * 2
    lines = ["| nodes | read per node | written per node | time at "
             f"{bandwidth / 1e9:g} GB/s per node |", "|---|---|---|---|"]
    for n in nodes:
        read, written = models * size / n, size / n
        t = (read + written) / bandwidth
        lines.append(f"| {n} | {_gb(int(read))} | {_gb(int(written))} | "
                     f"{t / 60:.1f} min |")
    return "\n".join(lines)


def render(rows: list[RayRow], size: str, method: str, command: str, repeat: int) -> str:
    base = rows[0].run.wall_s
    out = [f"# Ray executor: {method} merge at {size}, this machine", "",
           f"`{command}`; output shards of {SHARD}, median of {repeat}, cold page cache. "
           "The Ray cluster is started before each timed run (`ray start --head "
           "--num-cpus N`) and the timed process joins it (`surgery apply --ray auto`).", "",
           "| run | wall | vs single | CPU | driver peak RSS | largest worker RSS | "
           "bytes vs single |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "–" if r.same_bytes is None else ("identical" if r.same_bytes else "DIFFER")
        out.append(f"| {r.label} | {r.run.wall_s:.1f} s | {r.run.wall_s / base:.2f}x | "
                   f"{r.run.cpu_s:.1f} s | {_gb(r.run.peak_rss)} | "
                   f"{_gb(r.worker_peak) if r.worker_peak else '–'} | {same} |")
    out += ["", "## A 405B merge on N nodes (estimate, not measured)", "",
            "Four bf16 inputs of 810 GB (a base and three fine-tunes, TIES or task "
            "arithmetic), one 810 GB output. Each node reads only the byte ranges of the "
            "shards it computes, so per-node traffic falls as 1/N while the file system "
            "delivers N times a node's bandwidth:", "", estimate(), "",
            "Not included: a method with a whole-model statistic (LiNeS norms, a global "
            "top-K threshold, greedy-soup scoring) first reads the inputs once on the driver "
            "(3.24 TB at 2 GB/s: 27 min), whatever N is; per-tensor methods (linear, task "
            "arithmetic, TIES, DARE, SLERP) need no such pass."]
    return "\n".join(out)
