"""Skill localization by grafting (arXiv 2302.06600): a graft of 1% of the classifier's block
weights against the fine-tune, a random mask of the same size, and no mask at all."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.fidelity.lab import Lab, Row, Spread, compare, gain_ratio, identity, verdict
from surgery import Mask, load_mask
from surgery.train import graft, graft_stitch

SPARSITY = 0.01
KEEP = 0.9  # share of the gain the claim asks for

PROTOCOL = (
    "per seed s, the row-shared classifier fine-tune `lab.classifier_finetuned(s)` (MiniLM-L6 "
    "with a new two-class head, every parameter trained) is grafted onto its start model with "
    f"`surgery.train.graft` at sparsity {SPARSITY:g} of the default graftable set (block "
    "weights of kinds attention and mlp), optimised on the classifier's training split for as "
    "many steps as the fine-tune has updates (batch 16, lr 1e7, c 10, seed s), rounded and "
    "scored every ⌈steps/6⌉ steps on train + validation, the best rounded mask kept. The head "
    "(pooler and classifier, kind head) is new: it has no pretrained value to fall back on, "
    "so a graft without it cannot classify, and it is larger than 1% of the graftable set "
    "(in MiniLM 149k entries against K = 106k), so it cannot share the budget either. We keep "
    "the API's default `rest: finetuned`, as the reference code does: every tensor outside "
    "the graftable set (head, embeddings, norms, biases) keeps the fine-tune's values. To "
    "show what the mask itself recovers, two controls keep the same rest: a random mask with "
    "the graft's count in every tensor (seeded with s), and no mask (θ0 on the whole "
    "graftable set); both are `graft_stitch` of the fine-tune with `rest` the fine-tune. "
    "Figures: test accuracy; gain ratio "
    "= (model − start) / (fine-tune − start). Claims: the graft's gain ratio ≥ 90%; the "
    "random mask's < 90%; the graft beats no mask (the 1% carries gain beyond the rest)."
)


def control_mask(graft_mask: Mask, seed: int, draw: bool) -> Mask:
    """Over the graft's tensors: with ``draw``, as many random entries per tensor as the
    graft's mask holds there; without, none (θ0 on the whole graftable set)."""
    return graft_mask.random_like(seed) if draw else Mask.empty(graft_mask.shapes)


def grafted(lab: Lab, tuned: Path, seed: int) -> Path:
    steps = lab.p.steps
    settings = {"steps": steps, "score_every": max(1, math.ceil(steps / 6)), "batch_size": 16,
                "max_length": lab.p.max_length, "seed": seed, "device": lab.device,
                "eval_data": str(lab.classify.labelled["validation"])}
    data = lab.classify.labelled["train"]
    key = [identity(lab.models.classifier), identity(tuned), identity(data),
           identity(lab.classify.labelled["validation"]), SPARSITY, settings]
    return lab.made("graft-clf", key, lambda out: graft(
        lab.models.classifier, tuned, data, sparsity=SPARSITY, out=out / "model",
        mask_out=out / "mask.safetensors", force=True, **settings))


def run(lab: Lab) -> Row:
    start = lab.models.classifier
    base = lab.accuracy(start)
    tuned_a, graft_a, random_a, rest_a = [], [], [], []
    ratio, random_r, rest_r = [], [], []
    lines = ["| seed | fine-tune | graft (best step) | random mask | no mask (rest only) | "
             "gain ratio: graft, random, no mask |", "|---:|---:|---:|---:|---:|---|"]
    share = ""
    for s in lab.seeds:
        tuned = lab.classifier_finetuned(s)
        made = grafted(lab, tuned, s)
        mask = load_mask(made / "mask.safetensors")
        record = json.loads((made / "model" / "provenance.json").read_text())
        best = record.get("graft", {}).get("best_step")
        share = (f"{mask.count():,} of {sum(math.prod(v) for v in mask.shapes.values()):,} "
                 "graftable entries")
        key = [identity(start), identity(tuned), identity(made / "mask.safetensors")]
        rand = lab.save("graft-random", graft_stitch(start, [tuned], [control_mask(
            mask, s, True)], rest=tuned), [*key, "random", s])
        rest = lab.save("graft-rest-only", graft_stitch(start, [tuned], [control_mask(
            mask, s, False)], rest=tuned), [*key, "rest"])
        t, g, r, n = (lab.accuracy(p) for p in (tuned, made / "model", rand, rest))
        tuned_a.append(t)
        graft_a.append(g)
        random_a.append(r)
        rest_a.append(n)
        ratio.append(gain_ratio(g, base, t))
        random_r.append(gain_ratio(r, base, t))
        rest_r.append(gain_ratio(n, base, t))
        lines.append(f"| {s} | {t:.3f} | {g:.3f} ({best}) | {r:.3f} | {n:.3f} | "
                     f"{ratio[-1]:.3f}, {random_r[-1]:.3f}, {rest_r[-1]:.3f} |")
    table = (f"Classifier: the True/False questions of `{lab.classify.module}`; start model "
             f"(new head) test accuracy {base:.3f}; the graft keeps {share} (sparsity "
             f"{SPARSITY:g}).\n\n" + "\n".join(lines))
    verdicts = [(f"graft keeps ≥ {KEEP:.0%} of the fine-tune's gain",
                 verdict([x - KEEP for x in ratio], strict=False)),
                (f"a random mask of equal size keeps < {KEEP:.0%}",
                 verdict([KEEP - x for x in random_r])),
                ("graft beats no mask (same rest)", compare(graft_a, rest_a))]
    claim = ("a graft of ≈ 1% of parameters recovers ≥ 90% of the fine-tune's gain; a random "
             "mask of equal size does not")
    return Row(
        "grafting", "Grafting", claim, "2302.06600", verdicts,
        f"test accuracy: fine-tune {Spread(tuned_a).fmt()}, graft {Spread(graft_a).fmt()} "
        f"(gain ratio {Spread(ratio).fmt()}), random mask {Spread(random_a).fmt()} "
        f"({Spread(random_r).fmt()}), no mask {Spread(rest_a).fmt()} ({Spread(rest_r).fmt()}); "
        f"start {base:.3f}", table, PROTOCOL)
