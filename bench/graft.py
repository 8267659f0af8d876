"""Grafting benchmark: the time of one mask step (forward of θ0 + γ ⊙ τ, backward to S, the
step on S) against a plain full fine-tune step (forward, backward to every weight, AdamW) of
the same model on the same batches, in one process, alternating the two.

    python -m bench.graft                        # SmolLM2-135M on the CPU, writes bench/GRAFT.md
    python -m bench.graft --device cuda          # on a GPU
    python -m bench.graft --model fixtures/tiny-llama/base --finetuned fixtures/tiny-llama/math \\
        --steps 3 --out /tmp/g.md

Without ``--finetuned`` the fine-tune is the base plus seeded noise (1% of each tensor's RMS),
written once into the cache: a mask step's time does not depend on τ's values. The data are
bench.train's arithmetic problems (prompt+completion). Step 1 of each warms up; the median of
steps 2..N is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench.train import machine_line, write_data

HERE = Path(__file__).resolve().parent


def noisy_finetune(base: Path, cache: Path, seed: int) -> Path:
    """``base`` plus seeded noise, as a model directory (made once)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = cache / f"{base.name}-noisy-{seed}"
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    for f in sorted(tmp.glob("*.safetensors")):
        tensors = load_file(f)
        gen = torch.Generator().manual_seed(seed)
        for name, t in tensors.items():
            if t.dtype.is_floating_point:
                rms = t.float().pow(2).mean().sqrt()
                noise = torch.randn(t.shape, generator=gen) * 0.01 * rms
                tensors[name] = (t.float() + noise).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
    tmp.rename(out)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from surgery.train.graft import GraftConfig, Grafter, _Grafted, task_loss_sum
    from surgery.train.loop import micro_batches
    from surgery.train.objectives import targets

    config = GraftConfig(sparsity=args.sparsity, steps=args.steps, batch_size=args.batch_size,
                         max_length=args.max_length, seed=args.seed, device=args.device)
    g = Grafter(args.model, args.finetuned, args.data, config)
    # the full fine-tune step's model: a trainable copy of the fine-tune's weights
    full = {n: p.detach().clone().requires_grad_(True) for n, p in g.model.named_parameters()}
    optimizer = torch.optim.AdamW(list(full.values()), lr=2e-5)
    plain = _Grafted(g.model, full)
    mask_s, full_s, consumed = [], [], 0
    for _ in range(args.steps):
        _sync(args.device)
        started = time.perf_counter()
        g.step()
        _sync(args.device)
        mask_s.append(time.perf_counter() - started)
        passes, consumed = micro_batches(g.data, g.train_config(), consumed, g.pad_id)
        batch = passes[0].to(g.device)
        _sync(args.device)
        started = time.perf_counter()
        loss = task_loss_sum(plain, batch, g.task) / targets(batch, g.task)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        full_s.append(time.perf_counter() - started)
    timed = slice(1, None) if args.steps > 1 else slice(None)
    return {"mask": statistics.median(mask_s[timed]), "full": statistics.median(full_s[timed]),
            "graftable": g.total, "k": g.k, "params": sum(p.numel() for p in full.values()),
            "tensors": len(g.names), "examples": len(g.data.examples)}


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    ratio = r["mask"] / r["full"]
    return "\n".join([
        "# Grafting: time per mask step", "",
        f"Machine: {machine_line(args.device)}.",
        f"Model: `{args.model}` ({r['params']:,} parameters); fine-tune `{args.finetuned}`; "
        f"{r['graftable']:,} graftable entries in {r['tensors']} block weight tensors, mask of "
        f"K = {r['k']:,} (sparsity {args.sparsity:g}); batch {args.batch_size} x "
        f"{args.max_length} tokens at most, {args.steps} steps of each (median of 2..N).",
        "", "| step | seconds |", "|---|---|",
        f"| grafting mask step (θ0 + γ ⊙ τ forward, backward to S, step on S) | "
        f"{r['mask']:.4f} s |",
        f"| plain full fine-tune step (forward, backward, AdamW) | {r['full']:.4f} s |",
        "", f"Mask step / full step: {ratio:.2f}x.", "",
        f"Command: `{' '.join(['python -m bench.graft', *args.argv])}`", ""])


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m bench.graft",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="base model directory (default SmolLM2-135M)")
    p.add_argument("--finetuned", default=None, help="fine-tune (default: base + noise)")
    p.add_argument("--data", default=None, help="JSONL (default: arithmetic problems)")
    p.add_argument("--sparsity", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="report (default bench/GRAFT.md or "
                   "bench/GRAFT-cuda.md)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "weight-surgery" /
                                          "bench-graft"))
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else []
    cache = Path(args.cache)
    if args.model is None:
        from bench.smollm2 import convert

        args.model = str(convert())
    if args.finetuned is None:
        args.finetuned = str(noisy_finetune(Path(args.model), cache, args.seed))
    if args.data is None:
        args.data = str(write_data(cache / "arithmetic.jsonl", 64, args.seed))
    out = Path(args.out or HERE / ("GRAFT-cuda.md" if args.device == "cuda" else "GRAFT.md"))
    out.write_text(report(args, measure(args)))
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
