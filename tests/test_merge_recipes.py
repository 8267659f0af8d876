"""The ties, dare, slerp and lines recipes run as written on a stand-in fixtures tree (tiny
llama base and fine-tunes with the fixtures' names and layer count); every output loads and
runs in transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery import load
from surgery.recipe import load_recipe, run_recipe
from tests.conftest import ROOT
from tests.tiny_models import make_family


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    family = tmp_path / "fixtures" / "tiny-llama"
    for path, name in zip(make_family(family, "llama", tasks=3),
                          ("base", "math", "code", "chat"), strict=True):
        path.rename(family / name)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("recipe", "outputs"), [
    ("ties", ["ties-math-code"]),
    ("dare", ["dare-linear-math-code", "dare-ties-math-code"]),
    ("slerp", ["slerp-math-code"]),
    ("lines", ["lines-math", "lines-math-code-chat"]),
])
def test_recipe_runs(workdir: Path, recipe: str, outputs: list[str]) -> None:
    run_recipe(load_recipe(f"recipes/{recipe}.yaml"))
    base = load("fixtures/tiny-llama/base")
    for out in outputs:
        model = AutoModelForCausalLM.from_pretrained(workdir / "out" / out).eval()
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]])).logits
        assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
        merged = load(workdir / "out" / out)
        name = "model.layers.5.mlp.up_proj.weight"
        assert not torch.equal(merged[name], base[name])
