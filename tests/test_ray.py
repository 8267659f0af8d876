"""The Ray executor on a local cluster started here: linear, TIES, LiNeS (a whole-model
reduction) and DARE-TIES merges of the fixtures give the bytes of a single-process save; a
worker killed mid-shard is retried and the output is still identical; a shard that fails for
good names itself and its node and leaves the finished shards for the rerun to reuse."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from surgery.engine import save  # noqa: E402
from surgery.engine.distributed import KILL_ONCE_ENV, connect, save_ray  # noqa: E402
from surgery.errors import RunError  # noqa: E402
from surgery.recipe.build import build_recipe  # noqa: E402
from tests.conftest import FIXTURES, surgery  # noqa: E402

LLAMA = FIXTURES / "tiny-llama"
STEPS = {
    "linear": "{op: linear, models: [math, code]}",
    "ties": "{op: ties, base: base, models: [math, code], density: 0.3}",
    "lines": "{op: lines, base: base, model: summed, tasks: [math, code], beta: 0.5}",
    "dare_ties": "{op: dare_ties, base: base, models: [math, code], density: 0.5}",
}


def _recipe(step: str) -> str:
    return (f"seed: 3\ninputs: {{base: {LLAMA}/base, math: {LLAMA}/math, code: {LLAMA}/code}}\n"
            "steps:\n  summed: {op: task_arithmetic, base: base, models: [math, code]}\n"
            f"  merged: {STEPS[step]}\n"
            "output: {from: merged, path: unused, shard_size: 150KB}\n")


def _node(step: str):
    recipe = build_recipe(_recipe(step), f"{step}.yaml")
    return recipe.values["merged"].node, recipe.text


def _files(path: Path) -> dict[str, bytes]:
    # The card's title is the directory name; everything else must match byte for byte.
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.name != "README.md"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    faults = tmp_path_factory.mktemp("faults")
    os.environ[KILL_ONCE_ENV] = str(faults)  # workers inherit it at start
    if ray.is_initialized():
        ray.shutdown()
    connect("local", workers=2)
    yield faults
    ray.shutdown()
    os.environ.pop(KILL_ONCE_ENV, None)


@pytest.mark.parametrize("step", list(STEPS))
def test_ray_output_is_byte_identical(cluster: Path, tmp_path: Path, step: str) -> None:
    node, text = _node(step)
    local = save(node, tmp_path / "local", shard_size="150KB", seed=3, recipe_text=text)
    node, text = _node(step)
    res = save_ray(node, tmp_path / "ray", shard_size="150KB", seed=3, recipe_text=text)
    assert len(res.shards) == len(local.shards) >= 6
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


def test_killed_worker_is_retried_and_the_output_is_identical(cluster: Path,
                                                              tmp_path: Path) -> None:
    node, text = _node("ties")
    local = save(node, tmp_path / "local", shard_size="150KB", seed=3, recipe_text=text)
    victim = cluster / f"kill-{local.shards[2]}"
    victim.write_text("")
    events = []
    node, text = _node("ties")
    res = save_ray(node, tmp_path / "ray", shard_size="150KB", seed=3, recipe_text=text,
                   progress=events.append)
    assert not victim.exists()  # the task of that shard did kill its worker
    assert res.reused_shards == []
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    last = events[-1]
    assert last.done == last.total == len(node.names()) and last.bytes_done == last.bytes_total


def test_failed_shard_names_shard_and_node_and_the_rerun_resumes(cluster: Path,
                                                                 tmp_path: Path) -> None:
    node, text = _node("linear")
    local = save(node, tmp_path / "local", shard_size="150KB", seed=3, recipe_text=text)
    victim = local.shards[1]
    (cluster / f"kill-{victim}").write_text("")
    node, text = _node("linear")
    with pytest.raises(RunError, match=rf"shard {victim} failed on .*\(.*\) after 0 retries"):
        save_ray(node, tmp_path / "ray", shard_size="150KB", seed=3, recipe_text=text,
                 retries=0)
    assert not (tmp_path / "ray").exists() and (tmp_path / "ray.partial").is_dir()
    node, text = _node("linear")
    res = save_ray(node, tmp_path / "ray", shard_size="150KB", seed=3, recipe_text=text)
    assert victim not in res.reused_shards
    assert len(res.reused_shards) == len(local.shards) - 1  # the others finished anyway
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


def test_cli_apply_with_ray(cluster: Path, tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "tiny-llama", tmp_path / "fixtures" / "tiny-llama")
    recipe = _recipe("ties").replace(str(LLAMA), "fixtures/tiny-llama").replace(
        "path: unused", "path: out/ties")
    (tmp_path / "r.yaml").write_text(recipe)
    res = surgery("apply", "r.yaml", "--ray", "local", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "wrote " in res.stdout and (tmp_path / "out/ties/config.json").is_file()
    (tmp_path / "s.yaml").write_text(recipe.replace("shard_size: 150KB",
                                                    "shard_size: 150KB, executor: ray").replace(
        "out/ties", "out/ties2"))
    res = surgery("apply", "s.yaml", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # The recipes differ in text (so in provenance and shard metadata), not in tensors.
    a, b = (sorted((tmp_path / d).glob("*.safetensors")) for d in ("out/ties", "out/ties2"))
    assert len(a) == len(b) >= 6
    for x, y in zip(a, b, strict=True):
        tx, ty = load_file(str(x)), load_file(str(y))
        assert tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)
