"""DRIFT (arXiv 2510.15050): fine-tuning with each projection's gradient biased toward a
"reasoning" prior Δ = θ_reasoning − θ_target, against plain SFT of the same budget and the
naive merge θ_target + w·Δ. A full fine-tune of the target task stands in for the reasoning
variant (we have no reasoning/instruct pair of one model)."""

from __future__ import annotations

from pathlib import Path

from bench.fidelity.lab import Lab, Row, Spread, compare, identity
from surgery import Rule, load, task_arithmetic
from surgery.train import drift_prior

MODE, ALPHA, MERGE_W = "adaptive_cosine", 1.0, 0.5

PROTOCOL = (
    "per seed s: the 'reasoning' variant θ_r is the row-shared full fine-tune of the target "
    "task (training seed s, the full step budget); the prior Δ = θ_r − θ_base over every "
    "attention and MLP projection (`surgery.train.drift_prior`). From the base, two fine-tunes "
    "of a quarter of the step budget on the target task's training split, same data order, "
    "seed s, learning rate and batch size: plain SFT, and DRIFT (`finetune(drift={prior, "
    "mode: adaptive_cosine, alpha: 1})`). The naive merge is θ_base + 0.5·Δ on attention and "
    "MLP tensors (`task_arithmetic` with lambda 0.5 there, 0 elsewhere, as recipes/drift.yaml). "
    "Score: target test exact match (control perplexity for the points; answer perplexity "
    "shown). Verdicts: DRIFT ≥ SFT and DRIFT ≥ naive merge on test exact match."
)


def prior(lab: Lab, reasoning: Path) -> Path:
    """DRIFT's prior file Δ = reasoning − base."""
    def make(out: Path) -> None:
        drift_prior(load(reasoning), load(lab.models.lm), out / "prior.safetensors",
                    device=lab.device)

    key = [identity(reasoning), identity(lab.models.lm)]
    return lab.made("drift-prior", key, make) / "prior.safetensors"


def run(lab: Lab) -> Row:
    task = lab.tasks[0]
    steps = max(1, lab.p.steps // 4)
    base = lab.models.lm
    base_score, base_ppl = lab.score(base, task), lab.control_ppl(base)
    names = ("SFT", "DRIFT", "naive merge", "θ_r (full FT)")
    score = {n: [] for n in names}
    ppl = {n: [] for n in names}
    ans = {n: [] for n in names}
    points: list[tuple[str, float, float]] = []
    lines = ["| seed | " + " | ".join(f"{n} (test / answer ppl / control ppl)"
                                     for n in names) + " |", "|---:|" + "---:|" * len(names)]
    lam = [Rule(match="attention", value=MERGE_W), Rule(match="mlp", value=MERGE_W),
           Rule(match="*", value=0.0)]
    for s in lab.seeds:
        reasoning = lab.finetuned(task, s)
        delta = prior(lab, reasoning)
        runs = {
            "SFT": lab.finetuned(task, s, steps=steps),
            "DRIFT": lab.train(f"drift-{task.module}", base, task.path("train"), seed=s,
                               steps=steps, drift={"prior": str(delta), "mode": MODE,
                                                   "alpha": ALPHA}),
            "naive merge": lab.save(f"drift-naive-{MERGE_W:g}",
                                    task_arithmetic(load(base), [load(reasoning)], lambda_=lam),
                                    [identity(base), identity(reasoning), MERGE_W]),
            "θ_r (full FT)": reasoning,
        }
        for n, path in runs.items():
            score[n].append(lab.score(path, task))
            ans[n].append(lab.task_ppl(path, task))
            ppl[n].append(lab.control_ppl(path))
            if s == lab.seeds[0] and n != "θ_r (full FT)":
                points.append((n, score[n][-1], ppl[n][-1]))
        lines.append(f"| {s} | " + " | ".join(
            f"{score[n][-1]:.3f} / {ans[n][-1]:.2f} / {ppl[n][-1]:.2f}" for n in names) + " |")
    table = (f"Base model: test {base_score:.3f}, answer ppl {lab.task_ppl(base, task):.2f}, "
             f"control ppl {base_ppl:.2f}. SFT and DRIFT: {steps} updates; θ_r: "
             f"{lab.p.steps}; merge weight {MERGE_W:g}; DRIFT {MODE}, α = {ALPHA:g}.\n\n"
             + "\n".join(lines))
    return Row(
        "drift", "DRIFT",
        "with a prior from a task fine-tune standing in for the 'reasoning' variant, DRIFT ≥ "
        "plain SFT and ≥ the naive merge on that task", "2510.15050",
        [("DRIFT ≥ SFT", compare(score["DRIFT"], score["SFT"], strict=False)),
         ("DRIFT ≥ naive merge", compare(score["DRIFT"], score["naive merge"], strict=False))],
        "; ".join(f"{n} {Spread(score[n]).fmt()}" for n in names)
        + f" (test exact match; base {base_score:.3f})", table, PROTOCOL, points=points)
