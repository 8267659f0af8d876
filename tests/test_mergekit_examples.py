"""An external suite: mergekit's own configs run through both tools.

The configs are those of mergekit's repository ``examples/`` folder and the merge configs of its
0.1.5 test suite (``tests/test_basic_merges.py``, ``test_chat_template.py``,
``test_tokenizer.py``), transcribed as data, with their model names rewritten to fixture models
of the right shape (13B Llama-2 models become the tiny-llama fixtures and their 40-layer ranges
scale to its 6 layers; GPT-2 becomes tiny-gpt2). Each runs through mergekit's ``run_merge`` and
through ``surgery``'s translation:

- ``exact``: bit for bit once ``dtype`` (mergekit's compute dtype) is float32, our compute
  dtype; as written (float16/bfloat16 compute) the outputs agree to the rounding of the inputs
  mergekit does first (relative error per tensor below 1e-2) and have the same dtypes;
- ``stat``: the random methods (DARE), compared by statistics;
- ``refused``: a one-line error naming the key and its YAML line, with the reason.

The README's table "mergekit's own configs" lists the same cases.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from surgery.errors import UsageError
from surgery.recipe import run_recipe
from surgery.recipe.mergekit import load_mergekit
from tests.conftest import fixture_dir

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit (the oracle) missing")

LLAMA = {n: str(fixture_dir("tiny-llama", n)) for n in ("base", "math", "code", "chat")}
GPT2 = str(fixture_dir("tiny-gpt2", "math"))

# Model names in the configs -> fixtures of the same shape family.
NAMES = {
    "psmathur/orca_mini_v3_13b": LLAMA["math"],
    "garage-bAInd/Platypus2-13B": LLAMA["code"],
    "WizardLM/WizardLM-13B-V1.2": LLAMA["chat"],
    "WizardLM/WizardMath-13B-V1.0": LLAMA["chat"],
    "TheBloke/Llama-2-13B-fp16": LLAMA["base"],
    "mistralai/Mistral-7B-v0.1": LLAMA["base"],
    "mistralai/Mistral-7B-Instruct-v0.2": LLAMA["math"],
    "BioMistral/BioMistral-7B": LLAMA["code"],
    "model_a": LLAMA["math"], "model_b": LLAMA["code"], "model_c": LLAMA["base"],
    "gpt2_like": GPT2,
}
LAYERS = {"examples": 40, "tests": 6}  # block count of the configs' models (13B Llama: 40)


def two(method: str, base: str | None = None, **params: Any) -> dict[str, Any]:
    """The two-model config of mergekit's test_basic_merges.py."""
    config: dict[str, Any] = {
        "merge_method": method, "dtype": "bfloat16",
        "models": [{"model": "model_a", "parameters": {"weight": 0.6}},
                   {"model": "model_b", "parameters": {"weight": 0.4}}]}
    if base:
        config["base_model"] = base
    if params:
        config["parameters"] = params
    return config


def bare(method: str, base: str | None = None, **params: Any) -> dict[str, Any]:
    """:func:`two` without the weights (for methods that take none)."""
    config = two(method, base, **params)
    config["models"] = [{"model": m["model"]} for m in config["models"]]
    return config


WEIGHTLESS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("model_stock", "model_c", {}), ("model_stock", "model_c", {"filter_wise": True}),
    ("karcher", "model_c", {"max_iter": 5, "tol": 1e-5}), ("sce", "model_c", {"select_topk": 0.5}),
    ("ram", "model_c", {}), ("ramplus_tl", "model_c", {"r": 0.05, "alpha": 1.0}),
    ("nearswap", "model_a", {"t": 0.0001}), ("arcee_fusion", "model_a", {}),
]

CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    # examples/ (mergekit's repository)
    "examples/linear.yml": ({
        "models": [{"model": "psmathur/orca_mini_v3_13b", "parameters": {"weight": 1.0}},
                   {"model": "WizardLM/WizardLM-13B-V1.2", "parameters": {"weight": 0.3}},
                   {"model": "garage-bAInd/Platypus2-13B", "parameters": {"weight": 0.5}}],
        "merge_method": "linear", "dtype": "float16"}, "exact", ""),
    "examples/gradient-slerp.yml": ({
        "slices": [{"sources": [{"model": "psmathur/orca_mini_v3_13b", "layer_range": [0, 40]},
                                {"model": "garage-bAInd/Platypus2-13B",
                                 "layer_range": [0, 40]}]}],
        "merge_method": "slerp", "base_model": "psmathur/orca_mini_v3_13b",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                             {"value": 0.5}]},
        "dtype": "float16"}, "exact", ""),
    "examples/orcamini-platy-44layer.yml": ({
        "slices": [{"sources": [{"model": "psmathur/orca_mini_v3_13b", "layer_range": [0, 24]}]},
                   {"sources": [{"model": "garage-bAInd/Platypus2-13B",
                                 "layer_range": [20, 40]}]}],
        "merge_method": "passthrough", "dtype": "float16"}, "exact", ""),
    "examples/bio-merge.yml": ({
        "models": [{"model": "mistralai/Mistral-7B-Instruct-v0.2",
                    "parameters": {"density": 0.5, "weight": 0.5}},
                   {"model": "BioMistral/BioMistral-7B",
                    "parameters": {"density": 0.5, "weight": 0.5}}],
        "merge_method": "ties", "base_model": "mistralai/Mistral-7B-v0.1",
        "parameters": {"normalize": False, "int8_mask": True}, "dtype": "float16"},
        "exact", ""),
    "examples/ties.yml": ({
        "models": [{"model": "psmathur/orca_mini_v3_13b",
                    "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                   {"model": "garage-bAInd/Platypus2-13B",
                    "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                   {"model": "WizardLM/WizardMath-13B-V1.0",
                    "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                               {"value": 0}]}}],
        "merge_method": "ties", "base_model": "TheBloke/Llama-2-13B-fp16",
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float16"},
        "exact", ""),
    "examples/arcee_fusion.yml": ({
        "models": [{"model": "model_a"}, {"model": "model_b"}],
        "merge_method": "arcee_fusion", "base_model": "model_a", "dtype": "bfloat16"},
        "exact", ""),
    # tests/ of mergekit 0.1.5
    "tests: passthrough copy": ({"merge_method": "passthrough", "dtype": "bfloat16",
                                 "models": [{"model": "model_a"}]}, "exact", ""),
    "tests: gpt2 copy": ({"merge_method": "passthrough", "dtype": "bfloat16",
                          "models": [{"model": "gpt2_like"}]}, "exact", ""),
    "tests: gpt2 stack": ({"merge_method": "passthrough", "dtype": "bfloat16",
                           "slices": [{"sources": [{"model": "gpt2_like",
                                                    "layer_range": [0, 4]}]}] * 2},
                          "exact", ""),
    "tests: passthrough scale": ({"merge_method": "passthrough", "models": [
        {"model": "model_a", "parameters": {"scale": [{"filter": "o_proj", "value": 0},
                                                      {"value": 1}]}}]}, "exact", ""),
    "tests: linear": (two("linear"), "exact", ""),
    # mergekit's slerp ignores the per-model weight of the two-model config; we refuse it
    "tests: slerp": ({**two("slerp", "model_a"), "parameters": {"t": 0.35}}, "refused",
                     r"slerp has no parameter 'weight'"),
    "tests: slerp, weights removed": ({
        "merge_method": "slerp", "base_model": "model_a", "dtype": "bfloat16",
        "models": [{"model": "model_a"}, {"model": "model_b"}], "parameters": {"t": 0.35}},
        "exact", ""),
    "tests: task_arithmetic": (two("task_arithmetic", "model_c"), "exact", ""),
    "tests: ties": (two("ties", "model_c", density=0.3), "exact", ""),
    "tests: dare_ties": (two("dare_ties", "model_c", density=0.66), "stat", ""),
    "tests: breadcrumbs": (two("breadcrumbs", "model_c"), "exact", ""),
    "tests: della": (two("della", "model_c", density=0.66, epsilon=0.05, **{"lambda": 0.5}),
                     "stat", ""),
    "tests: della invalid epsilon": (two("della", "model_c", density=0.66, epsilon=1.35,
                                         **{"lambda": 0.5}), "refused", r"epsilon"),
    "tests: nuslerp": (two("nuslerp", "model_c", nuslerp_row_wise=False,
                           nuslerp_flatten=False), "exact", ""),
    "tests: nuslerp without base, row-wise": (two("nuslerp", nuslerp_row_wise=True,
                                                  nuslerp_flatten=False), "exact", ""),
    "tests: multislerp": (two("multislerp", "model_c"), "exact", ""),
    # mergekit ignores the per-model weight these methods do not take; we refuse it, and run
    # the same configs without it
    **{f"tests: {m}": (two(m, base, **params), "refused", rf"{m} has no parameter 'weight'")
       for m, base, params in WEIGHTLESS},
    **{f"tests: {m}, weights removed": (bare(m, base, **params), "exact", "")
       for m, base, params in WEIGHTLESS},
    # the template itself against mergekit's: test_mergekit_config.py
    "tests: chat_template chatml": ({**two("linear"), "chat_template": "chatml"}, "exact", ""),
    "tests: chat_template literal": ({**two("linear"),
                                      "chat_template": "{{messages[0]['content']}}"},
                                     "exact", ""),
    # the fixtures share one tokenizer, so the union is that tokenizer (mergekit's too)
    "tests: tokenizer_source union": ({**two("linear"), "tokenizer_source": "union"},
                                      "exact", ""),
    "tests: tokenizer_source base": ({**two("task_arithmetic", "model_c"),
                                      "tokenizer_source": "base"}, "exact", ""),
}


# mergekit writes these methods' float32 results as they are, whatever dtype says; ours are
# in the dtype the config names
KEEPS_FLOAT32 = ("arcee_fusion", "ramplus_tl")
_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def rewrite(config: dict[str, Any], layers: int, target: int = 6) -> dict[str, Any]:
    """The config with fixture models and layer ranges scaled from ``layers`` blocks."""
    out = copy.deepcopy(config)

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (NAMES.get(v, v) if k in ("model", "base_model") and isinstance(v, str)
                        else [round(x * target / layers) for x in v] if k == "layer_range"
                        else fix(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return fix(out)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def run_both(config: dict[str, Any], tmp: Path) -> tuple[dict, dict]:
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    tmp.mkdir()
    (tmp / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    recipe, _ = load_mergekit(tmp / "config.yml", str(tmp / "ours"))
    run_recipe(recipe)
    mergekit_merge.run_merge(MergeConfiguration.model_validate(config), str(tmp / "mk"),
                             MergeOptions(copy_tokenizer=False, write_model_card=False,
                                          quiet=True))
    return tensors(tmp / "ours"), tensors(tmp / "mk")


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_config(case: str, tmp_path: Path) -> None:
    raw, expect, reason = CASES[case]
    config = rewrite(raw, LAYERS[case.split("/")[0].split(":")[0]]
                     if case.startswith("examples") else 6)
    if expect == "refused":
        (tmp_path / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        with pytest.raises(UsageError, match=r"config\.yml:\d+:\d+: .*" + reason):
            load_mergekit(tmp_path / "config.yml", str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()
        return
    as_written = {**config}
    exact = {**config, "dtype": "float32"}
    if expect == "stat":
        torch.manual_seed(0)
        ours, theirs = run_both(exact, tmp_path / "f32")
        base = load_file(f"{LLAMA['base']}/model.safetensors")
        name = "model.layers.2.mlp.down_proj.weight"
        moved = [(o[name] != base[name]).double().mean().item() for o in (ours, theirs)]
        assert abs(moved[0] - moved[1]) < 0.03, moved
        return
    ours32, theirs32 = run_both(exact, tmp_path / "f32")
    assert set(ours32) == set(theirs32)
    for name, t in theirs32.items():
        assert ours32[name].dtype == t.dtype and torch.equal(ours32[name], t), name
    if as_written.get("dtype") in (None, "float32"):
        return
    # As written, ours is the float32 result rounded once to the output dtype; mergekit
    # rounds the inputs to it first, so it is never closer to the float32 result than ours.
    ours, theirs = run_both(as_written, tmp_path / "as-written")
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        exact_t = theirs32[name]
        if any(m in case for m in KEEPS_FLOAT32):
            assert t.dtype == torch.float32 and ours[name].dtype == _DTYPE[config["dtype"]]
            assert torch.equal(ours[name], exact_t.to(ours[name].dtype)), name
            continue
        assert ours[name].dtype == t.dtype, name
        assert torch.equal(ours[name], exact_t.to(t.dtype)), name
        ours_err = (ours[name].double() - exact_t.double()).norm()
        assert ours_err <= (t.double() - exact_t.double()).norm(), name
