"""``bench/FIDELITY.md``: the summary table, then each row's protocol, figures and plots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from bench.fidelity.lab import Lab, Row
from surgery.evaluate.plot import figure, save_figure


def plot_path(lab: Lab, name: str) -> Path:
    """Where a row's PNG goes: beside the report, named after it."""
    return lab.out_dir / f"FIDELITY-{name}.png"


def plot_forgetting(rows: Sequence[Row], path: Path) -> Path | None:
    """Target-task score against control perplexity for every training method of the run."""
    points = [(r.key, *pt) for r in rows for pt in r.points]
    if not points:
        return None
    plt, fig, ax = figure("Target score against forgetting, every training method (first "
                          "seed)", (8, 5.5))
    keys = sorted({k for k, *_ in points})
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(keys)}
    for key, label, score, ppl in points:
        ax.scatter(ppl, score, color=colours[key], s=40)
        ax.annotate(label, (ppl, score), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for k in keys:
        ax.scatter([], [], color=colours[k], label=k)
    ax.set_xlabel("control perplexity (fortunes; lower = less forgetting)")
    ax.set_ylabel("target task test exact match")
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def write(path: Path, rows: Sequence[Row], lab: Lab, command: str, seconds: float,
          cpu: str, pending: Sequence[str] = ()) -> None:
    p = lab.p
    lines = [
        "# Fidelity benchmark",
        "",
        "Does each method do, on a real pretrained model and third-party task data, what its "
        "paper says it does? Each row states the claim, our figures, and a verdict. A claim is "
        "*reproduced* only if it holds on every seed (beyond the spread); otherwise it is "
        "*not reproduced at this scale*, with the figures. Figures are mean ± half the range "
        "over seeds. The protocol of each row was written before its first run and is not "
        "tuned to pass.",
        "",
        f"- command: `{command}`: {seconds / 60:.1f} min of wall time on {os.cpu_count()} "
        f"CPU cores ({cpu}; device {lab.device}); the trainings, merges and scores it used "
        f"took {lab.compute / 60:.1f} min when they were made, each counted once (what a "
        "run from an empty cache takes; intermediate results are cached and shared between rows)",
        f"- models: {lab.models.name}",
        f"- tasks: `{lab.tasks[0].module}` (target task of single-task rows) and "
        f"`{lab.tasks[1].module}`, from pip `mathematics-dataset` (DeepMind's generator, "
        "easy level); classifier rows: the True/False questions of "
        f"`{lab.classify.module}`; scores are exact match of the greedy answer on the test "
        "split (accuracy for classifiers)",
        f"- profile `{p.name}`: {p.train} training, {p.validation} validation, {p.test} test "
        f"questions per task; a full fine-tune is {p.steps} AdamW updates of {p.batch_size} "
        f"examples (lr {lab.lr:g}, constant; adapters {lab.adapter_lr:g}; classifier "
        f"{lab.classifier_lr:g}); {p.seeds} seed(s)",
        f"- control text (forgetting): {p.control} held-out fortunes from Debian's `fortunes` "
        "package, scored by perplexity (lower is better)",
        "",
        *([f"- **incomplete**: the run stopped before the rows {', '.join(pending)}", ""]
          if pending else []),
        "| row | claim (paper) | our figures | verdict | command |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        verdicts = "<br>".join(f"{c}: **{v}**" for c, v in r.verdicts)
        lines.append(f"| {r.title} | {r.claim} (arXiv {r.arxiv}) | {r.summary} | {verdicts} | "
                     f"`python -m bench.fidelity --only {r.key}"
                     f"{' --quick' if p.name == 'quick' else ''}` |")
    forgetting = plot_forgetting(rows, lab.out_dir / "FIDELITY-forgetting.png")
    if forgetting:
        lines += ["", f"![target score against forgetting]({forgetting.name})"]
    for r in rows:
        lines += ["", f"## {r.title}", "", f"Claim (arXiv {r.arxiv}): {r.claim}", "",
                  f"Protocol: {r.protocol}", "", r.table, ""]
        lines += [f"![{r.key}]({Path(q).name})" for q in r.plots]
        lines += ["", f"({r.compute / 60:.1f} min of compute for the results this row used "
                  f"first, {r.seconds / 60:.1f} min in this invocation)"]
    path.write_text("\n".join(lines) + "\n")
