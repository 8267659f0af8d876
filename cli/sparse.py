"""``surgery sparse``: extract, apply and inspect sparse deltas (files, not model directories)."""

from __future__ import annotations

import sys

import click
from surgery_cli.main import handle_errors, human_bytes, human_count


@click.group()
def sparse() -> None:
    """Sparse deltas of fine-tunes (Composable Sparse Fine-Tuning, arXiv 2110.07560)."""


@sparse.command()
@click.argument("base")
@click.argument("model")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--density", type=float, default=0.01, show_default=True,
              help="Fraction of the maskable parameters to keep.")
@click.option("--k", "k", type=int, default=None, help="Keep exactly K entries instead.")
@click.option("--per-tensor", is_flag=True, help="Select within each tensor, not globally.")
@click.option("--maskable", default="attention,mlp,bias,other,embedding", show_default=True,
              help="Tensor kinds that take part in the selection.")
@handle_errors
def extract(base: str, model: str, out: str, density: float, k: int | None, per_tensor: bool,
            maskable: str) -> None:
    """Extract the top-K entries of MODEL − BASE into the sparse delta file OUT."""
    from surgery import extract_sparse_delta, load

    delta = extract_sparse_delta(load(base), load(model), density, k=k, per_tensor=per_tensor,
                                 maskable=[m.strip() for m in maskable.split(",") if m.strip()])
    path = delta.save(out)
    click.echo(f"wrote {path}: {human_count(delta.k)} entries in {len(delta.shapes)} tensors, "
               f"{human_bytes(path.stat().st_size)}")


@sparse.command(name="apply")
@click.argument("base")
@click.argument("deltas", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, help="Output model directory.")
@click.option("--revert", is_flag=True, help="Subtract the deltas instead of adding them.")
@click.option("--dtype", default=None, help="Output dtype (default: as BASE).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--ignore-base-hash", is_flag=True,
              help="Apply deltas that record another base's hash.")
@handle_errors
def apply_(base: str, deltas: tuple[str, ...], out: str, revert: bool, dtype: str | None,
           force: bool, ignore_base_hash: bool) -> None:
    """Write BASE plus (or, with --revert, minus) the sum of DELTAS as a model directory."""
    from surgery import apply_sparse_deltas, load, revert_sparse_deltas
    from surgery.methods.sparse import SparseDeltaFile

    files = [SparseDeltaFile(d) for d in deltas]
    if revert:
        model = revert_sparse_deltas(load(base), files)
    else:
        model = apply_sparse_deltas(load(base), files, ignore_base_hash=ignore_base_hash)
    res = model.save(out, dtype=dtype, force=force)
    click.echo(f"wrote {res.path} ({len(res.shards)} shard(s))")


@sparse.command()
@click.argument("delta", type=click.Path(dir_okay=False))
@click.argument("other", required=False, type=click.Path(dir_okay=False))
@handle_errors
def stats(delta: str, other: str | None) -> None:
    """Entries of DELTA per layer; with OTHER, the overlap of their masks (Jaccard per layer)."""
    from surgery import load_sparse_delta, overlap_by_layer

    a = load_sparse_delta(delta)
    click.echo(f"{delta}: base {a.base_model}, K = {a.k} ({a.selection})")
    if other is None:
        for g in overlap_by_layer(a.mask(), a.mask()):
            click.echo(f"{g.group:<12} {g.a:>10}")
        return
    b = load_sparse_delta(other)
    click.echo(f"{other}: base {b.base_model}, K = {b.k} ({b.selection})")
    click.echo(f"{'group':<12} {'A':>10} {'B':>10} {'A and B':>10} {'jaccard':>8}")
    for g in overlap_by_layer(a.mask(), b.mask()):
        click.echo(f"{g.group:<12} {g.a:>10} {g.b:>10} {g.both:>10} {g.jaccard:>8.4f}")


@sparse.command()
@click.argument("base")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL file.")
@click.option("--density", type=float, default=0.01, show_default=True,
              help="Fraction of the maskable parameters the delta keeps, in (0, 1].")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Sparse delta file to write (.safetensors).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimiser updates of each phase.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True),
              help="Passes over the data in each phase (instead of --steps).")
@click.option("--phase1", help="An existing fine-tune of BASE to select from (skips phase 1).")
@click.option("--l1", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Strength of the L1 pull toward BASE in phase 2.")
@click.option("--lr", type=float, default=2e-5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--maskable", default="attention,mlp,bias,other,embedding", show_default=True,
              help="Tensor kinds the mask may take entries from.")
@click.option("--checkpoint-every", type=click.IntRange(min=1),
              help="Updates between resumable checkpoints.")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other finetune parameter (weight_decay=0.01, schedule=linear, ...).")
@click.option("--force", is_flag=True, help="Replace an existing delta file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def train(base: str, data: str, density: float, out: str, steps: int | None,
          epochs: float | None, phase1: str | None, l1: float, lr: float, batch_size: int,
          max_length: int, seed: int, device: str, maskable: str, checkpoint_every: int | None,
          extra: tuple[str, ...], force: bool, quiet: bool) -> None:
    """LT-SFT of BASE on DATA into the sparse delta file OUT (arXiv 2110.07560).

    Phase 1 fine-tunes every parameter (or takes --phase1), the DENSITY share of maskable
    entries that changed most is kept, and phase 2 retrains only those from BASE. Both
    phases are cached; a rerun reuses them, and with --checkpoint-every an interrupted
    phase resumes."""
    import yaml
    from surgery_cli.train import TrainBar
    from tqdm import tqdm

    from surgery.errors import UsageError
    from surgery.train.lt_sft import lt_sft

    settings: dict = {"lr": lr, "batch_size": batch_size, "max_length": max_length,
                      "seed": seed, "device": device}
    given = {"steps": steps, "epochs": epochs, "checkpoint_every": checkpoint_every}
    settings.update({k: v for k, v in given.items() if v is not None})
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        settings[key.strip()] = yaml.safe_load(value)
    if steps is None and epochs is None and "steps" not in settings and \
            "epochs" not in settings:
        raise UsageError("give --steps or --epochs")
    bar = TrainBar(not quiet)

    def on_phase(line: str) -> None:
        bar.close()
        if not quiet:
            tqdm.write(line, file=sys.stderr)

    try:
        res = lt_sft(base, data, out=out, density=density, phase1=phase1, l1=l1,
                     maskable=[m.strip() for m in maskable.split(",") if m.strip()],
                     progress=bar, on_phase=on_phase, force=force, **settings)
    finally:
        bar.close()
    assert res.path is not None
    tensors = sum(1 for i in res.delta.indices.values() if i.numel())
    click.echo(f"wrote {res.path}: {human_count(res.k)} entries in {tensors} tensors, "
               f"{human_bytes(res.path.stat().st_size)}")
    for name, history in (("phase 1", res.history1), ("phase 2", res.history2)):
        if history:
            click.echo(f"{name}: {len(history)} updates, loss {history[0]['loss']:.4f} -> "
                       f"{history[-1]['loss']:.4f}")
