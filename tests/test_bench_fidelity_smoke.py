"""The fidelity benchmark end to end at ``--quick`` on the fixtures' tiny models: every row
produces its figures, verdicts and plots (no figure is asserted: the models are random)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.fidelity import data
from bench.fidelity.__main__ import ROWS, main
from bench.fidelity.lab import compare, gain_ratio, verdict

pytestmark = pytest.mark.skipif(not data.FORTUNES.is_dir(),
                                reason="Debian's fortunes package is not installed (control "
                                "text); .ci/run installs it")


def test_every_row_reports_figures_verdicts_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "FIDELITY.md"
    assert main(["--quick", "--models", "fixtures", "--out", str(out)]) == 0
    text = out.read_text()
    table = [x for x in text.splitlines() if x.startswith("| ") and "`python -m bench" in x]
    assert len(table) == len(ROWS)
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.search(r"\d\.\d", cells[2]), line  # figures
        assert re.search(r"\*\*(reproduced|not reproduced at this scale)", cells[3]), line
    for key in ROWS:
        assert f"--only {key} --quick" in text
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert "FIDELITY-forgetting.png" in text and "FIDELITY-greedy-soup.png" in text


def test_generated_splits_are_disjoint_and_reproducible(tmp_path: Path) -> None:
    counts = {"train": 30, "validation": 10, "test": 10}
    t = data.task("numbers__place_value", counts)
    qs = {s: [line for line in t.path(s).read_text().splitlines()] for s in counts}
    assert [len(v) for v in qs.values()] == [30, 10, 10]
    assert len(set(qs["train"]) | set(qs["validation"]) | set(qs["test"])) == 50
    first = t.path("test").read_text()
    for f in t.files.values():
        f.unlink()
    assert data.task("numbers__place_value", counts).path("test").read_text() == first
    assert '"completion": " ' in first and "Question: " in first


def test_unknown_module_names_the_known_ones() -> None:
    with pytest.raises(SystemExit, match=r"module numbers__nope: unknown module .*"
                                         r"numbers__place_value"):
        data.task("numbers__nope", {"train": 1})


def test_verdicts_need_every_seed() -> None:
    assert verdict([0.1, 0.2]) == "reproduced"
    assert verdict([0.1, -0.01]) == "not reproduced at this scale"
    assert verdict([0.0, 0.0]) == "not reproduced at this scale"
    assert verdict([0.0, 0.0], strict=False) == "reproduced"
    assert verdict([0.3]) == "reproduced (1 seed, no spread)"
    assert verdict([float("nan")], strict=False) == "not reproduced at this scale"
    # lower is better: 10 < 12 on both seeds
    assert compare([10.0, 11.0], [12.0, 11.5], higher_is_better=False) == "reproduced"
    assert gain_ratio(0.5, 0.2, 0.8) == pytest.approx(0.5)
