"""mergekit configs run unchanged: ``surgery apply config.yml OUT`` against mergekit's own
``run_merge`` on the same config (float32 compute) over the tiny-llama fixtures, bit for bit
where the semantics match (DARE: statistics, as in test_mergekit_zoo.py); ``surgery convert``
round trips; every mistake is a one-line error naming its YAML line, before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from surgery.errors import RecipeError, UsageError
from surgery.recipe import run_recipe
from surgery.recipe.mergekit import METHODS, load_mergekit, translate
from tests.conftest import fixture_dir, surgery

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit (the oracle) missing")

BASE, MATH, CODE, CHAT = (str(fixture_dir("tiny-llama", n)) for n in ("base", "math", "code",
                                                                        "chat"))


def tensors(out: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def run_mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    mergekit_merge.run_merge(MergeConfiguration.model_validate(config), str(out),
                             MergeOptions(copy_tokenizer=False, write_model_card=False,
                                          quiet=True))
    return tensors(out)


def run_ours(config: dict[str, Any], tmp_path: Path, name: str = "ours") -> dict:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    recipe, _ = load_mergekit(path, str(tmp_path / name))
    run_recipe(recipe)
    return tensors(tmp_path / name)


def both(config: dict[str, Any], tmp_path: Path) -> tuple[dict, dict]:
    return run_ours(config, tmp_path), run_mergekit(config, tmp_path / "mk")


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype, name
        assert torch.equal(ours[name], t), f"{name}: max diff {(ours[name] - t).abs().max()}"


def test_linear_with_gradients_and_first_match_filters(tmp_path: Path) -> None:
    config = {
        "merge_method": "linear", "dtype": "float32",
        "models": [
            {"model": MATH, "parameters": {"weight": [0.2, 0.9]}},
            # first match wins: self_attn tensors (q_proj included) take 0.5, not 3.0
            {"model": CODE, "parameters": {"weight": [
                {"filter": "self_attn", "value": 0.5}, {"filter": "q_proj", "value": 3.0},
                {"filter": "mlp", "value": [0.1, 1.0, 0.3]}, {"value": 0.7}]}},
            {"model": CHAT, "parameters": {"weight": 0.25}},
        ],
        "parameters": {"normalize": True},
    }
    with pytest.raises(RecipeError, match=r"ours\.yml:\d+:\d+: .*filter 'q_proj' never "
                                          "applies"):
        run_ours(config, tmp_path)
    config["models"][1]["parameters"]["weight"][1]["filter"] = "input_layernorm"
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    q = "model.layers.2.self_attn.q_proj.weight"
    w0 = 0.2 + (0.9 - 0.2) * 0.4  # block 2 of 6: t = 0.4
    want = (w0 * load_file(f"{MATH}/model.safetensors")[q]
            + 0.5 * load_file(f"{CODE}/model.safetensors")[q]
            + 0.25 * load_file(f"{CHAT}/model.safetensors")[q]) / (w0 + 0.5 + 0.25)
    assert torch.allclose(ours[q], want, atol=1e-6)


def test_task_arithmetic_with_top_level_weight_and_lambda_gradient(tmp_path: Path) -> None:
    ours, theirs = both({
        "merge_method": "task_arithmetic", "base_model": BASE, "dtype": "float32",
        "parameters": {"weight": 0.6, "lambda": [0.5, 1.5], "normalize": True},
        "models": [{"model": MATH}, {"model": CODE, "parameters": {"weight": [1.0, 0.2]}}],
    }, tmp_path)
    assert_same(ours, theirs)


def test_ties_with_filters_on_density_and_weights(tmp_path: Path) -> None:
    dens = [{"filter": "mlp", "value": 0.4}, {"value": 0.3}]
    ours, theirs = both({
        "merge_method": "ties", "base_model": BASE, "dtype": "float32",
        "parameters": {"lambda": 0.8, "int8_mask": True},
        "models": [
            {"model": BASE},
            {"model": MATH, "parameters": {"density": dens, "weight": [0.2, 0.9]}},
            {"model": CODE, "parameters": {"density": dens,
                                           "weight": [{"filter": "self_attn", "value": 0.5},
                                                      {"value": 0.7}]}},
        ],
    }, tmp_path)
    assert_same(ours, theirs)


def test_dare_ties_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = {
        "merge_method": "dare_ties", "base_model": BASE, "dtype": "float32",
        "models": [{"model": m, "parameters": {"density": 0.5, "weight": 1.0}}
                   for m in (MATH, CODE)],
    }
    ours, theirs = both(config, tmp_path)
    base = load_file(f"{BASE}/model.safetensors")
    name = "model.layers.2.mlp.down_proj.weight"
    moved = [(out[name] != base[name]).double().mean().item() for out in (ours, theirs)]
    # each model keeps half of its entries; an entry moves unless both dropped it or the
    # kept ones cancel: 1 - 0.25 = 0.75 in expectation, for both tools
    for m in moved:
        assert abs(m - 0.75) < 0.03
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.5.mlp.up_proj.weight"):
        a, c = ours[n] - base[n], theirs[n] - base[n]
        both_moved = (a != 0) & (c != 0)
        assert (a.sign() == c.sign())[both_moved].double().mean().item() > 0.7


def test_per_model_density_and_gamma_with_filters(tmp_path: Path) -> None:
    """Each model's own density (a filter list, a gradient) and gamma: translated to
    ``{per_model: [...]}`` and bit for bit with mergekit."""
    config = {
        "merge_method": "breadcrumbs_ties", "base_model": BASE, "dtype": "float32",
        "parameters": {"gamma": 0.02},
        "models": [
            {"model": MATH, "parameters": {"weight": 1.0, "density": [
                {"filter": "mlp", "value": [0.9, 0.3]}, {"value": 0.6}]}},
            {"model": CODE, "parameters": {"weight": 0.5, "density": 0.4, "gamma": 0.1}},
            {"model": CHAT, "parameters": {"weight": 0.7, "density": 0.4}},
        ],
    }
    native = translate(yaml.safe_dump(config), "mk.yml").recipe["steps"]["merged"]
    assert native["gamma"] == {"per_model": [0.02, 0.1, 0.02]}
    assert native["density"]["per_model"][1:] == [0.4, 0.4]
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)


def test_dare_linear_per_model_density_statistics(tmp_path: Path) -> None:
    """DARE's drops are random in both tools: with densities 0.3 and 0.8, an entry moves
    unless both models drop it, 1 − 0.7·0.2 = 0.86, and the math model's own entries (where
    the code model's weight is 0 on this tensor) move with its density, 0.3."""
    torch.manual_seed(0)
    config = {
        "merge_method": "dare_linear", "base_model": BASE, "dtype": "float32",
        "models": [{"model": MATH, "parameters": {"density": 0.3, "weight": 1.0}},
                   {"model": CODE, "parameters": {"density": 0.8, "weight": [
                       {"filter": "layers.1.", "value": 0.0}, {"value": 1.0}]}}],
    }
    ours, theirs = both(config, tmp_path)
    base = load_file(f"{BASE}/model.safetensors")
    for name, want in (("model.layers.2.mlp.down_proj.weight", 0.86),
                       ("model.layers.1.mlp.down_proj.weight", 0.3)):
        for out in (ours, theirs):
            moved = (out[name] != base[name]).double().mean().item()
            assert abs(moved - want) < 0.03, (name, moved)


