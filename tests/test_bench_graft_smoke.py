"""The grafting benchmark end to end on a tiny fixture model (no timings asserted)."""

from __future__ import annotations

import re
from pathlib import Path

from bench.graft import main, noisy_finetune

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "fixtures" / "tiny-llama"


def test_tiny_grafting_benchmark_reports_both_steps(tmp_path: Path) -> None:
    out = main(["--model", str(LLAMA / "base"), "--data", str(ROOT / "fixtures/data/math.jsonl"),
                "--steps", "3", "--batch-size", "4", "--out", str(tmp_path / "G.md"),
                "--cache", str(tmp_path / "c")])
    text = out.read_text()
    for row in ("| grafting mask step", "| plain full fine-tune step"):
        line = next(x for x in text.splitlines() if x.startswith(row))
        assert re.search(r"\| \d+\.\d{4} s \|$", line), line
    assert re.search(r"Mask step / full step: \d+\.\d\dx\.", text)
    assert "221,184 graftable entries in 42 block weight tensors, mask of K = 2,211" in text
    # the default fine-tune: the base plus seeded noise, made once
    made = noisy_finetune(LLAMA / "base", tmp_path / "c", 0)
    assert made == noisy_finetune(LLAMA / "base", tmp_path / "c", 0)
