"""SFT objectives against plain SFT on the same budget: DFT (arXiv 2508.05629), ASFT (arXiv
2509.23753), masked thought (arXiv 2403.02178) and sorted fine-tuning (arXiv 2309.08968),
whose sub-models are compared with the same truncation of the SFT model."""

from __future__ import annotations

import json
from pathlib import Path

from bench.fidelity.lab import Lab, Row, Spread, compare, identity
from bench.fidelity.report import plot_path
from surgery import keep_first_layers, load
from surgery.evaluate.plot import figure, save_figure

# Each is TrainConfig.objective with its defaults (ASFT λ 0.05, KL(Q‖P); masked thought p 0.2
# with the unk/pad token; sorted exits k, 2k, .., L with k = ⌈L/4⌉).
OBJECTIVES = ("dft", "asft", "masked_thought", "sorted")

PROTOCOL = (
    "per seed s, the plain SFT of the target task (the row-shared `lab.finetuned(task, s)`) "
    "and four more full fine-tunes from the same pretrained model with the same data, steps, "
    "batch size, learning rate (constant) and seed, differing only in `objective`: `dft`, "
    "`asft` (λ 0.05, KL from the frozen start model), `masked_thought` (mask probability "
    "0.2) and `sorted` (its default exits E = {k, 2k, .., L}, k = ⌈L/4⌉, read back from the "
    "run's provenance). Target score: test exact match; forgetting: control perplexity; also "
    "the perplexity of the test answers. Claims: DFT ≥ SFT, ASFT ≥ SFT and masked thought ≥ "
    "SFT on test exact match (at or above on every seed); ASFT's control perplexity below "
    "SFT's (less drift); for every early exit e ∈ E (e < L), the sorted model's first e "
    "blocks (`keep_first_layers(e)`: embeddings, blocks 0..e−1, final norm and head) have a "
    "lower test answer perplexity than the SFT model's first e blocks (perplexity, since the "
    "exact match of a truncated model is near 0 for both). The full-depth pair (e = L) is "
    "shown, not judged."
)


def exits_of(run: Path) -> list[int]:
    """The exits the sorted objective trained, as its run recorded them."""
    training = json.loads((run / "provenance.json").read_text())["training"]
    return list(training["objective"]["exits"])


def plot_depths(lab: Lab, exits: list[int], sorted_ppl: list[float], sft_ppl: list[float]
                ) -> str:
    plt, fig, ax = figure("Sorted fine-tuning's sub-models against truncated SFT (first seed)",
                          (6, 4))
    ax.plot(exits, sorted_ppl, "o-", label="sorted fine-tuning, first e blocks")
    ax.plot(exits, sft_ppl, "s--", label="SFT, first e blocks (truncated)")
    ax.set_yscale("log")
    ax.set_xticks(exits)
    ax.set_xlabel("sub-model depth e (blocks)")
    ax.set_ylabel(f"answer perplexity, {lab.tasks[0].module} test")
    ax.legend(fontsize=8)
    return str(save_figure(plt, fig, plot_path(lab, "sorted-depth")))


def run(lab: Lab) -> Row:
    task = lab.tasks[0]
    base = lab.models.lm
    base_score, base_ctrl = lab.score(base, task), lab.control_ppl(base)
    names = ("sft", *OBJECTIVES)
    score: dict[str, list[float]] = {n: [] for n in names}
    ctrl: dict[str, list[float]] = {n: [] for n in names}
    answer: dict[str, list[float]] = {n: [] for n in names}
    depth: dict[int, tuple[list[float], list[float]]] = {}  # e -> (sorted, sft) per seed
    lines = ["| seed | objective | test exact match | control ppl | test answer ppl |",
             "|---:|---|---:|---:|---:|"]
    depth_lines: list[str] = []
    points: list[tuple[str, float, float]] = []
    plots: list[str] = []
    exits: list[int] = []
    for s in lab.seeds:
        runs = {"sft": lab.finetuned(task, s)}
        for obj in OBJECTIVES:
            runs[obj] = lab.train(f"{obj}-{task.module}", base, task.path("train"), seed=s,
                                  objective=obj)
        for n, path in runs.items():
            score[n].append(lab.score(path, task))
            ctrl[n].append(lab.control_ppl(path))
            answer[n].append(lab.task_ppl(path, task))
            lines.append(f"| {s} | {n} | {score[n][-1]:.3f} | {ctrl[n][-1]:.2f} | "
                         f"{answer[n][-1]:.2f} |")
            if s == lab.seeds[0]:
                points.append((n, score[n][-1], ctrl[n][-1]))
        exits = exits_of(runs["sorted"])
        full = exits[-1]
        for e in exits:
            pair = []
            for n in ("sorted", "sft"):
                if e == full:
                    pair.append(answer[n][-1])
                    continue
                sub = lab.save(f"first{e}-{n}-{task.module}",
                               keep_first_layers(load(runs[n]), e), [identity(runs[n]), e])
                pair.append(lab.task_ppl(sub, task))
            depth.setdefault(e, ([], []))
            depth[e][0].append(pair[0])
            depth[e][1].append(pair[1])
            depth_lines.append(f"| {s} | {e} | {pair[0]:.2f} | {pair[1]:.2f} |")
        if s == lab.seeds[0]:
            plots.append(plot_depths(lab, exits, [depth[e][0][-1] for e in exits],
                                     [depth[e][1][-1] for e in exits]))
    early = exits[:-1]
    verdicts = [("DFT ≥ SFT (test exact match)", compare(score["dft"], score["sft"], False)),
                ("ASFT ≥ SFT (test exact match)", compare(score["asft"], score["sft"], False)),
                ("ASFT drifts less than SFT (control ppl)",
                 compare(ctrl["asft"], ctrl["sft"], higher_is_better=False)),
                ("masked thought ≥ SFT (test exact match)",
                 compare(score["masked_thought"], score["sft"], False))]
    verdicts += [(f"sorted sub-model of {e} blocks beats SFT truncated to {e} (answer ppl)",
                  compare(depth[e][0], depth[e][1], higher_is_better=False)) for e in early]
    table = (f"Base model: test exact match {base_score:.3f}, control ppl {base_ctrl:.2f}.\n\n"
             + "\n".join(lines) + "\n\nSub-models (first e blocks; e = L is the whole model): "
             "test answer perplexity.\n\n| seed | e | sorted | SFT truncated |\n|---:|---:|---:|"
             "---:|\n" + "\n".join(depth_lines))
    em = ", ".join(f"{n} {Spread(score[n]).fmt()}" for n in names)
    subs = ", ".join(f"e={e} {Spread(depth[e][0]).fmt(1)} vs {Spread(depth[e][1]).fmt(1)}"
                     for e in early)
    summary = (f"test exact match: {em} (base {base_score:.3f}); control ppl SFT "
               f"{Spread(ctrl['sft']).fmt(2)}, ASFT {Spread(ctrl['asft']).fmt(2)}; sorted vs "
               f"truncated SFT answer ppl: {subs}")
    return Row(
        "objectives", "SFT objectives",
        "DFT, ASFT, masked thought and sorted fine-tuning against SFT on the same budget; "
        "sorted fine-tuning's sub-models beat truncating an SFT model",
        "2508.05629, 2509.23753, 2403.02178, 2309.08968", verdicts, summary, table, PROTOCOL,
        plots, points)
