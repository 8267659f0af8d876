"""PNG plots (matplotlib, Agg backend): per-layer scores and a greedy-soup trajectory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery.errors import UsageError
from surgery.methods.greedy_soup import GreedySoupResult


def figure(title: str, size: tuple[float, float] = (8, 4.5)) -> tuple[Any, Any, Any]:
    """(pyplot, figure, axes) on the Agg backend, titled, with a light grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=120)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def save_figure(plt: Any, fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (its folder made), and close it."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(p)
    except OSError as e:
        raise UsageError(f"{p}: cannot write plot ({e.strerror})") from None
    finally:
        plt.close(fig)
    return p


def plot_layer_scores(angular: Sequence[float], block_influence: Sequence[float], n: int,
                      dropped: Sequence[int], path: str | Path) -> Path:
    """Angular distance d(l) for n-block runs and block influence BI(l), dropped blocks marked."""
    plt, fig, ax = figure(f"Per-block scores (n = {n}); dropped blocks {list(dropped)}")
    ax.plot(range(len(angular)), angular, "o-", label=f"angular distance d(l, l+{n})")
    ax.plot(range(len(block_influence)), block_influence, "s-", label="block influence BI(l)")
    for b in dropped:
        ax.axvspan(b - 0.4, b + 0.4, color="tab:red", alpha=0.15)
    ax.set_xlabel("block l")
    ax.set_ylabel("score (lower = more redundant)")
    ax.legend()
    return save_figure(plt, fig, path)


def plot_soup_trajectory(names: Sequence[str], scores: Sequence[float],
                         kept: Sequence[bool], metric: str, path: str | Path) -> Path:
    """Held-out score of each candidate soup in order; kept candidates filled, rejected hollow."""
    plt, fig, ax = figure(f"Greedy soup: {metric} of each candidate soup")
    x = list(range(len(scores)))
    ax.plot(x, scores, "-", color="gray", alpha=0.6)
    for i, (s, k) in enumerate(zip(scores, kept, strict=True)):
        ax.plot(i, s, "o", markersize=9, color="tab:green" if k else "white",
                markeredgecolor="tab:green" if k else "tab:red")
    ax.set_xticks(x, list(names), rotation=20, ha="right")
    ax.set_xlabel("candidate added (green: kept, red: rejected)")
    ax.set_ylabel(metric)
    return save_figure(plt, fig, path)


def plot_greedy_soup(result: GreedySoupResult, metric: str, path: str | Path) -> Path:
    """The trajectory of a finished greedy soup (its decision log), as
    :func:`plot_soup_trajectory` draws it."""
    d = result.decisions
    return plot_soup_trajectory([x.candidate for x in d], [x.soup_score for x in d],
                                [x.kept for x in d], metric, path)


def plot_loss_curve(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training loss per update, with evaluation scores (when present) on a second axis."""
    if not history:
        raise UsageError("no training updates to plot")
    plt, fig, ax = figure("Fine-tuning loss")
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    ax.set_xlabel("update")
    ax.set_ylabel("loss")
    evals = [(h["step"], k, v) for h in history for k, v in h.items() if k.startswith("eval_")]
    if evals:
        other = ax.twinx()
        for key in sorted({k for _, k, _ in evals}):
            pts = [(s, v) for s, k, v in evals if k == key]
            other.plot([s for s, _ in pts], [v for _, v in pts], "o--", color="tab:orange",
                       label=key.removeprefix("eval_"))
            other.set_ylabel(key.removeprefix("eval_"))
        other.legend(loc="upper right")
    ax.legend(loc="upper left")
    return save_figure(plt, fig, path)
