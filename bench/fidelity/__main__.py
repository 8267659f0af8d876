"""Fidelity benchmark: each method's published direction of effect, tested on real pretrained
models and third-party task data (see ``bench/fidelity/__init__.py``).

    python -m bench.fidelity                       # every row, writes bench/FIDELITY.md
    python -m bench.fidelity --quick               # fewer steps and examples, same rows
    python -m bench.fidelity --only soups,hft --tasks numbers__place_value,comparison__pair
    python -m bench.fidelity --quick --models fixtures --out /tmp/f/FIDELITY.md   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import platform
import sys
import time
from pathlib import Path

from bench.fidelity import report
from bench.fidelity.lab import PROFILES, Lab
from bench.fidelity.models import models

HERE = Path(__file__).resolve().parents[1]
# Row key -> module of bench.fidelity.rows; the report keeps this order.
ROWS = {"soups": "soups", "multi_task": "merges", "lines_single": "lines", "hft": "hft",
        "lt_sft": "lt_sft", "grafting": "graft", "corda": "corda", "drift": "drift",
        "pruning": "pruning", "objectives": "objectives"}
DEFAULT_TASKS = "numbers__place_value,comparison__pair"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=DEFAULT_TASKS,
                    help="two mathematics_dataset modules, comma-separated: the first is the "
                    "target task of single-task rows, both are merged in multi-task rows")
    ap.add_argument("--classify", default="comparison__pair",
                    help="module whose True/False questions the classifier rows use")
    ap.add_argument("--only", help="comma-separated rows: " + ", ".join(ROWS))
    ap.add_argument("--quick", action="store_true", help="fewer steps and examples")
    ap.add_argument("--seeds", type=int, help="seeds per row (default: the profile's)")
    ap.add_argument("--models", default="real", choices=["real", "fixtures"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=HERE / "FIDELITY.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if len(tasks) != 2:
        raise SystemExit(f"--tasks needs two modules, got {len(tasks)}")
    only = list(ROWS) if not args.only else [r.strip() for r in args.only.split(",")]
    unknown = [r for r in only if r not in ROWS]
    if unknown:
        raise SystemExit(f"--only: unknown row(s) {', '.join(unknown)}; rows: "
                         f"{', '.join(ROWS)}")
    profile = PROFILES["quick" if args.quick else "full"]
    if args.seeds:
        profile = dataclasses.replace(profile, seeds=args.seeds)
    if args.device == "cuda":  # more steps where a GPU makes them cheap
        profile = dataclasses.replace(profile, steps=profile.steps * 4,
                                      train=profile.train * 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lab = Lab(profile, models(args.models), tasks, args.classify, args.device,
              args.out.parent, args.models == "fixtures")
    t0 = time.perf_counter()
    command = ("python -m bench.fidelity "
               + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    rows = []
    for key in only:
        lab.log(f"row {key}")
        t, c = time.perf_counter(), lab.compute
        row = importlib.import_module(f"bench.fidelity.rows.{ROWS[key]}").run(lab)
        row.seconds, row.compute = time.perf_counter() - t, lab.compute - c
        rows.append(row)
        lab.log(f"row {key} done in {row.seconds:.0f}s: "
                + "; ".join(f"{c}: {v}" for c, v in row.verdicts))
        # after every row, so that an interrupted run leaves the rows it finished
        report.write(args.out, rows, lab, command, time.perf_counter() - t0,
                     platform.processor() or platform.machine(),
                     pending=only[len(rows):])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
