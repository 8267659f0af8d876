"""The CorDA preprocessing benchmark end to end on the tiny Llama (--quick): the three
contenders run in their own processes and the report is written (no timings asserted); ours
with float32 sums is PEFT's A and B bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

from bench.corda import main


def test_quick_corda_benchmark_runs_and_agrees_with_peft(tmp_path: Path) -> None:
    out = main(["--quick", "--examples", "6", "--cache", str(tmp_path / "c"), "--out",
                str(tmp_path / "CORDA.md")])
    assert out == tmp_path / "CORDA.md"
    text = out.read_text()
    assert "42 layers" in text and "6 calibration examples" in text
    rows = {m.group(1): m.group(2) for m in re.finditer(
        r"^\| (.+?) \| \d+\.\d\d s \| \d+\.\d\d GB \| \d+\.\d\d GB \| (.+) \|$", text, re.M)}
    assert set(rows) == {"weight-surgery `corda` (float64 sums)",
                         "weight-surgery `corda` (float32 sums)",
                         "PEFT `preprocess_corda` + corda init"}
    assert rows["weight-surgery `corda` (float32 sums)"] == "0.0e+00 / 0.0e+00 / 0.0e+00"
    worst = max(float(x) for x in rows["weight-surgery `corda` (float64 sums)"].split(" / "))
    assert 0 < worst < 0.05
    assert not list((tmp_path / "c").glob("*.safetensors"))  # the factors are deleted
