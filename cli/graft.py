"""``surgery graft``: localize a fine-tune's skill in a sparse mask (arXiv 2302.06600)."""

from __future__ import annotations

from typing import Any

import click
from surgery_cli.main import handle_errors, human_count
from tqdm import tqdm


class GraftBar:
    """Progress of the mask steps: the relaxed loss, and the best rounded mask so far."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def __call__(self, e: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=e.steps, desc="grafting", unit="step", dynamic_ncols=True)
        self.bar.update(e.step - self.bar.n)
        best = f", best mask at step {e.best_step}" if e.best_step is not None else ""
        self.bar.set_postfix_str(f"loss {e.loss:.4f}, {e.seconds:.3f} s/step{best}")
        if e.step == e.steps:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="JSONL the mask is optimised on (prompt+completion, text, or text+label).")
@click.option("--sparsity", required=True, type=float,
              help="Share of the graftable entries the mask keeps, in (0, 1].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dir.")
@click.option("--mask-out", type=click.Path(dir_okay=False), help="Write the mask file here.")
@click.option("--eval-data", type=click.Path(dir_okay=False),
              help="Validation JSONL, added to the score of each rounded mask.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--lr", type=float, default=1e7, show_default=True)
@click.option("--score-every", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--trainable", multiple=True, help="Graftable tensors: a name, kind, glob or re: "
              "pattern (repeatable; default the block weights, kinds attention and mlp).")
@click.option("--rest", type=click.Choice(["finetuned", "base"]), default="finetuned",
              show_default=True, help="Values of the tensors outside the graftable set.")
@click.option("--rounding", type=click.Choice(["top_k", "half"]), default="top_k",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", help="Output dtype (default: as the input).")
@click.option("--force", is_flag=True, help="Replace an existing output directory or mask.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def graft(base: str, finetuned: str, data: str, sparsity: float, out: str,
          mask_out: str | None, eval_data: str | None, steps: int, lr: float,
          score_every: int, batch_size: int, trainable: tuple[str, ...], rest: str,
          rounding: str, seed: int, device: str, dtype: str | None, force: bool,
          quiet: bool) -> None:
    """Graft FINETUNED onto BASE: optimise a sparse mask of its update on DATA and write
    BASE + mask * (FINETUNED - BASE) to OUT."""
    from surgery.train.graft import describe_score
    from surgery.train.graft import graft as run

    settings: dict[str, Any] = {"steps": steps, "lr": lr, "score_every": score_every,
                                "batch_size": batch_size, "rest": rest, "rounding": rounding,
                                "seed": seed, "device": device, "eval_data": eval_data}
    if trainable:
        settings["trainable"] = list(trainable)
    bar = GraftBar(not quiet)
    try:
        res = run(base, finetuned, data, sparsity=sparsity, out=out, mask_out=mask_out,
                  progress=bar, force=force, dtype=dtype, **settings)
    finally:
        bar.close()
    r = res.run
    click.echo(f"wrote {res.path}")
    if res.mask_path is not None:
        click.echo(f"wrote mask {res.mask_path}")
    score = describe_score(r.task, r.best_score, eval_data is not None)
    click.echo(f"mask: {human_count(res.mask.count())} of {human_count(r.total)} graftable "
               f"entries; best at step {r.best_step}: {score}; "
               f"{r.seconds_per_step:.3f} s per mask step")
