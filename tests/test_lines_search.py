"""LiNeS coefficient search as a recipe step: the chosen value is the grid's best score, the
output equals LiNeS at that value, the scores are recorded, and planning runs no search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery import lines, load
from surgery.evaluate.scoring import CheckpointScorer
from tests.conftest import ROOT, fixture_dir, surgery

RECIPE = """\
inputs:
  base: {base}
  math: {math}
  code: {code}
steps:
  merged: {{op: task_arithmetic, base: base, models: [math, code]}}
  single: {{op: lines_search, base: base, model: code, grid: [0.0, 0.5], data: {data}}}
  multi:
    op: lines_search
    base: base
    model: merged
    tasks: [math, code]
    grid: [0.0, 1.0]
    data: {data}
output:
  - {{from: single, path: out/single}}
  - {{from: multi, path: out/multi}}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(RECIPE.format(base=fixture_dir("tiny-llama", "base"),
                                  math=fixture_dir("tiny-llama", "math"),
                                  code=fixture_dir("tiny-llama", "code"),
                                  data=ROOT / "fixtures/data/code.jsonl"))
    return path


def test_search_chooses_best_and_records_grid(recipe: Path, tmp_path: Path) -> None:
    plan = surgery("plan", str(recipe), cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert not (tmp_path / "out").exists()
    run = surgery("apply", str(recipe), "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    base = load(fixture_dir("tiny-llama", "base"))
    code = load(fixture_dir("tiny-llama", "code"))
    scorer = CheckpointScorer(ROOT / "fixtures/data/code.jsonl", "perplexity", device="cpu")
    record = json.loads((tmp_path / "out/single/provenance.json").read_text())
    search = record["sections"]["Search over c"]
    direct = [scorer(lines(base, code, c=c)) for c in (0.0, 0.5)]
    chosen = (0.0, 0.5)[min(range(2), key=lambda i: direct[i])]
    assert f"`c` = {chosen:g} chosen" in search
    for c, score in zip((0.0, 0.5), direct, strict=True):
        assert f"| {c:g} | {score:.6g}" in search
    out = load(tmp_path / "out/single")
    want = lines(base, code, c=chosen)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.5.self_attn.q_proj.weight"):
        assert torch.equal(out[name], want[name])
    multi = json.loads((tmp_path / "out/multi/provenance.json").read_text())
    assert "Search over beta" in multi["sections"]
    assert "Search over beta" in (tmp_path / "out/multi/README.md").read_text()


def test_empty_grid_is_a_recipe_error(recipe: Path, tmp_path: Path) -> None:
    recipe.write_text(recipe.read_text().replace("grid: [0.0, 0.5]", "grid: []"))
    res = surgery("plan", str(recipe), cwd=tmp_path)
    assert res.returncode == 2 and "steps.single.grid" in res.stderr


def test_metric_of_the_wrong_model_kind_fails_at_plan(recipe: Path, tmp_path: Path) -> None:
    recipe.write_text(recipe.read_text().replace(
        "grid: [0.0, 0.5], data:", "grid: [0.0, 0.5], metric: accuracy, data:"))
    res = surgery("plan", str(recipe), cwd=tmp_path)
    assert res.returncode == 2
    assert ("steps.single: model 'code': metric accuracy needs a sequence classifier, "
            "but the checkpoint is LlamaForCausalLM") in res.stderr
