"""``surgery eval`` and ``surgery prune``: forward-pass commands."""

from __future__ import annotations

import json
from pathlib import Path

import click
from surgery_cli.main import handle_errors
from tqdm import tqdm

METRICS = ("perplexity", "exact_match", "accuracy")


class _Bar:
    """Progress callback (examples done, total) drawn as a tqdm bar."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.desc, self.enabled = desc, enabled
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="ex", dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_json(path: str, doc: dict) -> None:
    from surgery.errors import UsageError

    try:
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"{path}: cannot write JSON ({e.strerror})") from None


@click.command("eval")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL file.")
@click.option("--metric", type=click.Choice(list(METRICS)), default="perplexity",
              show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the result.")
@click.option("--max-samples", type=click.IntRange(min=1), help="Seeded subsample size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def evaluate(model: str, data: str, metric: str, json_out: str | None, max_samples: int | None,
             seed: int, batch_size: int, device: str, quiet: bool) -> None:
    """Score MODEL on a JSONL file (perplexity, exact_match or accuracy)."""
    from surgery.evaluate import evaluate as run_eval

    bar = _Bar(metric, not quiet)
    try:
        res = run_eval(model, data, metric, batch_size=batch_size, max_samples=max_samples,
                       seed=seed, device=device, progress=bar)
    finally:
        bar.close()
    click.echo(f"{metric}: {res.value:.6g} ({res.samples} samples, {res.tokens} tokens)")
    if json_out:
        _write_json(json_out, {"model": model, "data": data, **res.to_json()})


@click.command()
@click.argument("model")
@click.option("--blocks", "n", required=True, type=click.IntRange(min=1),
              help="How many blocks to drop.")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="Calibration JSONL.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dir.")
@click.option("--method", type=click.Choice(["angular", "block_influence"]), default="angular",
              show_default=True)
@click.option("--scores", "scores_out", type=click.Path(dir_okay=False),
              help="Per-layer scores JSON (default: OUT/layer_scores.json).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Plot the scores to a PNG.")
@click.option("--max-samples", type=click.IntRange(min=1), help="Seeded subsample size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def prune(model: str, n: int, data: str, out: str, method: str, scores_out: str | None,
          plot: str | None, max_samples: int | None, seed: int, batch_size: int, device: str,
          force: bool, quiet: bool) -> None:
    """Drop N blocks of MODEL chosen on calibration text; write the model and the scores."""
    from surgery.evaluate.plot import plot_layer_scores
    from surgery.prune import prune as run_prune

    bar = _Bar("scoring blocks", not quiet)
    try:
        res = run_prune(model, n, data, out, method=method, max_samples=max_samples, seed=seed,
                        batch_size=batch_size, device=device, force=force, progress=bar)
    finally:
        bar.close()
    scores = {"model": model, "data": data, "method": method, **res.scores.to_json()}
    scores_path = scores_out or str(res.saved.path / "layer_scores.json")
    _write_json(scores_path, scores)
    click.echo(f"dropped blocks {res.dropped} by {method}; wrote {res.saved.path} "
               f"and {scores_path}")
    if plot:
        plot_layer_scores(res.scores.angular, res.scores.block_influence, n, res.dropped, plot)
        click.echo(f"plotted {plot}")
