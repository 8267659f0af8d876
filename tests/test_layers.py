"""Layer surgery: outputs load in transformers and match the model with blocks removed in memory."""

from __future__ import annotations

import json
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

from surgery import drop_layers, keep_first_layers, load, stack_layers
from surgery.errors import ShapeMismatchError, UsageError
from surgery.recipe import build_recipe, run_recipe

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def _llama(path: Path, seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def _gpt2(path: Path) -> GPT2LMHeadModel:
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=4, n_head=2, n_positions=32)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


def _logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(IDS).logits


def _logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _keep_blocks(blocks: torch.nn.ModuleList, keep: list[int]) -> torch.nn.ModuleList:
    kept = torch.nn.ModuleList([blocks[i] for i in keep])
    for j, block in enumerate(kept):  # Llama attention layers know their index for the cache
        attn = getattr(block, "self_attn", None)
        if attn is not None:
            attn.layer_idx = j
    return kept


def test_drop_layers_llama_matches_in_memory_removal(tmp_path: Path) -> None:
    model = _llama(tmp_path / "llama")
    drop_layers(load(tmp_path / "llama"), [1, 2]).save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    names = load(tmp_path / "out").names
    assert "model.layers.1.mlp.up_proj.weight" in names
    assert not any(n.startswith("model.layers.2.") for n in names)
    model.model.layers = _keep_blocks(model.model.layers, [0, 3])
    model.config.num_hidden_layers = 2
    assert torch.equal(_logits(tmp_path / "out"), _logits_of(model))


def test_keep_first_layers_gpt2_tied_embeddings(tmp_path: Path) -> None:
    model = _gpt2(tmp_path / "gpt2")
    keep_first_layers(load(tmp_path / "gpt2"), 3).save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == 3
    assert "lm_head.weight" not in load(tmp_path / "out").names
    model.transformer.h = model.transformer.h[:3]
    model.config.n_layer = 3
    assert torch.equal(_logits(tmp_path / "out"), _logits_of(model))


def test_stack_and_interleave_two_models(tmp_path: Path) -> None:
    a = _llama(tmp_path / "a", seed=0)
    b = _llama(tmp_path / "b", seed=1)
    wa, wb = load(tmp_path / "a"), load(tmp_path / "b")
    out = stack_layers([(wa, 0, 2), (wb, 1, 3), (wa, 3, 4)])
    assert out.config["num_hidden_layers"] == 5
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(out[q.format(2)], b.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(out[q.format(4)], a.model.layers[3].self_attn.q_proj.weight)
    assert torch.equal(out["model.norm.weight"], a.model.norm.weight)
    out.save(tmp_path / "out")
    a.model.layers = _keep_blocks(torch.nn.ModuleList(
        [a.model.layers[0], a.model.layers[1], b.model.layers[1], b.model.layers[2],
         a.model.layers[3]]), list(range(5)))
    a.config.num_hidden_layers = 5
    assert torch.equal(_logits(tmp_path / "out"), _logits_of(a))


def test_per_layer_config_lists_follow_the_blocks(tmp_path: Path) -> None:
    _llama(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layer_types"] = ["a", "b", "c", "d"]
    cfg_path.write_text(json.dumps(cfg))
    assert drop_layers(load(tmp_path / "m"), range(1, 3)).config["layer_types"] == ["a", "d"]


def test_bad_layer_ranges(tmp_path: Path) -> None:
    _llama(tmp_path / "m")
    _llama(tmp_path / "wide", layers=2)
    m = load(tmp_path / "m")
    with pytest.raises(UsageError, match=r"^drop_layers: layers: block 4 is past the end .*4 bl"):
        drop_layers(m, [1, 4])
    with pytest.raises(UsageError, match=r"^drop_layers: range: block 4 is past the end"):
        drop_layers(m, range(2, 5))
    with pytest.raises(UsageError, match=r"^keep_first_layers: n: 5 is outside 1\.\.4"):
        keep_first_layers(m, 5)
    with pytest.raises(UsageError, match=r"^stack_layers: ranges\[1\]: \[1, 3\) is not"):
        stack_layers([(m, 0, 2), (load(tmp_path / "wide"), 1, 3)])
    with pytest.raises(UsageError, match="no blocks"):
        drop_layers(m, range(4))


def test_stacking_blocks_of_another_shape_is_refused(tmp_path: Path) -> None:
    _llama(tmp_path / "m")
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=24,
                                         num_hidden_layers=2, num_attention_heads=2))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ShapeMismatchError, match=r"block 0 of .*other differs"):
        stack_layers([(load(tmp_path / "m"), 0, 2), (load(tmp_path / "other"), 0, 1)])


def test_recipe_ops(tmp_path: Path) -> None:
    model = _llama(tmp_path / "m")
    text = f"""
inputs: {{m: {tmp_path / "m"}}}
steps:
  short: {{op: drop_layers, model: m, range: [1, 3]}}
  head: {{op: keep_first_layers, model: m, n: 1}}
output:
  - {{from: short, path: {tmp_path / "short"}}}
  - {{from: head, path: {tmp_path / "head"}}}
"""
    run_recipe(build_recipe(text))
    assert json.loads((tmp_path / "head" / "config.json").read_text())["num_hidden_layers"] == 1
    model.model.layers = _keep_blocks(model.model.layers, [0, 3])
    model.config.num_hidden_layers = 2
    assert torch.equal(_logits(tmp_path / "short"), _logits_of(model))
    bad = text.replace("range: [1, 3]", "range: [1, 9]")
    with pytest.raises(UsageError, match=r"steps\.short.*range: block 4 is past the end"):
        build_recipe(bad)
