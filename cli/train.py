"""``surgery train`` (a one-step recipe around ``op: finetune``) and ``surgery distill-data``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

import click
import yaml
from surgery_cli.evaluation import _Bar
from surgery_cli.main import handle_errors
from surgery_cli.progress import ProgressBar
from tqdm import tqdm

from surgery.train import TrainEvent

OBJECTIVES = ("sft", "dft", "asft", "masked_thought", "sorted")


class TrainBar:
    """Progress of the updates (loss, learning rate, tokens per second); optionally each
    event as one JSON line of a metrics log."""

    def __init__(self, enabled: bool, log: TextIO | None = None) -> None:
        self.enabled = enabled
        self.log = log
        self.bar: tqdm | None = None
        self.history: list[dict[str, Any]] = []

    def __call__(self, e: TrainEvent) -> None:
        row = {"step": e.step, "loss": e.loss, "lr": e.lr, "tokens": e.tokens,
               "tokens_per_s": round(e.tokens_per_s, 1)}
        if e.eval:
            row = {"step": e.step, **{f"eval_{k}": v for k, v in e.eval.items()}}
            self.history[-1].update(row)
        else:
            self.history.append(row)
        if self.log is not None:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
        if not self.enabled:
            return
        if e.eval:
            tqdm.write(f"update {e.step}: " + ", ".join(f"{k} {v:.6g}"
                                                        for k, v in e.eval.items()))
            return
        if self.bar is None:
            self.bar = tqdm(total=e.steps, desc="training", unit="step", dynamic_ncols=True)
        self.bar.update(e.step - self.bar.n)
        self.bar.set_postfix_str(f"loss {e.loss:.4f}, lr {e.lr:.3g}, "
                                 f"{e.tokens_per_s:,.0f} tok/s")
        if e.step == e.steps:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command()
@click.argument("model")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dir.")
@click.option("--steps", type=click.IntRange(min=1), help="Optimiser updates.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True),
              help="Passes over the data (instead of --steps).")
@click.option("--lr", type=float, default=2e-5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "linear", "cosine"]),
              default="constant", show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--objective", type=click.Choice(OBJECTIVES), default="sft", show_default=True)
@click.option("--trainable", multiple=True, help="hft, or a name, kind, glob or re: pattern "
              "of the parameters that train (repeatable; default all).")
@click.option("--chat", is_flag=True, help="Render prompt+completion with the chat template.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False),
              help="Train only this PEFT LoRA adapter's A and B (a `surgery corda` output: "
              "MODEL is then its residual); OUT is the merged model, OUT/adapter the adapter.")
@click.option("--eval-data", type=click.Path(dir_okay=False), help="JSONL scored during "
              "training (perplexity, or accuracy for a classifier).")
@click.option("--eval-every", type=click.IntRange(min=1), help="Updates between evaluations.")
@click.option("--checkpoint-every", type=click.IntRange(min=1),
              help="Updates between resumable checkpoints.")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--drift", "drift", type=click.Path(dir_okay=False),
              help="DRIFT: bias the gradients toward this prior (surgery drift-prior).")
@click.option("--drift-mode", type=click.Choice(["adaptive_cosine", "gradnorm", "absolute"]),
              default="adaptive_cosine", show_default=True)
@click.option("--drift-alpha", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other finetune parameter (asft_lambda=0.1, mask_prob=0.3, ...).")
@click.option("--dtype", help="Output dtype (default: as the input).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False),
              help="Write each update's metrics as a JSON line.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Plot the loss curve to a PNG.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def train(model: str, data: str, out: str, steps: int | None, epochs: float | None, lr: float,
          batch_size: int, grad_accum: int, max_length: int, schedule: str, warmup: int,
          weight_decay: float, seed: int, device: str, objective: str,
          trainable: tuple[str, ...], chat: bool, adapter: str | None, eval_data: str | None,
          eval_every: int | None, checkpoint_every: int | None, gradient_checkpointing: bool,
          drift: str | None, drift_mode: str, drift_alpha: float, extra: tuple[str, ...],
          dtype: str | None, log_path: str | None, plot: str | None,
          force: bool, quiet: bool) -> None:
    """Fine-tune MODEL on a JSONL file and write the result to OUT.

    A one-step recipe around `op: finetune` (written into OUT as recipe.yaml): rerunning the
    same command after an interruption resumes from the last checkpoint."""
    from surgery.errors import RecipeError, UsageError
    from surgery.recipe.build import build_recipe
    from surgery.recipe.run import run_recipe

    step: dict[str, Any] = {"op": "finetune", "model": "model", "data": data}
    given = {"steps": steps, "epochs": epochs, "eval_data": eval_data,
             "eval_every": eval_every, "checkpoint_every": checkpoint_every}
    step.update({k: v for k, v in given.items() if v is not None})
    defaults = {"lr": (lr, 2e-5), "batch_size": (batch_size, 8), "grad_accum": (grad_accum, 1),
                "max_length": (max_length, 512), "schedule": (schedule, "constant"),
                "warmup": (warmup, 0), "weight_decay": (weight_decay, 0.0),
                "device": (device, "auto"), "objective": (objective, "sft"),
                "chat": (chat, False), "gradient_checkpointing": (gradient_checkpointing, False)}
    step.update({k: v for k, (v, default) in defaults.items() if v != default})
    if trainable:
        step["trainable"] = trainable[0] if list(trainable) == ["hft"] else list(trainable)
    if adapter:
        step["adapter"] = adapter
    if drift:
        step["drift"] = {"prior": drift, "mode": drift_mode, "alpha": drift_alpha}
    elif drift_mode != "adaptive_cosine" or drift_alpha != 1.0:
        raise UsageError("--drift-mode and --drift-alpha need --drift PRIOR")
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        step[key.strip()] = yaml.safe_load(value)
    output: dict[str, Any] = {"from": "trained", "path": out}
    if dtype:
        output["dtype"] = dtype
    doc = {"seed": seed, "inputs": {"model": model}, "steps": {"trained": step},
           "output": output}
    text = "# made by `surgery train`\n" + yaml.safe_dump(doc, sort_keys=False)
    try:
        recipe = build_recipe(text, "surgery train")
    except RecipeError as e:  # say it in the command's terms, not the recipe it wrote
        raise UsageError(_option_error(e)) from None
    log = _open_log(log_path) if log_path else None
    bar = TrainBar(not quiet, log)
    writing = ProgressBar(enabled=False)
    try:
        results = run_recipe(recipe, force=force, progress=writing, on_train=bar)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if not results:  # a process of a multi-process run other than rank 0
        return
    click.echo(f"wrote {results[0].path}")
    if adapter:  # the trained A and B, next to the merged model
        import shutil

        from surgery.recipe.run import finetune_steps

        _, node = finetune_steps(recipe)[0]
        target = results[0].path / "adapter"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(node.folder / "adapter", target)
        click.echo(f"wrote the trained adapter to {target}")
    record = json.loads((results[0].path / "provenance.json").read_text()).get("sections", {})
    if "Fine-tuning" in record:
        lines = record["Fine-tuning"].split("\n")
        click.echo(lines[0])
        for line in lines:
            if line.startswith("- drift:"):
                click.echo(f"DRIFT bias {line.removeprefix('- drift: ')}")
    if plot:
        from surgery.evaluate.plot import plot_loss_curve

        history = bar.history or _cached_history(recipe)
        click.echo(f"plot: {plot_loss_curve(history, plot)}")


def _open_log(path: str) -> TextIO:
    from surgery.errors import UsageError

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{path}: cannot write the metrics log ({e.strerror})") from None


def _option_error(e: Any) -> str:
    """A RecipeError of the one-step recipe as an error of an option (or of MODEL)."""
    if e.key == "inputs.model":
        return f"MODEL: {e.detail}"
    parts = e.key.split(".")
    if parts[:2] == ["steps", "trained"] and len(parts) > 2:
        return f"--{parts[2].replace('_', '-')}: {e.detail}"
    return e.detail or str(e)


def _cached_history(recipe: Any) -> list[dict[str, Any]]:
    """The loss history of a run reused from the cache (no updates were reported)."""
    from surgery.recipe.run import finetune_steps

    _, node = finetune_steps(recipe)[0]
    return json.loads((node.folder / "provenance.json").read_text())["training"]["history"]


@click.command("distill-data")
@click.argument("teacher")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="prompt+completion JSONL.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--chat", is_flag=True, help="Give the teacher each prompt through its chat "
              "template (as a student fine-tuned with --chat sees it).")
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def distill_data(teacher: str, data: str, out: str, max_new_tokens: int, batch_size: int,
                 chat: bool, device: str, force: bool, quiet: bool) -> None:
    """Regenerate the completions of DATA with TEACHER (greedy) into OUT (self-data
    distillation, arXiv 2410.09982)."""
    from surgery.train.distill import distill_data as run

    bar = _Bar("distilling", not quiet)
    try:
        res = run(teacher, data, out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  chat=chat, device=device, force=force, progress=bar)
    finally:
        bar.close()
    skipped = f"; {res.empty} prompt(s) answered with nothing, left out" if res.empty else ""
    click.echo(f"wrote {res.records} records to {Path(res.path)}{skipped}")
