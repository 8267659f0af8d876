"""Output directories: shards and index, byte-identical reruns, partial writes, resume, force."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from surgery import linear, load, task_arithmetic
from surgery.errors import OutputExistsError
from tests.conftest import ROOT, small_tensors, write_checkpoint


def test_shards_index_and_side_files(three_models: list[Path], tmp_path: Path) -> None:
    models = [load(p) for p in three_models]
    res = linear(models).save(tmp_path / "out", shard_size=100, dtype="bfloat16")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == res.shards
    assert len(res.shards) > 2
    expected = small_tensors(0)
    for name, fname in index["weight_map"].items():
        with safe_open(str(out / fname), "pt") as f:  # the reference reader accepts our files
            t = f.get_tensor(name)
        want = (sum(small_tensors(i)[name].float() for i in range(3)) / 3
                if expected[name].is_floating_point() else expected[name])
        assert t.dtype == (torch.bfloat16 if want.is_floating_point() else torch.int64)
        assert torch.equal(t, want.to(t.dtype))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    prov = json.loads((out / "provenance.json").read_text())
    assert [i["source"] for i in prov["inputs"]] == [str(p) for p in three_models]
    assert all(len(f["sha256"]) == 64 for i in prov["inputs"] for f in i["files"])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # save's default, "auto"
    assert prov["device"] == device
    with safe_open(str(out / res.shards[0]), "pt") as f:
        meta = json.loads(f.metadata()["weight_surgery"])
    assert meta["inputs"][0]["source"] == str(three_models[0])
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "arXiv 2203.05482" in card
    assert f"computed on the {device}, seed 0." in card
    assert not (tmp_path / "out.partial").exists()


def test_two_runs_are_byte_identical(three_models: list[Path], tmp_path: Path) -> None:
    base, *fts = (load(p) for p in three_models)
    for name in ("a", "b"):
        task_arithmetic(base, fts, lambda_=0.3).save(tmp_path / name, shard_size=150, seed=7)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        a, b = ((tmp_path / d / f).read_bytes() for d in "ab")
        if f == "README.md":  # the card's title is the output directory's name
            a, b = a.replace(b"# a\n", b""), b.replace(b"# b\n", b"")
        assert a == b, f


def test_existing_output_and_overlap_with_inputs(three_models: list[Path], tmp_path: Path) -> None:
    soup = linear([load(p) for p in three_models])
    soup.save(tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        soup.save(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    with pytest.raises(OutputExistsError, match="overlap input"):
        soup.save(three_models[0], force=True)
    with pytest.raises(OutputExistsError, match="overlap input"):
        soup.save(three_models[0] / "sub")
    linear([load(p) for p in three_models[:2]]).save(tmp_path / "out", force=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != before


KILL_SCRIPT = """
import sys, time
from surgery import load, linear
paths = sys.argv[1:4]
out = sys.argv[4]
slow = sys.argv[5] == "slow"
def progress(event):
    if slow and event.phase == "write":
        time.sleep(0.05)
linear([load(p) for p in paths]).save(out, shard_size=4096, progress=progress)
"""


def _many_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 32, generator=g)
            for i in range(40)}


def test_killed_run_leaves_nothing_complete_and_resumes(tmp_path: Path) -> None:
    paths = [str(write_checkpoint(tmp_path / f"m{i}", _many_tensors(i))) for i in range(3)]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *paths, str(out), "slow"],
                            env=env)
    marker = tmp_path / "out.partial" / ".weight-surgery-partial.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if marker.is_file() and len(json.loads(marker.read_text() or "{}")
                                    .get("shards", {})) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave an output that looks complete"
    done = json.loads(marker.read_text())["shards"]
    assert 3 <= len(done) < 40
    # corrupt one finished shard: it must be recomputed, not reused
    victim = sorted(done)[0]
    (tmp_path / "out.partial" / victim).write_bytes(b"garbage")
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, *paths, str(out), "fast"], env=env,
                   check=True)
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, *paths, str(clean), "fast"], env=env,
                   check=True)
    assert not (tmp_path / "out.partial").exists()
    for f in sorted(p.name for p in clean.iterdir() if p.name != "README.md"):
        assert (out / f).read_bytes() == (clean / f).read_bytes(), f


def test_resume_reports_reused_shards(tmp_path: Path) -> None:
    paths = [write_checkpoint(tmp_path / f"m{i}", _many_tensors(i)) for i in range(2)]
    soup = linear([load(p) for p in paths])
    first = soup.save(tmp_path / "x", shard_size=4096)
    # Simulate the state an interrupted run leaves: the same directory, not yet renamed.
    os.replace(tmp_path / "x", tmp_path / "y.partial")
    (tmp_path / "y.partial" / ".weight-surgery-partial.json").write_text(json.dumps(
        {"fingerprint": "stale", "shards": {}}))
    again = soup.save(tmp_path / "y", shard_size=4096)
    assert again.reused_shards == []  # a different plan fingerprint reuses nothing
    assert first.shards == again.shards


def test_foreign_partial_directory_is_not_deleted(three_models: list[Path],
                                                   tmp_path: Path) -> None:
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "precious.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not made by weight-surgery"):
        linear([load(p) for p in three_models]).save(tmp_path / "out")
    assert (tmp_path / "out.partial" / "precious.txt").read_text() == "mine"
