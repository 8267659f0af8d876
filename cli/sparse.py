"""``surgery sparse``: extract, apply and inspect sparse deltas (files, not model directories)."""

from __future__ import annotations

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