def test_slerp_slices_with_t_gradients_and_filters(tmp_path: Path) -> None:
    ours, theirs = both({
        "merge_method": "slerp", "base_model": BASE, "dtype": "float32",
        "slices": [{"sources": [{"model": BASE, "layer_range": [0, 6]},
                                {"model": MATH, "layer_range": [0, 6]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                             {"value": 0.5}]},
    }, tmp_path)
    assert_same(ours, theirs)


def test_merge_of_partial_slices_stacked(tmp_path: Path) -> None:
    """Each slice merges its sources' block ranges; embeddings come from the first slice's
    merge and the final norm and head from the last's, with gradients per slice."""
    ours, theirs = both({
        "merge_method": "linear", "dtype": "float32",
        "slices": [
            {"sources": [{"model": MATH, "layer_range": [0, 3],
                          "parameters": {"weight": [1.0, 0.0]}},
                         {"model": CODE, "layer_range": [2, 5],
                          "parameters": {"weight": 0.5}}]},
            {"sources": [{"model": CHAT, "layer_range": [3, 6]},
                         {"model": MATH, "layer_range": [1, 4]}],
             "parameters": {"weight": [{"filter": "layers.1.", "value": 2.0},
                                       {"value": 0.3}]}},
        ],
    }, tmp_path)
    assert_same(ours, theirs)


def test_passthrough_frankenmerge_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours, theirs = both({
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [{"sources": [{"model": MATH, "layer_range": [0, 4]}]},
                   {"sources": [{"model": CODE, "layer_range": [2, 6]}]}],
    }, tmp_path)
    assert_same(ours, theirs)
    assert len({n.split(".")[2] for n in ours if n.startswith("model.layers.")}) == 8
    math, code = (load_file(f"{m}/model.safetensors") for m in (MATH, CODE))
    assert torch.equal(ours["model.embed_tokens.weight"], math["model.embed_tokens.weight"])
    for name in ("model.norm.weight", "lm_head.weight"):  # from the last slice, as mergekit
        assert torch.equal(ours[name], code[name])
    assert torch.equal(ours["model.layers.4.mlp.up_proj.weight"],
                       code["model.layers.2.mlp.up_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert model.config.num_hidden_layers == 8
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 2]])).logits).all()


