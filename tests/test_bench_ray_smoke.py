"""The Ray benchmark end to end on the tiny size with one worker: a cluster started with
`ray start`, the timed `surgery apply --ray auto`, byte identity with the single process and
the 405B estimate in the report (no timings asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("psutil")

from bench.merge import main
from bench.ray_merge import estimate


def test_tiny_ray_benchmark_runs_and_matches_the_single_process(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS-ray.md"
    main(["--ray", "--tiny", "--ray-workers", "1", "--out", str(out),
          "--cache", str(tmp_path / "c")])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| single process |")
    assert rows[2].startswith("| Ray, 1 worker |") and rows[2].endswith("| identical |")


def test_estimate_divides_the_bytes_among_nodes() -> None:
    table = estimate(params=1e9, models=4, bandwidth=1e9, nodes=(1, 2))
    # 1B bf16: 2 GB per model; 4 read + 1 written = 10 GB at 1 GB/s = 10 s (0.2 min) on one.
    assert "| 1 | 8.00 GB | 2.00 GB | 0.2 min |" in table
    assert "| 2 | 4.00 GB | 1.00 GB | 0.1 min |" in table
