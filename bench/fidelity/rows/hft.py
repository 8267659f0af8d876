"""Half fine-tuning (arXiv 2404.18466): train half of each block's parameter matrices (the
seeded selection of ``hft_selection``), or reset half of a full fine-tune to the base after
training; either should forget less than full fine-tuning at a comparable target score."""

from __future__ import annotations

from bench.fidelity.lab import Lab, Row, Spread, gain_ratio, identity, verdict
from surgery import hft_reset, load

COMPARABLE = 0.9

PROTOCOL = (
    "per seed s, the target task's plain fine-tune (every parameter) against HFT training "
    "(`trainable: hft`, selection seed s, the same steps, learning rate, data and seed) and "
    "against the post-hoc half-reset of the full fine-tune (`hft_reset`, seed s). Scores: test "
    "exact match and control perplexity. A method forgets less at a comparable target score "
    f"when its control perplexity is below the full fine-tune's and it keeps ≥ "
    f"{COMPARABLE:.0%} of the full fine-tune's gain over the base."
)


def run(lab: Lab) -> Row:
    task = lab.tasks[0]
    b_test, b_ppl = lab.score(lab.models.lm, task), lab.control_ppl(lab.models.lm)
    figs: dict[str, tuple[list[float], list[float]]] = {
        "full": ([], []), "HFT": ([], []), "half-reset": ([], [])}
    ok: dict[str, list[float]] = {"HFT": [], "half-reset": []}
    tbl = ["| seed | method | test exact match | gain kept | control ppl |",
           "|---:|---|---:|---:|---:|"]
    points = []
    for s in lab.seeds:
        full = lab.finetuned(task, s)
        hft = lab.train(f"hft-{task.module}", lab.models.lm, task.path("train"), seed=s,
                        trainable="hft", hft_seed=s)
        reset = hft_reset(load(lab.models.lm), load(full), seed=s)
        got = {"full": (lab.score(full, task), lab.control_ppl(full)),
               "HFT": (lab.score(hft, task), lab.control_ppl(hft)),
               "half-reset": tuple(lab.scores_of("hft-reset", reset, [identity(full), s],
                                                 [(task, "test"), (None, "control")]))}
        for m, (score, ppl) in got.items():
            figs[m][0].append(score)
            figs[m][1].append(ppl)
            kept = gain_ratio(score, b_test, got["full"][0])
            tbl.append(f"| {s} | {m} | {score:.3f} | {kept:.1%} | {ppl:.2f} |")
            if m != "full":  # +1 where the claim holds on this seed, -1 where not
                holds = ppl < got["full"][1] and kept >= COMPARABLE
                ok[m].append(1.0 if holds else -1.0)
            if s == lab.seeds[0]:
                points.append(({"full": "SFT"}.get(m, m), score, ppl))
    summary = "; ".join(f"{m}: test {Spread(v[0]).fmt()}, control ppl {Spread(v[1]).fmt(2)}"
                        for m, v in figs.items())
    return Row(
        "hft", "Half fine-tuning",
        "half fine-tuning (and the half-reset) forgets less than full fine-tuning at a "
        "comparable target score", "2404.18466",
        [("HFT training forgets less", verdict(ok["HFT"])),
         ("half-reset forgets less", verdict(ok["half-reset"]))],
        f"{summary} (base: test {b_test:.3f}, control ppl {b_ppl:.2f})",
        "\n".join(tbl), PROTOCOL, points=points)
