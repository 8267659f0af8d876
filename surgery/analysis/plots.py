"""PNG figures of diffs and checkpoint summaries (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.analysis.diff import DiffReport
from surgery.errors import UsageError
from surgery.names import TensorKind
from surgery.summary import CheckpointSummary


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'weight-surgery[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(label: str) -> str:
    return label.removeprefix("block ") if label != "non-block" else "other"


def plot_diff(report: DiffReport, path: str | Path) -> Path:
    """Per-block ‖A−B‖ (absolute and relative to ‖A‖), fraction of changed entries, and with
    a base, cosine similarity and sign agreement of the task vectors."""
    plt = _pyplot()
    labels = [_short(g.label) for g in report.groups]
    x = range(len(labels))
    panels = 3 if report.base else 2
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 0.5 * len(labels) + 3), 2.8 * panels),
                             sharex=True, constrained_layout=True)
    ax = axes[0]
    ax.bar(x, [g.diff_norm for g in report.groups], color="#4c72b0", label="‖A−B‖")
    ax.set_ylabel("‖A−B‖ (Frobenius)")
    twin = ax.twinx()
    twin.plot(x, [100 * g.relative_diff for g in report.groups], "o-", color="#dd8452",
              label="‖A−B‖ / ‖A‖")
    twin.set_ylabel("relative to ‖A‖ (%)", color="#dd8452")
    ax.set_title(f"A = {report.a}   vs   B = {report.b}", fontsize=10)
    ax = axes[1]
    ax.bar(x, [100 * g.changed_fraction for g in report.groups], color="#55a868")
    ax.set_ylabel("entries changed (%)")
    ax.set_ylim(0, 105)
    if report.base:
        ax = axes[2]
        cos = [g.cosine if g.cosine is not None else float("nan") for g in report.groups]
        sign = [g.sign_agreement if g.sign_agreement is not None else float("nan")
                for g in report.groups]
        ax.plot(x, cos, "o-", color="#c44e52", label="cosine(τ_A, τ_B)")
        ax.plot(x, sign, "s--", color="#8172b3", label="sign agreement")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel(f"task vectors over\n{report.base}", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xticks(list(x), labels)
    axes[-1].set_xlabel("block")
    return _save(fig, plt, path)


def plot_summary(summary: CheckpointSummary, path: str | Path) -> Path:
    """Stacked bars: parameters per block, split by kind of tensor."""
    plt = _pyplot()
    labels = [_short(g.label) for g in summary.groups]
    kinds = [k.value for k in TensorKind if any(g.kinds.get(k.value) for g in summary.groups)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) + 3), 4), constrained_layout=True)
    bottom = [0.0] * len(labels)
    for kind in kinds:
        values = [float(g.kinds.get(kind, 0)) for g in summary.groups]
        ax.bar(labels, values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("parameters")
    ax.set_xlabel("block")
    ax.set_title(f"{summary.source}: {summary.architecture or 'unknown architecture'}, "
                 f"{summary.total_params:,} parameters", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    out = Path(path)
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise UsageError(f"{out}: cannot write the plot ({e.strerror})") from e
    finally:
        plt.close(fig)
    return out