def test_qwen2_frankenmerge_updates_layer_types(tmp_path: Path) -> None:
    """mergekit leaves config.layer_types at the input's length; ours stacks it with the
    blocks, so transformers loads the result."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, use_sliding_window=True, sliding_window=16,
                      max_window_layers=2)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    assert len(json.loads((tmp_path / "qwen" / "config.json").read_text())["layer_types"]) == 4
    q = str(tmp_path / "qwen")
    run_ours({"merge_method": "passthrough",
              "slices": [{"sources": [{"model": q, "layer_range": [0, 3]}]},
                         {"sources": [{"model": q, "layer_range": [1, 4]}]}]}, tmp_path)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    want = cfg.layer_types[0:3] + cfg.layer_types[1:4]
    assert config["num_hidden_layers"] == 6 and config["layer_types"] == want
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 2]])).logits).all()


def test_cli_apply_convert_round_trip(tmp_path: Path) -> None:
    config = {"merge_method": "ties", "base_model": BASE, "dtype": "float32",
              "out_dtype": "bfloat16", "tokenizer_source": "base",
              "models": [{"model": m, "parameters": {"density": 0.3, "weight": [0.2, 0.9]}}
                         for m in (MATH, CODE)]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    res = surgery("apply", "-q", "mk.yml", "direct", "--allow-crimes", "--copy-tokenizer",
                  "--out-shard-size", "200K", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--allow-crimes: not needed" in res.stderr
    assert len(list((tmp_path / "direct").glob("*.safetensors"))) > 1
    res = surgery("convert", "mk.yml", "-o", "recipe.yaml", "--out-path", "converted",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    native = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert native["steps"]["merged"]["op"] == "ties"
    assert native["steps"]["merged"]["weights"] == [[0.2, 0.9], [0.2, 0.9]]
    assert native["output"]["dtype"] == "bfloat16"
    res = surgery("apply", "-q", "recipe.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    direct, converted = tensors(tmp_path / "direct"), tensors(tmp_path / "converted")
    assert set(direct) == set(converted)
    assert all(torch.equal(direct[n], converted[n]) and direct[n].dtype == torch.bfloat16
               for n in direct)
    theirs = run_mergekit(config, tmp_path / "mk")
    assert_same(direct, theirs)
    res = surgery("plan", "mk.yml", cwd=tmp_path)
    assert res.returncode == 0 and "merged: ties(" in res.stdout, res.stderr
    # a config without OUT_PATH, and OUT_PATH with a native recipe, are usage errors
    res = surgery("apply", "mk.yml", cwd=tmp_path)
    assert res.returncode == 2 and "give the output directory" in res.stderr
    res = surgery("apply", "recipe.yaml", "elsewhere", cwd=tmp_path)
    assert res.returncode == 2 and "OUT_PATH is for mergekit configs" in res.stderr
    res = surgery("apply", "recipe.yaml", "--cuda", cwd=tmp_path)
    assert res.returncode == 2 and "--cuda is a mergekit-yaml flag" in res.stderr
    res = surgery("apply", "mk.yml", "x", "--out-shard-size", "lots", cwd=tmp_path)
    assert res.returncode == 2 and "'lots' is not a size" in res.stderr
    if not torch.cuda.is_available():  # --cuda is the output's device: cuda
        res = surgery("apply", "mk.yml", "x", "--cuda", cwd=tmp_path)
        assert res.returncode == 2 and "torch sees no CUDA device" in res.stderr
        assert not (tmp_path / "x").exists()


ERRORS = [
    ("merge_method: model_stockk\nbase_model: {base}\nmodels:\n  - model: {math}\n",
     r":1:\d+: merge_method: mergekit's 'model_stockk' has no equivalent here"),
    ("merge_method: linear\nmodels:\n  - model: {math}\n    parameters: {{weight: 1}}\n"
     "dtype: float32\nunknown_key: 1\n", r":6:1: unknown_key: unknown key"),
    ("merge_method: linear\nmodels:\n  - model: {math}\n    parameters: {{weight: 1, "
     "density: 0.5}}\n", r":4:\d+: models\.0\.parameters\.density: mergekit's linear has no "
     "parameter 'density'"),
    ("merge_method: linear\nmodels:\n  - model: {math}\n    parameters: {{weight: 1}}\n"
     "  - model: /nonexistent/model\n    parameters: {{weight: 1}}\n",
     r":5:\d+: models\.1\.model: model '/nonexistent/model'"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {math}\n"
     "        layer_range: [4, 9]\n", r":5:\d+: .*layer_range: \[4, 9\] is past the end"),
    ("merge_method: ties\nbase_model: {base}\nparameters:\n  density:\n    - filter: c_attn\n"
     "      value: 0.5\n    - value: 0.3\nmodels:\n  - model: {math}\n    parameters: "
     "{{weight: 1}}\n", r":5:\d+: parameters\.density\.0\.filter: filter 'c_attn' matches "
     "no tensor"),
    ("merge_method: dare_linear\nbase_model: {base}\nparameters: {{rescale: false}}\n"
     "models:\n  - model: {math}\n    parameters: {{weight: 1, density: 0.5}}\n",
     r":3:\d+: parameters\.rescale: .*DARE without rescaling"),
    ("merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {math}\n"
     "    parameters: {{weight: 1, density: 0.5}}\n", r":5:\d+: .*density: has no effect"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {math}\n    parameters: "
     "{{weight: 1, density: 0.3}}\n  - model: {code}\n    parameters: {{weight: 1, density: "
     "1.5}}\n", r":7:\d+: models\.1\.parameters\.density: density 1\.5 for model .*code is "
     r"outside \(0, 1\]$"),
    ("merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n  - model: {math}\n"
     "    parameters:\n      weight: 1\n      density: 0.5\n      gamma: [0.1, 1.2]\n",
     r":8:\d+: models\.0\.parameters\.gamma\.1: gamma 1\.2 for model .*math is outside "
     r"\[0, 1\]$"),
    ("merge_method: dare_ties\nbase_model: {base}\nparameters:\n  density:\n    - filter: mlp\n"
     "      value: 0.0\n    - value: 0.5\nmodels:\n  - model: {math}\n    parameters: "
     "{{weight: 1}}\n", r":6:\d+: parameters\.density\.0\.value: density 0\.0 for model "
     r".*math is outside \(0, 1\]$"),
    ("merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodels:\n"
     "  - model: {math}\n  - model: {code}\n",
     r":4:1: models: mergekit's slerp takes exactly 1 model besides the base"),
    ("merge_method: linear\nmodels:\n  - model: {math}\n", r":3:\d+: models\.0: missing "
     r"required parameter 'weight' for tensor lm_head\.weight of /"),
    ("merge_method: linear\nmodules: {{}}\nmodels:\n  - model: {math}\n",
     r":2:\d+: modules: per-module configs"),
    ("merge_method: linear\nslices:\n  - sources:\n      - model: {math}\n"
     "        layer_range: [0, 3]\n      - model: {code}\n        layer_range: [0, 4]\n",
     r":3:\d+: slices\.0\.sources: all sources of a slice need the same number of layers"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {math}\n"
     "        layer_range: [0, 3]\n      - model: {code}\n        layer_range: [0, 3]\n",
     r":3:\d+: slices\.0\.sources: passthrough takes one source per slice"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors_name_the_yaml_line(text: str, message: str, tmp_path: Path) -> None:
    body = text.format(base=BASE, math=MATH, code=CODE)
    with pytest.raises(UsageError, match=r"^mk\.yml" + message):
        translate(body, "mk.yml")
    assert not (tmp_path / "merged").exists()


def test_native_check_errors_point_at_the_config(tmp_path: Path) -> None:
    """A value our operation rejects is reported at the config's merge_method line."""
    (tmp_path / "mk.yml").write_text(
        f"base_model: {BASE}\nmerge_method: della\nmodels:\n  - model: {MATH}\n"
        "    parameters: {weight: 1, density: 0.1}\n")
    with pytest.raises(RecipeError, match=r"mk\.yml:2:\d+: merge_method: della: density 0\.1 "
                                          r"and epsilon 0\.15 for tensor .* \(in the translated "
                                          r"recipe's steps\.merged\)"):
        load_mergekit(tmp_path / "mk.yml", str(tmp_path / "out"))


