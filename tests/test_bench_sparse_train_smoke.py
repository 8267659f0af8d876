"""The sparse-training benchmark end to end on the tiny fixture model: phase 1 once, then
LT-SFT's phase 2 and the full fine-tune step in their own processes on the same batches, and
the report written (no timings asserted)."""

from __future__ import annotations

import re
from pathlib import Path

from bench.sparse_train import NAMES, main


def test_tiny_sparse_training_benchmark_runs_both_on_the_same_batches(tmp_path: Path) -> None:
    out = tmp_path / "TRAIN-sparse.md"
    main(["--quick", "--steps", "3", "--out", str(out), "--cache", str(tmp_path / "c")])
    text = out.read_text()
    for name in NAMES.values():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert re.search(r"\| \d+\.\d{4} \| \d+\.\d\d GB \| [\d.]+ s \|$", row), row
    assert "K = 2,457 entries in " in text  # ⌊0.01 · 245,760 maskable parameters⌋
    assert re.search(r"step time, phase 2 / full: \*\*\d+\.\d\dx\*\*", text)
    rows = [re.match(r"\| (\d+) \| (\S+) \| (\S+) \|$", line) for line in text.splitlines()]
    losses = [m.groups() for m in rows if m]
    assert [int(u) for u, _, _ in losses] == [1, 2, 3]
    assert losses[0][1] == losses[0][2]  # both start from the base on the same first batch
    c = tmp_path / "c"
    assert not [p for p in c.iterdir() if p.is_dir()]  # outputs, phase 1 and caches deleted
