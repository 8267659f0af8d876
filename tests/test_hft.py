"""HFT half-reset: the category rule on Llama, GPT-2 and BERT naming, seeding, reporting."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from surgery import hft_reset, hft_selection, load
from surgery.recipe import build_recipe, run_recipe
from tests.conftest import write_checkpoint


def _llama_names(layers: int) -> list[str]:
    out = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        out += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        out += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return [*out, "model.norm.weight", "lm_head.weight"]


def _counts(mods: list[str]) -> Counter:
    return Counter("norm" if "norm" in m.lower() or ".ln_" in m
                   else "attn" if "attn" in m or "attention" in m else "mlp" for m in mods)


def test_llama_rule_two_of_four_attention_two_or_one_mlp_one_norm() -> None:
    sel = hft_selection(_llama_names(6), seed=0)
    assert sorted(sel) == list(range(6))
    mlp = []
    for mods in sel.values():
        c = _counts(mods)
        assert c["attn"] == 2 and c["norm"] == 1 and c["mlp"] in (1, 2)
        mlp.append(c["mlp"])
    assert sorted(mlp) == [1, 1, 1, 2, 2, 2]
    assert hft_selection(_llama_names(6), seed=0) == sel
    assert hft_selection(_llama_names(6), seed=1) != sel


def test_gpt2_and_bert_naming() -> None:
    gpt2 = [f"transformer.h.{i}.{m}.{w}" for i in range(4)
            for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
            for w in ("weight", "bias")]
    for mods in hft_selection(["transformer.wte.weight", *gpt2], seed=3).values():
        assert _counts(mods) == {"attn": 1, "mlp": 1, "norm": 1}
    bert = [f"bert.encoder.layer.{i}.{m}.{w}" for i in range(4)
            for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "attention.output.LayerNorm",
                      "intermediate.dense", "output.dense", "output.LayerNorm")
            for w in ("weight", "bias")]
    for mods in hft_selection(bert, seed=3).values():
        assert _counts(mods) == {"attn": 2, "mlp": 1, "norm": 1}


def test_reset_values_and_report(tmp_path: Path) -> None:
    names = _llama_names(2)
    g = torch.Generator().manual_seed(0)
    t0 = {n: torch.randn(3, generator=g) for n in names}
    t1 = {n: t + 1 for n, t in t0.items()}
    base = write_checkpoint(tmp_path / "b", t0)
    ft = write_checkpoint(tmp_path / "f", t1)
    out = hft_reset(load(base), load(ft), seed=5)
    reset = {m for mods in out.node.selection.values() for m in mods}
    assert out.node.selection == hft_selection(names, 5)
    for n in names:
        expected = t0[n] if n.removesuffix(".weight") in reset else t1[n]
        assert torch.equal(out[n], expected), n
    assert torch.equal(out["lm_head.weight"], t1["lm_head.weight"])
    with_head = hft_reset(load(base), load(ft), seed=5, reset_head=True, reset_embeddings=True)
    assert torch.equal(with_head["lm_head.weight"], t0["lm_head.weight"])
    assert torch.equal(with_head["model.embed_tokens.weight"], t0["model.embed_tokens.weight"])
    text = f"""
seed: 5
inputs: {{base: {base}, ft: {ft}}}
steps:
  half: {{op: hft_reset, base: base, model: ft}}
output: {{from: half, path: {tmp_path / "out"}}}
"""
    run_recipe(build_recipe(text))
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    first = sorted(reset)[0]
    assert prov["expression"]["selection"]["0"] == out.node.selection[0]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## HFT half-reset selection" in card and f"`{first}`" in card
    saved = load(tmp_path / "out").node.checkpoint
    assert all(torch.equal(saved.read(n), out[n]) for n in names)
