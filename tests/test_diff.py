"""surgery diff: per-block statistics against direct computations, table and PNG."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from click.testing import CliRunner
from surgery_cli.main import main

from surgery.analysis import diff_checkpoints
from surgery.checkpoint import open_checkpoint
from surgery.names import block_label
from tests.conftest import small_tensors, write_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_hand_computed(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", {"layers.0.w": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    a = write_checkpoint(tmp_path / "a", {"layers.0.w": torch.tensor([2.0, 2.0, 1.0, 4.0])})
    b = write_checkpoint(tmp_path / "b", {"layers.0.w": torch.tensor([3.0, 2.0, 4.0, 3.0])})
    r = diff_checkpoints(open_checkpoint(a), open_checkpoint(b), open_checkpoint(base))
    (g,) = r.groups
    # A−B = [-1, 0, -3, 1]; τA = [1, 0, -2, 0]; τB = [2, 0, 1, -1]
    assert g.label == "block 0"
    assert g.diff_norm == math.sqrt(11)
    assert g.relative_diff == math.sqrt(11 / 25)
    assert g.changed_fraction == 0.75
    assert g.cosine == 0.0  # 1·2 + (−2)·1 = 0
    assert g.sign_agreement == 0.5  # both non-zero at entries 0 and 2: signs agree at 0 only


def test_equals_direct_computation(tmp_path: Path) -> None:
    paths = [write_checkpoint(tmp_path / f"m{i}", small_tensors(i)) for i in range(3)]
    r = diff_checkpoints(*(open_checkpoint(p) for p in paths))
    a, b, base = (small_tensors(i) for i in range(3))
    floats = [n for n in a if a[n].is_floating_point()]
    assert r.skipped == ["buffer.position_ids"]
    for g in r.groups:
        names = [n for n in floats if block_label(n) == g.label]
        da = torch.cat([(a[n].double() - b[n].double()).flatten() for n in names])
        ta = torch.cat([(a[n].double() - base[n].double()).flatten() for n in names])
        tb = torch.cat([(b[n].double() - base[n].double()).flatten() for n in names])
        assert math.isclose(g.diff_norm, float(da.norm()), rel_tol=1e-12)
        assert math.isclose(g.cosine, float(torch.dot(ta, tb) / (ta.norm() * tb.norm())),
                            rel_tol=1e-12)
        assert g.sign_agreement == float((ta.sign() == tb.sign()).double().mean())
        assert g.changed_fraction == float((da != 0).double().mean())
    assert [g.label for g in r.groups] == ["block 0", "block 1", "non-block"]
    assert r.total.numel == sum(a[n].numel() for n in floats)


def test_cli_table_and_png(tmp_path: Path) -> None:
    paths = [str(write_checkpoint(tmp_path / f"m{i}", small_tensors(i))) for i in range(3)]
    png = tmp_path / "diff.png"
    res = CliRunner().invoke(main, ["diff", paths[0], paths[1], "--base", paths[2],
                                    "--plot", str(png)])
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.output.splitlines() if ln.startswith("block ")]
    assert "cos(tA,tB)" in res.output and len(rows) == 2
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    inspect_png = tmp_path / "inspect.png"
    res = CliRunner().invoke(main, ["inspect", paths[0], "--plot", str(inspect_png)])
    assert res.exit_code == 0, res.output
    assert inspect_png.read_bytes()[:8] == PNG_MAGIC and inspect_png.stat().st_size > 10_000


def test_mismatch_is_usage_error(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", {"w": torch.zeros(2)})
    b = write_checkpoint(tmp_path / "b", {"v": torch.zeros(2)})
    res = CliRunner().invoke(main, ["diff", str(a), str(b)])
    assert res.exit_code == 2 and "tensor 'v' is in only one of" in res.output
