"""LiNeS on one task (arXiv 2410.17146): scale the task vector by depth, λ(l) = c + (1 − c)·l/(L−1),
so shallow blocks move back toward the pretrained model: the target task should keep its
gain while the control text's perplexity recovers toward the base."""

from __future__ import annotations

from bench.fidelity.lab import Lab, Row, Spread, gain_ratio, identity, verdict
from surgery import lines, load

GRID = (0.0, 0.2, 0.4, 0.6, 0.8)
KEEP = 0.95

PROTOCOL = (
    "per seed, the target task's plain fine-tune; LiNeS in its single-task form "
    f"(α = c, β = 1 − c) for c in {list(GRID)}; c is the smallest whose validation exact "
    f"match keeps ≥ {KEEP:.0%} of the fine-tune's validation gain over the base (c = 1, the "
    "fine-tune itself, if none does). On test: the share of the fine-tune's gain kept, and "
    "the control perplexity of base, fine-tune and LiNeS. Verdicts: share ≥ 95%; LiNeS's "
    "control perplexity below the fine-tune's."
)


def run(lab: Lab) -> Row:
    task = lab.tasks[0]
    base_path = lab.models.lm
    base = load(base_path)
    b_test, b_val = lab.score(base_path, task), lab.score(base_path, task, "validation")
    b_ppl = lab.control_ppl(base_path)
    kept, ppl_ft, ppl_l, points = [], [], [], []
    tbl = ["| seed | c chosen | test: base → fine-tune → LiNeS | gain kept | control ppl: "
           "base, fine-tune, LiNeS |", "|---:|---:|---|---:|---|"]
    for s in lab.seeds:
        ft = lab.finetuned(task, s)
        ft_test, ft_val = lab.score(ft, task), lab.score(ft, task, "validation")
        key = [identity(ft)]
        chosen = 1.0
        for c in GRID:
            (v,) = lab.scores_of("lines-c", lines(base, load(ft), c=c), [key, c],
                                 [(task, "validation")])
            if gain_ratio(v, b_val, ft_val) >= KEEP:
                chosen = c
                break
        test, ppl = lab.scores_of("lines-c", lines(base, load(ft), c=chosen), [key, chosen],
                                  [(task, "test"), (None, "control")])
        kept.append(gain_ratio(test, b_test, ft_test))
        ppl_ft.append(lab.control_ppl(ft))
        ppl_l.append(ppl)
        tbl.append(f"| {s} | {chosen:g} | {b_test:.3f} → {ft_test:.3f} → {test:.3f} | "
                   f"{kept[-1]:.1%} | {b_ppl:.2f}, {ppl_ft[-1]:.2f}, {ppl:.2f} |")
        if s == lab.seeds[0]:
            points += [("base", b_test, b_ppl), ("SFT", ft_test, ppl_ft[-1]),
                       (f"LiNeS c={chosen:g}", test, ppl)]
    return Row(
        "lines_single", "LiNeS, single task",
        f"LiNeS keeps ≥ {KEEP:.0%} of the target-task gain while the control perplexity "
        "recovers toward the base", "2410.17146",
        [(f"gain kept ≥ {KEEP:.0%}", verdict([k - KEEP for k in kept], False)),
         ("control ppl below the fine-tune's", verdict([f - x for f, x in
                                                        zip(ppl_ft, ppl_l, strict=True)]))],
        f"gain kept {Spread(kept).fmt()}; control ppl base {b_ppl:.2f}, fine-tune "
        f"{Spread(ppl_ft).fmt(2)}, LiNeS {Spread(ppl_l).fmt(2)}",
        "\n".join(tbl), PROTOCOL, points=points)
