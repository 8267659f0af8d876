"""The sparse, HFT and layer-surgery recipes run as written, on a stand-in fixtures tree of
tiny transformers models with the fixtures' families and layer counts; every output loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from surgery import extract_sparse_delta, load
from surgery.recipe import load_recipe, run_recipe
from tests.conftest import ROOT


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    llama = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    for i, name in enumerate(("base", "math", "code", "chat")):
        torch.manual_seed(i)
        LlamaForCausalLM(llama).save_pretrained(tmp_path / "fixtures" / "tiny-llama" / name)
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=4, n_head=2)).save_pretrained(
        tmp_path / "fixtures" / "tiny-gpt2" / "base")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _runs(path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 32) and torch.isfinite(logits).all()


def test_layer_recipe(workdir: Path) -> None:
    run_recipe(load_recipe("recipes/layers.yaml"))
    layers = {"llama-drop-2-3": 4, "gpt2-first-2": 2, "llama-math-code-stack": 8}
    for name, count in layers.items():
        config = json.loads((workdir / "out" / name / "config.json").read_text())
        assert config.get("num_hidden_layers", config.get("n_layer")) == count
        _runs(workdir / "out" / name)


def test_sparse_and_hft_recipes(workdir: Path) -> None:
    base = load("fixtures/tiny-llama/base")
    for task in ("math", "code"):
        extract_sparse_delta(base, load(f"fixtures/tiny-llama/{task}")).save(
            f"out/{task}.delta.safetensors")
    for recipe in ("sparsify", "sparse-compose", "hft"):
        run_recipe(load_recipe(f"recipes/{recipe}.yaml"))
    for out in ("sparsify-math-1pct", "sparse-math-code", "sparse-code-only", "hft-chat"):
        _runs(workdir / "out" / out)
    assert "HFT half-reset selection" in (workdir / "out" / "hft-chat" / "README.md").read_text()
