"""The commands of ``surgery``; each parses its arguments, calls the library and prints."""

from __future__ import annotations

from pathlib import Path

import click
from surgery_cli.corda import corda, merge_adapter
from surgery_cli.drift import drift_prior
from surgery_cli.evaluation import evaluate, prune
from surgery_cli.graft import GraftBar, graft
from surgery_cli.lora import extract_lora
from surgery_cli.main import handle_errors, human_bytes, human_count
from surgery_cli.mergekit import convert, load_for_apply, load_for_plan, mergekit_options
from surgery_cli.progress import ProgressBar
from surgery_cli.sparse import sparse
from surgery_cli.train import TrainBar, distill_data, train


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@handle_errors
def plan(recipe: str) -> None:
    """Validate RECIPE and print what a run would do, without reading any weights. RECIPE may
    be a mergekit config (planned as if written to ./merged)."""
    from surgery.recipe import plan_recipe

    report = plan_recipe(load_for_plan(recipe))
    click.echo("inputs:")
    for name, source, count, size in report.inputs:
        pin = f", pinned to {report.pins[name]}" if name in report.pins else ""
        click.echo(f"  {name}: {source} ({count} tensors, {human_bytes(size)}{pin})")
    click.echo("steps:")
    for name, op, params in report.steps:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        click.echo(f"  {name}: {op}({shown})")
    for out in report.outputs:
        click.echo(f"output {out.path} (from {out.source}): {out.tensors} tensors, "
                   f"{human_bytes(out.bytes)} in {out.shards} shard(s), dtype "
                   f"{out.dtype or 'as input'}; estimated peak memory "
                   f"{human_bytes(out.peak_bytes)}")
        if report.pins:
            click.echo(f"  downloads {human_bytes(out.download_bytes)} of weights from the Hub "
                       "(files already in the cache are not counted)")
        if out.push_to:
            click.echo(f"  then pushes to {out.push_to}")
    for name, t in report.training:
        data = (f"{t.examples} examples ({t.truncated} truncated), about "
                f"{t.tokens_per_step:,.0f} tokens per update" if t.tokens_per_step is not None
                else "data made by an earlier step")
        click.echo(f"{t.kind} {name}: {data}, {t.trainable}; estimated peak memory "
                   f"{human_bytes(t.memory_bytes)} ({t.memory_parts})")
    if report.reduction_passes:
        click.echo(f"whole-model statistics: {report.reduction_passes} reduction(s) computed "
                   "in a streaming pass before writing")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_path", required=False)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--profile", is_flag=True, help="Report time spent reading, computing, writing.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the greedy-soup trajectory "
              "(each candidate soup's score, kept or rejected) into this PNG.")
@click.option("--ray", "ray", metavar="ADDRESS", help="Write each output shard in a Ray task: "
              "auto (the running cluster), local (start one here) or a cluster address.")
@click.option("--ray-workers", type=click.IntRange(min=1),
              help="CPUs of the cluster --ray local starts (default: all).")
@mergekit_options
@handle_errors
def apply(recipe: str, out_path: str | None, force: bool, quiet: bool, profile: bool,
          plot: str | None, ray: str | None, ray_workers: int | None,
          **mergekit_flags: bool | str | None) -> None:
    """Validate and run RECIPE, writing its output model(s). RECIPE may be a mergekit config
    (with merge_method), run as mergekit-yaml would: surgery apply CONFIG OUT_PATH."""
    from surgery.errors import UsageError
    from surgery.recipe import greedy_soup_steps, run_recipe

    loaded = load_for_apply(recipe, out_path, mergekit_flags)
    soups = greedy_soup_steps(loaded) if plot else []
    if plot and not soups:
        raise UsageError(f"--plot draws a greedy-soup trajectory, but no output of {recipe} "
                         "comes from a greedy_soup step")
    bar = ProgressBar(enabled=not quiet)
    training = TrainBar(enabled=not quiet)
    grafting = GraftBar(enabled=not quiet)
    try:
        results = run_recipe(loaded, force=force, progress=bar, on_output=bar,
                             on_push=lambda p: click.echo(f"pushed {len(p.files)} files to "
                                                          f"{p.repo_id}@{p.revision}: {p.url}"),
                             on_train=training, on_graft=grafting, ray=ray,
                             ray_workers=ray_workers)
    finally:
        training.close()
        grafting.close()
        bar.close()
    for res in results:
        reused = f", {len(res.reused_shards)} reused from an interrupted run" \
            if res.reused_shards else ""
        click.echo(f"wrote {res.path} ({len(res.shards)} shard(s){reused})")
        if profile:
            p = res.profile
            stats = (f", on whole-tensor statistics {p.statistics_wait_s:.2f}s; statistics "
                     f"thread: computing {p.statistics_s:.2f}s" if p.statistics_s else "")
            click.echo(f"  wall {p.wall_s:.2f}s ({', '.join(p.passes)} pass(es)); compute "
                       f"thread: waiting on reads {p.read_s:.2f}s, computing "
                       f"{p.compute_s:.2f}s, waiting on the writer {p.write_wait_s:.2f}s{stats}; "
                       f"writer thread: writing and hashing {p.write_s:.2f}s; read "
                       f"{human_bytes(p.bytes_read)}, wrote {human_bytes(p.bytes_written)}")
    if plot:
        from surgery.evaluate.plot import plot_greedy_soup

        for soup in soups:
            # One soup gets the given file; several get FILE-<step>.png each.
            path = Path(plot) if len(soups) == 1 else \
                Path(plot).with_name(f"{Path(plot).stem}-{soup.name}{Path(plot).suffix}")
            click.echo(f"plot: {plot_greedy_soup(soup.node.result, soup.metric, path)}")


