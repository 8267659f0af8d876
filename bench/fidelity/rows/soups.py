"""Model soups (arXiv 2203.05482): the uniform and the greedy soup of fine-tunes that differ
in seed and learning rate, against the best single fine-tune."""

from __future__ import annotations

from bench.fidelity.lab import Lab, Row, Spread, compare, identity
from bench.fidelity.report import plot_path
from surgery import Weights, linear, load
from surgery.evaluate.plot import plot_greedy_soup
from surgery.methods.greedy_soup import run_greedy_soup

# Ingredient i of seed s: training seed 10·s + i, learning rate lab.lr × LR_SCALE[i].
LR_SCALE = (1.0, 1.0, 0.5, 2.0)

PROTOCOL = (
    "per seed s, four full fine-tunes of the target task from the same pretrained model, "
    "training seeds 10s..10s+3 and learning rates ×1, ×1, ×0.5, ×2 of the profile's; the "
    "best single one is the best on validation; the uniform soup averages all four; the "
    "greedy soup (`surgery.methods.greedy_soup`, accept `>`) adds ingredients in order of "
    "validation score while the validation score improves. All figures are test exact match."
)


def run(lab: Lab) -> Row:
    task = lab.tasks[0]
    base_score = lab.score(lab.models.lm, task)
    best, uniform, greedy, best_test = [], [], [], []
    lines = ["| seed | ingredients (test) | best single (by validation) | uniform soup | "
             "greedy soup (kept) |", "|---:|---|---:|---:|---:|"]
    plots = []
    for s in lab.seeds:
        paths = {f"s{10 * s + i}-lr×{m:g}": lab.finetuned(task, 10 * s + i, lr=lab.lr * m)
                 for i, m in enumerate(LR_SCALE)}
        test = {n: lab.score(p, task) for n, p in paths.items()}
        val = {n: lab.score(p, task, "validation") for n, p in paths.items()}
        top = max(val, key=lambda n: (val[n], -list(val).index(n)))
        key = [identity(p) for p in paths.values()]
        u = lab.save("uniform-soup", linear([load(p) for p in paths.values()]), key)
        def scorer(w: Weights, key: list = key) -> float:
            # an ingredient is scored from its own run directory (already cached), a
            # candidate soup under its expression
            return lab.scores_of("soup-candidate", w, [key, w.node.describe()],
                                 [(task, "validation")])[0]

        result = run_greedy_soup({n: load(p) for n, p in paths.items()}, scorer)
        g = lab.save("greedy-soup", linear([load(paths[k]) for k in result.kept]),
                     [identity(paths[k]) for k in result.kept])
        if s == lab.seeds[0]:
            plots.append(str(plot_greedy_soup(result, "validation exact match",
                                              plot_path(lab, "greedy-soup"))))
        best.append(test[top])
        best_test.append(max(test.values()))
        uniform.append(lab.score(u, task))
        greedy.append(lab.score(g, task))
        lines.append(f"| {s} | {', '.join(f'{n} {v:.3f}' for n, v in test.items())} | "
                     f"{test[top]:.3f} ({top}) | {uniform[-1]:.3f} | {greedy[-1]:.3f} "
                     f"({', '.join(result.kept)}) |")
    b, u_, g_ = Spread(best), Spread(uniform), Spread(greedy)
    table = (f"Base model: {base_score:.3f}. Best single by test score (for reference): "
             f"{Spread(best_test).fmt()}.\n\n" + "\n".join(lines))
    return Row(
        "soups", "Model soups",
        "a uniform soup and a greedy soup of fine-tunes are at least as good as the best "
        "single fine-tune on held-out data; greedy ≥ uniform", "2203.05482",
        [("uniform ≥ best single", compare(uniform, best, False)),
         ("greedy ≥ best single", compare(greedy, best, False)),
         ("greedy ≥ uniform", compare(greedy, uniform, False))],
        f"best single {b.fmt()}, uniform {u_.fmt()}, greedy {g_.fmt()} (test exact match; "
        f"base {base_score:.3f})", table, PROTOCOL, plots)