def test_table_names_existing_operations() -> None:
    from surgery.recipe.build import OPERATIONS

    assert {m.op for m in METHODS.values()} <= set(OPERATIONS)
    from mergekit.merge_methods import registered_methods

    from surgery.recipe.mergekit import REQUIRED

    # every method of mergekit 0.1.5 has an entry, with its parameters, scopes and defaults
    assert set(METHODS) == {m.spec.name for m in registered_methods()}
    for method in registered_methods():
        theirs = {(p.name, p.scope.value, "required" if p.required else p.default)
                  for p in method.spec.parameters}
        ours = {(p.name, p.scope, "required" if p.default is REQUIRED else p.default)
                for p in METHODS[method.spec.name].params}
        assert ours == theirs, method.spec.name


def test_trim_to_no_entry_is_noted() -> None:
    text = (f"merge_method: ties\nbase_model: {BASE}\nmodels:\n  - model: {MATH}\n"
            "    parameters: {weight: 1, density: 0.01}\n")
    notes = translate(text, "mk.yml").notes
    assert len(notes) == 1 and "keeps no entry of model.layers.0.input_layernorm.weight " \
        "(64 entries), where mergekit keeps one" in notes[0]
    assert translate(text.replace("0.01", "0.5"), "mk.yml").notes == []


