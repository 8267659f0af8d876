"""Multi-task merging of two task fine-tunes: task arithmetic (arXiv 2212.04089), TIES
(2306.01708), DARE-TIES (2311.03099) and multi-task LiNeS (2410.17146), scored by normalised
accuracy over both tasks."""

from __future__ import annotations

from bench.fidelity.lab import Lab, Row, Spread, compare, identity
from bench.fidelity.report import plot_path
from surgery import Weights, dare_ties, lines, load, task_arithmetic, ties
from surgery.evaluate.plot import figure, save_figure

LAMBDAS = (0.3, 0.5, 0.7, 1.0)
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TIES_DENSITY = 0.2
DARE_DENSITY = 0.3

PROTOCOL = (
    "per seed, the two tasks' plain fine-tunes (the rows' shared SFT, same seed) merged onto "
    f"the base. Task arithmetic, TIES (density {TIES_DENSITY}) and DARE-TIES (density "
    f"{DARE_DENSITY}, inverse-density rescale, seeded drops) each with λ chosen from "
    f"{list(LAMBDAS)} on validation; LiNeS in its multi-task form on the task-arithmetic sum "
    "(λ = 1): α = (‖Σ τ_t‖₁ / ‖τ_merged‖₁)/T from the task vectors, β chosen from "
    f"{list(BETAS)} on validation. The validation criterion and the reported figure are the "
    "normalised accuracy: the mean over both tasks of the merge's exact match divided by "
    "that task's own fine-tune's (test split for the figure)."
)


def merge(method: str, base: Weights, models: list[Weights], x: float) -> Weights:
    """The merge of ``method`` at λ (or, for LiNeS, β) = ``x``."""
    if method == "task arithmetic":
        return task_arithmetic(base, models, lambda_=x)
    if method == "TIES":
        return ties(base, models, TIES_DENSITY, lambda_=x)
    if method == "DARE-TIES":
        return dare_ties(base, models, DARE_DENSITY, lambda_=x)
    return lines(base, task_arithmetic(base, models, lambda_=1.0), beta=x, tasks=models)


def normalised(scores: list[float], own: list[float]) -> float:
    return sum(s / o if o else float("nan") for s, o in zip(scores, own, strict=True)) / len(own)


def run(lab: Lab) -> Row:
    a, b = lab.tasks
    base = load(lab.models.lm)
    results: dict[str, list[float]] = {"task arithmetic": [], "TIES": [], "DARE-TIES": [],
                                       "LiNeS": []}
    lines_tbl = ["| seed | method | chosen | test exact match (tasks) | normalised |",
                 "|---:|---|---:|---|---:|"]
    curve: list[tuple[float, list[float]]] = []
    own_all = []
    for s in lab.seeds:
        fts = [lab.finetuned(t, s) for t in (a, b)]
        own = [lab.score(fts[0], a), lab.score(fts[1], b)]
        own_val = [lab.score(fts[0], a, "validation"), lab.score(fts[1], b, "validation")]
        own_all.append(own)
        models = [load(p) for p in fts]
        key = [identity(p) for p in fts]
        for method, grid in (("task arithmetic", LAMBDAS), ("TIES", LAMBDAS),
                             ("DARE-TIES", LAMBDAS), ("LiNeS", BETAS)):
            def build(x: float, method: str = method, models: list = models) -> Weights:
                return merge(method, base, models, x)

            val = []
            for x in grid:
                scores = lab.scores_of(method, build(x), [key, s, x],
                                       [(a, "validation"), (b, "validation")])
                val.append(normalised(scores, own_val))
                if method == "LiNeS" and s == lab.seeds[0]:
                    curve.append((x, scores))
            best = max(range(len(grid)), key=lambda i: (val[i], -i))
            test = lab.scores_of(method, build(grid[best]), [key, s, grid[best]],
                                 [(a, "test"), (b, "test")])
            results[method].append(normalised(test, own))
            param = "β" if method == "LiNeS" else "λ"
            lines_tbl.append(f"| {s} | {method} | {param} = {grid[best]:g} | "
                             f"{test[0]:.3f}, {test[1]:.3f} | {results[method][-1]:.3f} |")
    base_scores = [lab.score(lab.models.lm, a), lab.score(lab.models.lm, b)]
    own_txt = "; ".join(f"seed {s}: {o[0]:.3f}, {o[1]:.3f}" for s, o in zip(lab.seeds, own_all,
                                                                           strict=True))
    table = (f"Base: {base_scores[0]:.3f} on `{a.module}`, {base_scores[1]:.3f} on "
             f"`{b.module}`; each task's own fine-tune: {own_txt}.\n\n" + "\n".join(lines_tbl))
    plots = [str(plot_beta(curve, [a.module, b.module], plot_path(lab, "lines-beta")))]
    ta = results["task arithmetic"]
    return Row(
        "multi_task", "Multi-task merge",
        "merging two task fine-tunes keeps most of both; TIES and DARE-TIES improve on task "
        "arithmetic; LiNeS (multi-task α, β searched on validation) ≥ task arithmetic",
        "2212.04089, 2306.01708, 2311.03099, 2410.17146",
        [("LiNeS ≥ task arithmetic", compare(results["LiNeS"], ta, False)),
         ("TIES ≥ task arithmetic", compare(results["TIES"], ta, False)),
         ("DARE-TIES ≥ task arithmetic", compare(results["DARE-TIES"], ta, False))],
        "normalised accuracy: " + ", ".join(f"{m} {Spread(v).fmt()}"
                                            for m, v in results.items()),
        table, PROTOCOL, plots)


def plot_beta(curve: list[tuple[float, list[float]]], names: list[str], path) -> str:
    plt, fig, ax = figure("Multi-task LiNeS: β against both tasks' scores (first seed)",
                          (6.5, 4.2))
    xs = [x for x, _ in curve]
    for i, name in enumerate(names):
        ax.plot(xs, [sc[i] for _, sc in curve], "o-", label=name)
    ax.set_xlabel("LiNeS β (multi-task α from the L1 ratio)")
    ax.set_ylabel("validation exact match")
    ax.legend()
    return str(save_figure(plt, fig, path))
