"""A disk that fills up during a run, through the real `surgery` command: exit 1 with one line
saying a rerun resumes, the finished shards kept, and the rerun (with space) equal to a clean
run. Needs a 1 MB tmpfs, so root; skips with the reason elsewhere."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fixture_dir, surgery

RECIPE = """\
inputs: {{a: {a}, b: {b}}}
steps: {{soup: {{op: linear, models: [a, b]}}}}
output: {{from: soup, path: {out}, shard_size: 300KB}}
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    except OSError as e:
        pytest.skip(f"cannot run mount to make a small disk ({e})")
    if res.returncode != 0:
        pytest.skip(f"mounting a 1 MB tmpfs is not permitted here (needs root): "
                    f"{res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_keeps_partial_output_and_rerun_resumes(small_disk: Path,
                                                          tmp_path: Path) -> None:
    text = RECIPE.format(a=fixture_dir("tiny-llama", "math"), b=fixture_dir("tiny-llama", "code"),
                         out="disk/soup")  # 1.09 MB of float32 shards: the fourth does not fit
    (tmp_path / "r.yaml").write_text(text)
    out = small_disk / "soup"
    res = surgery("apply", "-q", "r.yaml", cwd=tmp_path)
    assert res.returncode == 1
    partial = small_disk / "soup.partial"
    assert res.stderr.splitlines() == [
        f"error: {partial}: run failed (No space left on device); nothing was replaced, the "
        f"partial output in {partial} is resumed by rerunning the same command"]
    assert not out.exists()
    done = json.loads((partial / ".weight-surgery-partial.json").read_text())["shards"]
    assert sorted(p.name for p in partial.glob("*.safetensors")) == sorted(done)
    assert 1 <= len(done) < 4

    subprocess.run(["mount", "-o", "remount,size=4M", str(small_disk)], check=True)
    res = surgery("apply", "-q", "r.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"{len(done)} reused from an interrupted run" in res.stdout
    clean = tmp_path / "clean"  # the same recipe text (it is hashed into the shards)
    (clean / "disk").mkdir(parents=True)
    (clean / "r.yaml").write_text(text)
    assert surgery("apply", "-q", "r.yaml", cwd=clean).returncode == 0
    shards = sorted(p.name for p in (clean / "disk" / "soup").glob("*.safetensors"))
    assert len(shards) == 4
    for name in shards:
        assert (out / name).read_bytes() == (clean / "disk" / "soup" / name).read_bytes(), name


def test_disk_full_before_the_first_shard(small_disk: Path, tmp_path: Path) -> None:
    filler = small_disk / "filler"
    with pytest.raises(OSError, match="No space left"), filler.open("wb") as f:
        f.write(b"\0" * 2**21)
    (tmp_path / "r.yaml").write_text(RECIPE.format(a=fixture_dir("tiny-llama", "math"),
                                                   b=fixture_dir("tiny-llama", "code"),
                                                   out=small_disk / "soup"))
    res = surgery("apply", "-q", "r.yaml", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"error: {small_disk / 'soup.partial'}: cannot write (No space left on device); free "
        "some space or choose another output path, then rerun the same command"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=4M", str(small_disk)], check=True)
    assert surgery("apply", "-q", "r.yaml", cwd=tmp_path).returncode == 0
