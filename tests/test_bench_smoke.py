"""The merge benchmark end to end on its tiny size: builds the inputs, measures the I/O floor,
runs our linear and TIES merges and mergekit's, compares them and writes the report (no
timings asserted)."""

from __future__ import annotations

import re
from pathlib import Path

from bench.merge import main


def test_tiny_benchmark_runs_and_agrees_with_mergekit(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    main(["--tiny", "--methods", "linear,ties", "--out", str(out),
          "--cache", str(tmp_path / "c")])
    text = out.read_text()
    for method in ("linear", "ties"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        assert "failed" not in row and "n/a" not in row.split("|")[2], row
    assert re.search(r"ties, ours vs mergekit \(bf16 outputs\): \d+/\d+ elements", text)
    assert re.search(r"linear, ours vs mergekit \(bf16 outputs\): (\d+)/\1 elements "
                     r"bit-identical", text)
    assert "I/O floor:" in text
    assert not (tmp_path / "c" / "work").exists()  # temporary outputs are deleted
    assert (tmp_path / "c" / "tiny" / "complete.json").is_file()  # inputs are kept
