"""``surgery corda`` (CorDA's adapter and residual) and ``surgery merge-adapter``."""

from __future__ import annotations

import click
from surgery_cli.main import handle_errors
from surgery_cli.progress import ProgressBar
from tqdm import tqdm


class CordaBar:
    """One bar for the calibration passes (examples), one for the decomposition (layers)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.stage: str | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None or stage != self.stage:
            self.close()
            unit = "ex" if stage == "calibrating" else "layer"
            self.bar = tqdm(total=total, desc=stage, unit=unit, dynamic_ncols=True)
            self.stage = stage
        self.bar.update(done - self.bar.n)
        if done == total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command()
@click.argument("model")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="Calibration JSONL (one example per forward pass, no padding).")
@click.option("--rank", required=True, type=click.IntRange(min=1), help="Adapter rank r.")
@click.option("--mode", type=click.Choice(["kpa", "ipa"]), default="kpa", show_default=True,
              help="kpa: the r smallest components (knowledge-preserved); ipa: the r largest "
              "(instruction-previewed).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output dir: OUT/adapter (PEFT LoRA) and OUT/residual (the base model).")
@click.option("--targets", help="Comma-separated module names or suffixes (q_proj,v_proj); "
              "default every linear layer of the blocks.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True),
              help="lora_alpha (default: the rank, scaling 1).")
@click.option("--max-length", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per calibration example.")
@click.option("--samples", type=click.IntRange(min=1), help="Use the first N examples.")
@click.option("--covariance", type=click.Path(dir_okay=False), help="Covariance file: read "
              "when it exists, else written (reuse it for other ranks and modes).")
@click.option("--accumulate", type=click.Choice(["float64", "float32"]), default="float64",
              show_default=True, help="Covariance sums' dtype (float32: PEFT's, bit for bit).")
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def corda(model: str, data: str, rank: int, mode: str, out: str, targets: str | None,
          alpha: float | None, max_length: int, samples: int | None, covariance: str | None,
          accumulate: str, device: str, force: bool, quiet: bool) -> None:
    """Decompose MODEL with CorDA (arXiv 2406.05223) into a LoRA adapter and its residual.

    PeftModel.from_pretrained(OUT/residual, OUT/adapter) computes MODEL; train the adapter
    with `surgery train OUT/residual --adapter OUT ...`."""
    from surgery.train.corda import CordaSettings, write_corda

    settings = CordaSettings(data=data, rank=rank, mode=mode,  # type: ignore[arg-type]
                             targets=[t.strip() for t in targets.split(",") if t.strip()]
                             if targets else None, alpha=alpha, max_length=max_length,
                             samples=samples, covariance=covariance,
                             accumulate=accumulate, device=device)  # type: ignore[arg-type]
    bar = CordaBar(not quiet)
    writing = ProgressBar(enabled=not quiet)
    try:
        res = write_corda(model, out, settings, force=force, progress=bar,
                          write_progress=writing)
    finally:
        bar.close()
        writing.close()
    r = res.result
    damps = sorted({layer.damp for layer in r.layers})
    click.echo(f"corda {r.mode}: rank {r.adapter.r} on {len(r.layers)} layers from "
               f"{r.examples} examples ({r.tokens} tokens) in {r.seconds:.1f}s; damping "
               f"{', '.join(f'{d:g}' for d in damps)}")
    click.echo(f"wrote {res.adapter} and {res.residual}")


@click.command("merge-adapter")
@click.argument("model")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dir.")
@click.option("--dtype", help="Output dtype (default: as the model).")
@click.option("--shard-size", default="5GB", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def merge_adapter(model: str, adapter: str, out: str, dtype: str | None, shard_size: str,
                  force: bool, quiet: bool) -> None:
    """Merge the PEFT LoRA ADAPTER into MODEL, W = W + (alpha/r)·B A, into a full checkpoint
    (ADAPTER may be a `surgery corda` output; MODEL is then its residual)."""
    from surgery.train.adapter import merge_adapter as merge

    weights = merge(model, adapter)
    bar = ProgressBar(enabled=not quiet)
    try:
        res = weights.save(out, dtype=dtype, shard_size=shard_size, force=force, progress=bar)
    finally:
        bar.close()
    click.echo(f"merged {len(weights.node.adapter.layers)} layers; wrote {res.path}")
