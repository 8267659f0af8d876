"""The commands of ``surgery``; each parses its arguments, calls the library and prints."""

from __future__ import annotations

import click
from surgery_cli.main import handle_errors, human_bytes, human_count
from surgery_cli.progress import ProgressBar


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@handle_errors
def plan(recipe: str) -> None:
    """Validate RECIPE and print what a run would do, without reading any weights."""
    from surgery.recipe import load_recipe, plan_recipe

    report = plan_recipe(load_recipe(recipe))
    click.echo("inputs:")
    for name, source, count, size in report.inputs:
        click.echo(f"  {name}: {source} ({count} tensors, {human_bytes(size)})")
    click.echo("steps:")
    for name, op, params in report.steps:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        click.echo(f"  {name}: {op}({shown})")
    for out in report.outputs:
        click.echo(f"output {out.path} (from {out.source}): {out.tensors} tensors, "
                   f"{human_bytes(out.bytes)} in {out.shards} shard(s), dtype "
                   f"{out.dtype or 'as input'}; estimated peak memory "
                   f"{human_bytes(out.peak_bytes)}")
    if report.reduction_passes:
        click.echo(f"whole-model statistics: {report.reduction_passes} reduction(s) computed "
                   "in a streaming pass before writing")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--profile", is_flag=True, help="Report time spent reading, computing, writing.")
@handle_errors
def apply(recipe: str, force: bool, quiet: bool, profile: bool) -> None:
    """Validate and run RECIPE, writing its output model(s)."""
    from surgery.recipe import load_recipe, run_recipe

    loaded = load_recipe(recipe)
    bar = ProgressBar(enabled=not quiet)
    try:
        results = run_recipe(loaded, force=force, progress=bar, on_output=bar)
    finally:
        bar.close()
    for res in results:
        reused = f", {len(res.reused_shards)} reused from an interrupted run" \
            if res.reused_shards else ""
        click.echo(f"wrote {res.path} ({len(res.shards)} shard(s){reused})")
        if profile:
            p = res.profile
            click.echo(f"  wall {p.wall_s:.2f}s ({', '.join(p.passes)} pass(es)); compute "
                       f"thread: waiting on reads {p.read_s:.2f}s, computing "
                       f"{p.compute_s:.2f}s, waiting on the writer {p.write_wait_s:.2f}s; "
                       f"writer thread: writing and hashing {p.write_s:.2f}s; read "
                       f"{human_bytes(p.bytes_read)}, wrote {human_bytes(p.bytes_written)}")


@click.command()
@click.argument("model")
@click.option("--allow-pickle", is_flag=True, help="Load .bin pickles (weights only).")
@handle_errors
def inspect(model: str, allow_pickle: bool) -> None:
    """Print MODEL's tensor table summarised by block."""
    from surgery.checkpoint import open_checkpoint
    from surgery.summary import summarize

    s = summarize(open_checkpoint(model, allow_pickle=allow_pickle))
    click.echo(f"{s.source}: {s.architecture or 'unknown architecture'}, "
               f"{human_count(s.total_params)} parameters, {human_bytes(s.total_bytes)}")
    click.echo(f"blocks: {s.layers}" + (f" (pattern {s.layer_prefix}N.)" if s.layer_prefix
                                        else " (no block pattern found)"))
    click.echo(f"tied embeddings: {'yes' if s.tied_embeddings else 'no'}")
    click.echo(f"{'group':<12} {'tensors':>8} {'params':>10} {'bytes':>11}  dtypes / kinds")
    for g in s.groups:
        dtypes = ",".join(sorted(g.dtypes))
        kinds = ",".join(f"{k}:{human_count(v)}" for k, v in sorted(g.kinds.items()))
        click.echo(f"{g.label:<12} {g.tensors:>8} {human_count(g.params):>10} "
                   f"{human_bytes(g.bytes):>11}  {dtypes} / {kinds}")


COMMANDS = [plan, apply, inspect]
