"""`surgery methods` lists every registered operation with parameters, defaults, reference."""

from __future__ import annotations

from click.testing import CliRunner
from surgery_cli.main import main

from surgery.methods.registry import OPERATIONS


def test_methods_lists_every_operation() -> None:
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    for name in OPERATIONS:
        assert f"\n{name}: " in "\n" + result.output
    assert "ties: Trim, elect sign, disjoint merge of task vectors [TIES-merging, arXiv " \
           "2306.01708]" in result.output
    assert "    density: schedule or {per_model: [schedule, ...]}, required - fraction of each " \
           "task vector kept" in result.output
    assert "    lambda: schedule, default 1.0" in result.output
    assert "    consensus: sum|count, default 'sum'" in result.output


def test_methods_one_and_unknown() -> None:
    one = CliRunner().invoke(main, ["methods", "lines"])
    assert one.exit_code == 0 and one.output.startswith("lines: ")
    assert "    c: float, default None - single task: alpha = c, beta = 1 - c" in one.output
    assert one.output.count("\n") == 8
    bad = CliRunner().invoke(main, ["methods", "tie"])
    assert bad.exit_code == 2 and "unknown operation 'tie'" in bad.output