@click.command()
@click.argument("model")
@click.option("--allow-pickle", is_flag=True, help="Load .bin pickles (weights only).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw parameters per block "
              "and kind into this PNG.")
@handle_errors
def inspect(model: str, allow_pickle: bool, plot: str | None) -> None:
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
    if plot:
        from surgery.analysis.plots import plot_summary

        click.echo(f"plot: {plot_summary(s, plot)}")


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", help="Branch to commit to (created if needed; default main).")
@handle_errors
def push(folder: str, repo: str, private: bool, revision: str | None) -> None:
    """Upload the finished output FOLDER to the Hub repository REPO (org/name) in one commit.

    The token comes from HF_TOKEN or `hf auth login`."""
    from surgery.hub import push_folder

    res = push_folder(folder, repo, private=private, revision=revision)
    click.echo(f"pushed {len(res.files)} files to {res.repo_id}@{res.revision} "
               f"(commit {res.commit}): {res.url}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--base", help="Base model: compare the task vectors A-BASE and B-BASE.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw the figures to a PNG.")
@handle_errors
def diff(a: str, b: str, base: str | None, plot: str | None) -> None:
    """Per-block differences between models A and B, read one tensor at a time."""
    from surgery.analysis import diff_checkpoints
    from surgery.checkpoint import open_checkpoint

    report = diff_checkpoints(open_checkpoint(a), open_checkpoint(b),
                              open_checkpoint(base) if base else None)
    head = f"{'group':<12} {'|A-B|':>11} {'|A-B|/|A|':>10} {'changed':>8}"
    if base:
        head += f" {'cos(tA,tB)':>10} {'sign agree':>10}"
    click.echo(head)
    for g in [*report.groups, report.total]:
        line = (f"{g.label:<12} {g.diff_norm:>11.4g} {g.relative_diff:>10.3%} "
                f"{g.changed_fraction:>8.1%}")
        if base:
            line += f" {_fmt(g.cosine, '>10.4f')} {_fmt(g.sign_agreement, '>10.1%')}"
        click.echo(line)
    if report.skipped:
        click.echo(f"not compared (integer or bool buffers): {len(report.skipped)} tensor(s)")
    if plot:
        from surgery.analysis.plots import plot_diff

        click.echo(f"plot: {plot_diff(report, plot)}")




@click.command()
@click.argument("name", required=False)
@handle_errors
def methods(name: str | None) -> None:
    """List every operation a recipe can name, with its parameters (or only NAME's)."""
    from surgery.errors import UsageError
    from surgery.methods.registry import describe_params
    from surgery.recipe.build import OPERATIONS

    if name is not None and name not in OPERATIONS:
        raise UsageError(f"unknown operation {name!r}; one of {', '.join(OPERATIONS)}")
    for op in OPERATIONS.values():
        if name is not None and op.name != name:
            continue
        click.echo(f"{op.name}: {op.summary}" + (f" [{op.reference}]" if op.reference else ""))
        for p in describe_params(op):
            default = "required" if p.default is None else f"default {p.default}"
            about = f" - {p.description}" if p.description else ""
            click.echo(f"    {p.name}: {p.type}, {default}{about}")


COMMANDS = [plan, apply, inspect, methods, evaluate, prune, sparse, push, diff, train,
            distill_data, drift_prior, extract_lora, graft, convert]
COMMANDS += [corda, merge_adapter]