def test_ties_over_partial_slices_with_slice_filters(tmp_path: Path) -> None:
    ours, theirs = both({
        "merge_method": "ties", "base_model": BASE, "dtype": "float32",
        "parameters": {"density": 0.4},
        "slices": [
            {"sources": [{"model": BASE, "layer_range": [0, 2]},
                         {"model": MATH, "layer_range": [0, 2], "parameters": {"weight": 0.8}},
                         {"model": CODE, "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
            {"sources": [{"model": BASE, "layer_range": [2, 6]},
                         {"model": MATH, "layer_range": [2, 6]},
                         {"model": CODE, "layer_range": [2, 6]}],
             "parameters": {"weight": [{"filter": "mlp", "value": [0.3, 1.0]},
                                       {"value": 0.6}],
                            "lambda": [1.0, 0.5]}},
        ],
    }, tmp_path)
    assert_same(ours, theirs)


def test_tokenizer_union(tmp_path: Path) -> None:
    """A union of identical vocabularies is that tokenizer with the embeddings as they are (as
    mergekit), whatever else differs in the tokenizer files; different vocabularies:
    test_vocabulary.py."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(CODE, other)
    tok = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**tok, "model_max_length": 7}))
    config = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
              "models": [{"model": MATH, "parameters": {"weight": 0.6}},
                         {"model": str(other), "parameters": {"weight": 0.4}}]}
    ours, theirs = both(config, tmp_path)
    assert_same(ours, theirs)
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == (
        Path(MATH) / "tokenizer.json").read_bytes()


def test_chat_template_literal_and_auto(tmp_path: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    theirs_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    donor = tmp_path / "donor"
    shutil.copytree(MATH, donor)
    tok = json.loads((donor / "tokenizer_config.json").read_text())
    (donor / "tokenizer_config.json").write_text(json.dumps({**tok,
                                                             "chat_template": theirs_template}))
    literal = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    config = {"merge_method": "linear", "chat_template": literal,
              "models": [{"model": str(donor), "parameters": {"weight": 0.5}},
                         {"model": CODE, "parameters": {"weight": 0.5}}]}
    run_ours(config, tmp_path, "literal")
    got = AutoTokenizer.from_pretrained(tmp_path / "literal")
    assert got.chat_template == literal  # over the donor's own template
    assert got.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    run_ours({**config, "chat_template": "auto"}, tmp_path, "auto")
    assert AutoTokenizer.from_pretrained(tmp_path / "auto").chat_template == theirs_template
    with pytest.raises(RecipeError, match=r"chat_template: chat_template 'llama3': mergekit's "
                                          "llama3 file renders a newline after every turn"):
        run_ours({**config, "chat_template": "llama3"}, tmp_path, "named")
    with pytest.raises(RecipeError, match=r"chat_template: chat_template 'chatml3' is neither "
                                          r"a named template \(chatml, mistral\)"):
        run_ours({**config, "chat_template": "chatml3"}, tmp_path, "unknown")


CONVERSATIONS = [
    [{"role": "user", "content": " hi "}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "two\nlines"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}],
]


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_named_chat_templates_render_as_mergekits(name: str, tmp_path: Path) -> None:
    """mergekit's named templates we carry: the output's chat_template.jinja (where mergekit
    writes its template too) renders every conversation as mergekit's output does."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    config = {"merge_method": "linear", "dtype": "float32", "chat_template": name,
              "models": [{"model": MATH, "parameters": {"weight": 0.6}},
                         {"model": CODE, "parameters": {"weight": 0.4}}]}
    ours = run_ours(config, tmp_path)
    mergekit_merge.run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
                             MergeOptions(copy_tokenizer=True, write_model_card=False,
                                          quiet=True))
    assert_same(ours, tensors(tmp_path / "mk"))
    for out in ("ours", "mk"):
        assert (tmp_path / out / "chat_template.jinja").is_file()
    mine, theirs = (AutoTokenizer.from_pretrained(tmp_path / out) for out in ("ours", "mk"))
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            want = theirs.apply_chat_template(conversation, tokenize=False,
                                              add_generation_prompt=prompt)
            assert mine.apply_chat_template(conversation, tokenize=False,
                                            add_generation_prompt=prompt) == want
    if name == "chatml":
        assert want.endswith("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n b "
                             "<|im_end|>\n<|im_start|>assistant\n")


def test_every_named_chat_template_is_carried_or_refused() -> None:
    """The names are mergekit 0.1.5's; a refused one is refused for the reason given: its
    rendering is not the published template's (Meta's Llama 3, here)."""
    import importlib.resources

    from mergekit._data import chat_templates
    from transformers import AutoTokenizer

    from surgery.recipe.chat_templates import NAMED, REFUSED

    files = importlib.resources.files(chat_templates)
    names = {p.name.removesuffix(".jinja") for p in files.iterdir()
             if p.name.endswith(".jinja")}
    assert names == set(NAMED) | set(REFUSED) and not set(NAMED) & set(REFUSED)
    tok = AutoTokenizer.from_pretrained(MATH)
    text = tok.apply_chat_template(CONVERSATIONS[2], tokenize=False,
                                   chat_template=files.joinpath("llama3.jinja").read_text())
    assert text == ("<s><|start_header_id|>user<|end_header_id|>\n\na<|eot_id|>\n"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nb<|eot_id|>\n")


def test_per_slice_base_model(tmp_path: Path) -> None:
    ours, theirs = both({
        "merge_method": "task_arithmetic", "base_model": BASE, "dtype": "float32",
        "parameters": {"weight": 0.7},
        "slices": [
            {"sources": [{"model": BASE, "layer_range": [0, 3]},
                         {"model": MATH, "layer_range": [0, 3]}]},
            {"base_model": CHAT,
             "sources": [{"model": CHAT, "layer_range": [3, 6]},
                         {"model": CODE, "layer_range": [3, 6]}]},
        ],
    }, tmp_path)
    assert_same(ours, theirs)
    chat, code = (load_file(f"{m}/model.safetensors") for m in (CHAT, CODE))
    name = "model.layers.4.mlp.up_proj.weight"
    assert torch.allclose(ours[name], chat[name] + 0.7 * (code[name] - chat[name]), atol=1e-6)


def test_a_new_method_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operation with an optional base (as nuslerp's) takes it when the config has one."""
    from surgery.recipe.mergekit import MethodMap, Param

    monkeypatch.setitem(METHODS, "optional_base", MethodMap(
        "linear", (Param("weight", float, "non_base", to="weights", per_model=True),),
        base="optional"))
    text = (f"merge_method: optional_base\nmodels:\n  - model: {MATH}\n    parameters: "
            f"{{weight: 0.3}}\n  - model: {CODE}\n    parameters: {{weight: 0.7}}\n")
    step = translate(text, "mk.yml").recipe["steps"]["merged"]
    assert step == {"op": "linear", "weights": [0.3, 0.7], "models": ["math", "code"]}
    step = translate(f"base_model: {BASE}\n" + text, "mk.yml").recipe["steps"]["merged"]
    assert step == {"op": "linear", "weights": [0.3, 0.7], "base": "base",
                    "models": ["math", "code"]}


def test_scaled_passthrough_slices(tmp_path: Path) -> None:
    ours, theirs = both({
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [
            {"sources": [{"model": MATH, "layer_range": [0, 3],
                          "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                   {"filter": "mlp", "value": [0.5, 2.0]}]}}]},
            {"sources": [{"model": CODE, "layer_range": [1, 4]}],
             "parameters": {"scale": [{"filter": "norm", "value": 3.0}]}},
        ],
    }, tmp_path)
    assert_same(ours, theirs)
    math = load_file(f"{MATH}/model.safetensors")
    assert torch.equal(ours["model.layers.1.mlp.up_proj.weight"],
                       1.25 * math["model.layers.1.mlp.up_proj.weight"])
