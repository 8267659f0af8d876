"""LT-SFT (Composable Sparse Fine-Tuning, arXiv 2110.07560): a 5% sparse fine-tune against the
full fine-tune it is selected from, and two task deltas applied together."""

from __future__ import annotations

from pathlib import Path

from bench.fidelity.data import Task
from bench.fidelity.lab import Lab, Row, Spread, gain_ratio, identity, verdict
from surgery import apply_sparse_deltas, load, load_sparse_delta
from surgery.train import lt_sft

DENSITY = 0.05
KEEP = 0.9  # share of the gain the claims ask for

PROTOCOL = (
    f"per seed s and task, phase 1 is the row-shared full fine-tune `lab.finetuned(task, s)` "
    f"(passed to `surgery.train.lt_sft` as `phase1`); the mask is its top {DENSITY:.0%} of "
    "|θ1 − θ0| over the default maskable kinds (one global threshold); phase 2 retrains from "
    "θ0 with only the mask, with the same steps, batch size, learning rate (constant), "
    "max_length and seed as the full fine-tune, no L1 pull. Models are "
    "`apply_sparse_deltas(θ0, deltas)`. Figures are test exact match. Claim 1: on the target "
    f"task the sparse model's gain over the base is ≥ {KEEP:.0%} of the full fine-tune's "
    "(`gain_ratio`, every seed). Claim 2 (composition): the deltas of the two tasks applied "
    f"together keep ≥ {KEEP:.0%} of each single delta's gain on that delta's task (both "
    "tasks, every seed)."
)


def sparse_delta(lab: Lab, task: Task, seed: int) -> Path:
    """The LT-SFT delta file of ``task`` (cached), phase 1 the shared SFT."""
    phase1 = lab.finetuned(task, seed)
    settings = {"steps": lab.p.steps, "batch_size": lab.p.batch_size, "lr": lab.lr,
                "max_length": lab.p.max_length, "seed": seed, "device": lab.device}
    key = [identity(lab.models.lm), identity(task.path("train")), identity(phase1), DENSITY,
           settings]
    out = lab.made(f"lt-sft-{task.module}", key, lambda d: lt_sft(
        lab.models.lm, task.path("train"), out=d / "delta.safetensors", density=DENSITY,
        phase1=phase1, force=True, **settings))
    return out / "delta.safetensors"


def applied(lab: Lab, name: str, deltas: list[Path]) -> Path:
    w = apply_sparse_deltas(load(lab.models.lm), [load_sparse_delta(d) for d in deltas])
    return lab.save(name, w, [identity(lab.models.lm), *(identity(d) for d in deltas)])


def run(lab: Lab) -> Row:
    t0, t1 = lab.tasks[0], lab.tasks[1]
    base = {t.module: lab.score(lab.models.lm, t) for t in (t0, t1)}
    ratio, comp0, comp1 = [], [], []
    full_s, sparse_s, ctrl_full, ctrl_sparse, ctrl_comp = [], [], [], [], []
    lines = ["| seed | full FT | LT-SFT 5% | gain ratio | full FT (task 2) | LT-SFT 5% (task 2) "
             "| composed on task 1 | composed on task 2 | composed / single gain (1, 2) | "
             "control ppl: full, sparse, composed |", "|---:|" + "---:|" * 9]
    points: list[tuple[str, float, float]] = []
    for s in lab.seeds:
        d0, d1 = sparse_delta(lab, t0, s), sparse_delta(lab, t1, s)
        full0, full1 = lab.finetuned(t0, s), lab.finetuned(t1, s)
        single0 = applied(lab, f"lt-sft-{t0.module}", [d0])
        single1 = applied(lab, f"lt-sft-{t1.module}", [d1])
        both = applied(lab, f"lt-sft-{t0.module}+{t1.module}", [d0, d1])
        f0, f1 = lab.score(full0, t0), lab.score(full1, t1)
        s0, s1 = lab.score(single0, t0), lab.score(single1, t1)
        c0, c1 = lab.score(both, t0), lab.score(both, t1)
        full_s.append(f0)
        sparse_s.append(s0)
        ratio.append(gain_ratio(s0, base[t0.module], f0))
        comp0.append(gain_ratio(c0, base[t0.module], s0))
        comp1.append(gain_ratio(c1, base[t1.module], s1))
        ctrl_full.append(lab.control_ppl(full0))
        ctrl_sparse.append(lab.control_ppl(single0))
        ctrl_comp.append(lab.control_ppl(both))
        lines.append(f"| {s} | {f0:.3f} | {s0:.3f} | {ratio[-1]:.3f} | {f1:.3f} | {s1:.3f} | "
                     f"{c0:.3f} | {c1:.3f} | {comp0[-1]:.3f}, {comp1[-1]:.3f} | "
                     f"{ctrl_full[-1]:.2f}, {ctrl_sparse[-1]:.2f}, {ctrl_comp[-1]:.2f} |")
        if s == lab.seeds[0]:
            points += [(f"lt-sft {DENSITY:.0%}", s0, ctrl_sparse[-1]),
                       ("lt-sft composed", c0, ctrl_comp[-1])]
    table = (f"Task 1 (target) `{t0.module}`, task 2 `{t1.module}`; base test exact match "
             f"{base[t0.module]:.3f} and {base[t1.module]:.3f}. Gain ratios are (model − base)"
             " / (reference − base): the reference is the full FT for the sparse model, the "
             "single delta for the composed model (nan where the reference has no gain).\n\n"
             + "\n".join(lines))
    r, a, b = Spread(ratio), Spread(comp0), Spread(comp1)
    return Row(
        "lt_sft", "LT-SFT",
        "a 5% sparse fine-tune reaches ≥ 90% of full fine-tuning's gain; two task deltas "
        "compose", "2110.07560",
        [(f"LT-SFT {DENSITY:.0%} keeps ≥ {KEEP:.0%} of the full FT's gain",
          verdict([x - KEEP for x in ratio], strict=False)),
         (f"composed deltas keep ≥ {KEEP:.0%} of each single delta's gain",
          verdict([x - KEEP for x in comp0 + comp1], strict=False))],
        f"gain ratio {r.fmt()} (LT-SFT {Spread(sparse_s).fmt()} vs full FT "
        f"{Spread(full_s).fmt()}, base {base[t0.module]:.3f}); composed / single gain: task 1 "
        f"{a.fmt()}, task 2 {b.fmt()}", table, PROTOCOL, [], points)
