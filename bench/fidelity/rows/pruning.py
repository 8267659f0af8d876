"""Block pruning by angular distance (arXiv 2403.17887) against dropping the last blocks, and
healing the pruned model by self-data distillation (arXiv 2410.09982) against SFT healing on
the original responses."""

from __future__ import annotations

import json
from pathlib import Path

from bench.fidelity.lab import Lab, Row, Spread, compare, identity
from surgery import drop_layers, load
from surgery.prune import prune
from surgery.train.distill import distill_data

# Tokens the teacher may generate per training prompt (the answers are a few tokens).
DISTILL_TOKENS = 32

PROTOCOL = (
    "(a) n = max(1, round(L/5)) of the base model's L blocks are dropped: the n-block run "
    "chosen by angular distance (`surgery.prune.prune`, method angular) on the fortunes "
    "calibration sample (generic prose, disjoint from the control sample; the paper scores on "
    "generic text, so the target task stays out of the choice), against `drop_layers` of the "
    "last n blocks. No training; compared on control perplexity and the target task's answer "
    "perplexity (test split). Verdicts: angular lower on each. (b) per seed s, the "
    "angular-pruned model is healed by a fine-tune of half the step budget (seed s, the full "
    "fine-tune's learning rate and batch size) on the target task's training prompts, with the "
    "original completions (SFT healing) or with the completions the unpruned base regenerates "
    f"greedily (at most {DISTILL_TOKENS} tokens; `surgery.train.distill.distill_data`, "
    "self-data distillation). 'Retains more' is decided on control perplexity (SDD lower: the "
    "unpruned model's general text quality kept) and on target test exact match (SDD ≥ SFT "
    "healing); answer perplexity is shown."
)


def _blocks(model: Path) -> int:
    return int(json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"])


def run(lab: Lab) -> Row:
    task = lab.tasks[0]
    base = lab.models.lm
    blocks = _blocks(base)
    n = max(1, round(blocks / 5))
    angular = lab.made(f"prune-angular-{n}", [identity(base), identity(lab.calibration), n],
                       lambda out: prune(base, n, lab.calibration, out, method="angular",
                                         device=lab.device, force=True))
    dropped = json.loads((angular / "provenance.json").read_text())["pruning"]["dropped"]
    last = lab.save(f"drop-last-{n}", drop_layers(load(base), range(blocks - n, blocks)),
                    [identity(base), n])
    teacher_data = lab.made(
        "sdd-data", [identity(base), identity(task.path("train")), DISTILL_TOKENS],
        lambda out: distill_data(base, task.path("train"), out / "train.jsonl",
                                 max_new_tokens=DISTILL_TOKENS, batch_size=16,
                                 max_length=lab.p.max_length, device=lab.device)
    ) / "train.jsonl"

    def figures(path: Path) -> tuple[float, float, float]:
        return lab.score(path, task), lab.task_ppl(path, task), lab.control_ppl(path)

    fixed = {"base (unpruned)": figures(base), f"angular (blocks {dropped})": figures(angular),
             f"last {n} blocks": figures(last)}
    lines = ["| model | test | answer ppl | control ppl |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {t:.3f} | {a:.2f} | {c:.2f} |" for m, (t, a, c) in fixed.items()]
    (_, ang_ans, ang_ctl), (_, last_ans, last_ctl) = list(fixed.values())[1:]

    steps = max(1, lab.p.steps // 2)
    heals = ("SFT healing", "SDD healing")
    score = {h: [] for h in heals}
    ans = {h: [] for h in heals}
    ppl = {h: [] for h in heals}
    points: list[tuple[str, float, float]] = []
    lines += ["", "| seed | " + " | ".join(f"{h} (test / answer ppl / control ppl)"
                                          for h in heals) + " |", "|---:|---:|---:|"]
    for s in lab.seeds:
        runs = {
            "SFT healing": lab.train(f"heal-sft-{task.module}", angular, task.path("train"),
                                     seed=s, steps=steps),
            "SDD healing": lab.train(f"heal-sdd-{task.module}", angular, teacher_data, seed=s,
                                     steps=steps),
        }
        for h, path in runs.items():
            t, a, c = figures(path)
            score[h].append(t)
            ans[h].append(a)
            ppl[h].append(c)
            if s == lab.seeds[0]:
                points.append((f"pruned + {h}", t, c))
        lines.append(f"| {s} | " + " | ".join(
            f"{score[h][-1]:.3f} / {ans[h][-1]:.2f} / {ppl[h][-1]:.2f}" for h in heals) + " |")
    table = (f"{blocks} blocks, n = {n} dropped; healing {steps} updates at lr {lab.lr:g}.\n\n"
             + "\n".join(lines))
    sft, sdd = heals
    return Row(
        "pruning", "Block pruning and self-data-distillation healing",
        "angular-distance block pruning beats dropping the last blocks; self-data-distillation "
        "healing retains more than SFT healing on the original responses",
        "2403.17887, 2410.09982",
        [("angular < last blocks, control ppl", compare([ang_ctl], [last_ctl],
                                                        higher_is_better=False)),
         ("angular < last blocks, answer ppl", compare([ang_ans], [last_ans],
                                                       higher_is_better=False)),
         ("SDD < SFT healing, control ppl", compare(ppl[sdd], ppl[sft],
                                                     higher_is_better=False)),
         ("SDD ≥ SFT healing, target test", compare(score[sdd], score[sft], strict=False))],
        f"drop {n}/{blocks}: angular {ang_ctl:.2f} / {ang_ans:.2f}, last {last_ctl:.2f} / "
        f"{last_ans:.2f} (control / answer ppl); healed: SFT {Spread(score[sft]).fmt()} / "
        f"{Spread(ppl[sft]).fmt(2)}, SDD {Spread(score[sdd]).fmt()} / "
        f"{Spread(ppl[sdd]).fmt(2)} (test / control ppl)", table, PROTOCOL, points=points)
