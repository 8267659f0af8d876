"""Merging models with different tokenizers over one vocabulary (surgery.methods.vocabulary):
the layout rules by hand, mergekit's tokenizer_source (base, a model, union, padding) as the
oracle, the result through transformers, and the recipe's vocabulary section."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from surgery import align_vocabularies, linear, load
from surgery.errors import RecipeError, UsageError
from surgery.recipe import build_recipe, run_recipe
from surgery.recipe.mergekit import load_mergekit
from tests.conftest import ROOT, fixture_dir

BASE, MATH, CODE = (fixture_dir("tiny-llama", n) for n in ("base", "math", "code"))
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def variant(src: Path, dst: Path, plain: list[str], special: list[str], pad: int = 0,
            seed: int = 0) -> Path:
    """``src`` with tokens added to its tokenizer and rows for them appended to its
    embeddings and head (then ``pad`` rows that are no token), as a fine-tune that adds chat
    tokens is."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for token in plain:  # ordinary tokens of the model's vocabulary, after its others
        vocab[token] = max(vocab.values()) + 1
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(dst)
    assert all(tok.convert_tokens_to_ids(t) == vocab[t] for t in plain)
    tok.add_tokens(special, special_tokens=True)
    tokens = len(tok.get_vocab())
    tok.save_pretrained(dst)
    tensors = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name in VOCAB_TENSORS:
        w = tensors[name]
        extra = torch.randn(tokens + pad - w.shape[0], w.shape[1], generator=gen) * 0.02
        tensors[name] = torch.cat([w, extra]).contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "vocab_size": tokens + pad}))
    return dst


def over(src: Path, dst: Path, plain: list[str], special: list[str],
         merges: list[str] = ()) -> Path:
    """``src`` with tokens added to its tokenizer (and BPE ``merges``) but no rows for them:
    a tokenizer with tokens past the model's ``vocab_size``."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for token in plain:
        vocab[token] = max(vocab.values()) + 1
    spec["model"]["merges"] += [m.split(" ") if isinstance(spec["model"]["merges"][0], list)
                                else m for m in merges]
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens(special, special_tokens=True)
    tok.save_pretrained(dst)
    rows = json.loads((dst / "config.json").read_text())["vocab_size"]
    assert len(tok.get_vocab()) == rows + len(plain) + len(special)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {"base": BASE,
            "math": variant(MATH, root / "math", ["zebra", "quokka"],
                            ["<|im_start|>", "<|im_end|>"], seed=1),
            "code": variant(CODE, root / "code", ["quokka", "axolotl"],
                            ["<|im_end|>", "<tool>"], pad=3, seed=2),
            "chat": variant(MATH, root / "chat", ["zebra"], ["<|im_end|>"], seed=3),
            "over": over(MATH, root / "over", ["wombat"], ["<|extra|>"])}


def vocab_of(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def tensors(out: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def test_rows_follow_the_layout_rules(models: dict[str, Path]) -> None:
    """By hand: a model's own row where it has the token; the only model that has it; the
    base's; the mean of those that have it; and the new vocabulary's ids."""
    b, m, c = (load(models[k]) for k in ("base", "math", "code"))
    rows = {k: load_file(models[k] / "model.safetensors")["model.embed_tokens.weight"]
            for k in models}
    vocabs = {k: vocab_of(models[k]) for k in models}
    aligned = align_vocabularies([b, m, c])  # no base: a token several models have is a mean
    out = vocab_of(Path(aligned[0].node.tokenizer_files()[0]).parent)
    # the first model's ids, then the others' ordinary tokens in model and id order, then
    # their added tokens
    assert sorted(out, key=out.get)[384:] == ["zebra", "quokka", "axolotl", "<|im_start|>",
                                              "<|im_end|>", "<tool>"]
    assert aligned[0].spec("lm_head.weight").shape == (390, 64)
    assert aligned[1].config["vocab_size"] == 390
    got = [a["model.embed_tokens.weight"] for a in aligned]

    def row(model: str, token: str) -> torch.Tensor:
        return rows[model][vocabs[model][token]]

    for i, k in enumerate(("base", "math", "code")):  # shared tokens keep their own rows
        assert torch.equal(got[i][out["Ġsmall"]], row(k, "Ġsmall"))
    for i in range(3):
        assert torch.equal(got[i][out["zebra"]], row("math", "zebra"))  # only math has it
        assert torch.equal(got[i][out["<tool>"]], row("code", "<tool>"))
    mean = (torch.zeros(64) + row("math", "quokka") + row("code", "quokka")) / 2
    assert torch.equal(got[0][out["quokka"]], mean)
    assert torch.equal(got[1][out["quokka"]], row("math", "quokka"))
    assert torch.equal(got[2][out["quokka"]], row("code", "quokka"))
    # with a base named, the base's row fills in a token the base and another model have
    m2 = load(models["chat"])
    with_base = align_vocabularies([c, m2, m], base=2, source=2)
    assert with_base[0].spec("lm_head.weight").shape == (388, 64)  # math's vocabulary
    mvocab = vocabs["math"]
    code, chat = (a["model.embed_tokens.weight"] for a in with_base[:2])
    assert torch.equal(code[mvocab["zebra"]], row("math", "zebra"))  # math and chat have it
    assert torch.equal(chat[mvocab["quokka"]], row("math", "quokka"))  # math and code have it
    assert torch.equal(chat[mvocab["<|im_start|>"]], row("math", "<|im_start|>"))  # math's
    chat_rows = load_file(models["chat"] / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(chat[mvocab["zebra"]], chat_rows[vocabs["chat"]["zebra"]])  # its own
    without = align_vocabularies([c, m2, m], source=2)[1]["model.embed_tokens.weight"]
    assert torch.equal(without[mvocab["quokka"]], mean)  # no base: the mean of math and code


def test_token_sources_by_hand(models: dict[str, Path]) -> None:
    """A configured token's row: from its source for the models that lack the token (the
    others keep their own), for every model with force; zeros; another token's row or a
    row by id; and the references are checked."""
    from surgery.methods.vocabulary import TokenRow

    b, m, c = (load(models[k]) for k in ("base", "math", "code"))
    rows = {k: load_file(models[k] / "model.safetensors")["model.embed_tokens.weight"]
            for k in models}
    vocabs = {k: vocab_of(models[k]) for k in models}
    tokens = {"quokka": TokenRow(None),  # math and code have it: only base's row is zeros
              "<|im_end|>": TokenRow(2, force=True),  # code's row for all
              "<tool>": TokenRow(1, token="<|im_start|>"),  # code has it: math's other row
              "zebra": TokenRow(2, row=7, force=True)}
    aligned = align_vocabularies([b, m, c], base=0, tokens=tokens)
    out = vocab_of(Path(aligned[0].node.tokenizer_files()[0]).parent)
    got = [a["model.embed_tokens.weight"] for a in aligned]
    assert not got[0][out["quokka"]].any()
    assert torch.equal(got[1][out["quokka"]], rows["math"][vocabs["math"]["quokka"]])
    assert torch.equal(got[2][out["quokka"]], rows["code"][vocabs["code"]["quokka"]])
    for i in range(3):
        assert torch.equal(got[i][out["<|im_end|>"]], rows["code"][vocabs["code"]["<|im_end|>"]])
        assert torch.equal(got[i][out["zebra"]], rows["code"][7])
    for i in range(2):
        assert torch.equal(got[i][out["<tool>"]], rows["math"][vocabs["math"]["<|im_start|>"]])
    assert torch.equal(got[2][out["<tool>"]], rows["code"][vocabs["code"]["<tool>"]])
    plain = align_vocabularies([b, m, c], base=0)[0]["model.embed_tokens.weight"]
    others = [i for t, i in out.items() if t not in tokens]
    assert torch.equal(got[0][others], plain[others])
    assert aligned[0].node.params()["token_sources"]["zebra"]["row"] == 7
    # force changes a model already in the layout; without it, nothing to do
    same = align_vocabularies([b, b], tokens={"Ġsmall": TokenRow(None)})
    assert same[0] is b and same[1] is b
    forced = align_vocabularies([b, b], tokens={"Ġsmall": TokenRow(None, force=True)})
    assert not forced[1]["model.embed_tokens.weight"][vocabs["base"]["Ġsmall"]].any()
    for bad, message in [({"nosuch": TokenRow(None)}, "'nosuch' is not a token of the output"),
                         ({"<tool>": TokenRow(1)}, "'<tool>': .* has no such token"),
                         ({"zebra": TokenRow(2, row=999)}, "row 999 is past the 391 rows"),
                         ({"zebra": TokenRow(1, token="nosuch")}, "has no token 'nosuch'"),
                         ({"zebra": TokenRow(1, token="zebra", row=3)}, "not both"),
                         ({"zebra": TokenRow(5)}, "model 5 is not one of the 3")]:
        with pytest.raises(UsageError, match=message):
            align_vocabularies([b, m, c], tokens=bad)


def test_padding_rows_are_the_mean_and_identity_is_left_alone(models: dict[str, Path]
                                                                ) -> None:
    b, m = load(models["base"]), load(models["math"])
    aligned = align_vocabularies([b, m], source=0, pad_to_multiple_of=128)
    assert aligned[1].spec("lm_head.weight").shape == (384, 64)  # 384 is a multiple already
    aligned = align_vocabularies([b, m], source=0, pad_to_multiple_of=100)
    head = aligned[1]["lm_head.weight"]
    assert head.shape == (400, 64)
    assert torch.equal(head[384:], torch.mean(head[:384], dim=0).expand(16, 64))
    same = align_vocabularies([b, load(MATH)])  # one vocabulary already: nothing to do
    assert same[0].node is b.node and same[1].node.op == "load"


def run_mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return tensors(out)


def run_ours(config: dict[str, Any], tmp_path: Path) -> dict[str, torch.Tensor]:
    path = tmp_path / "ours.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    recipe, _ = load_mergekit(path, str(tmp_path / "ours"))
    run_recipe(recipe)
    return tensors(tmp_path / "ours")


def by_token(t: dict[str, torch.Tensor], vocab: dict[str, int], order: list[str]
             ) -> dict[str, torch.Tensor]:
    """``t`` with its vocabulary tensors' rows in ``order`` of tokens."""
    index = [vocab[tok] for tok in order]
    return {k: v[index] if k in VOCAB_TENSORS else v for k, v in t.items()}


CASES = {
    "union, linear, base named": {
        "merge_method": "linear", "base_model": "base", "tokenizer_source": "union",
        "models": [{"model": "base", "parameters": {"weight": 0.2}},
                   {"model": "math", "parameters": {"weight": 0.4}},
                   {"model": "code", "parameters": {"weight": 0.4}}]},
    "union, ties": {
        "merge_method": "ties", "base_model": "base", "tokenizer_source": "union",
        "parameters": {"density": 0.5, "weight": 1.0},
        "models": [{"model": "math"}, {"model": "code"}]},
    "union, the base's rows fill in": {
        "merge_method": "linear", "base_model": "math", "tokenizer_source": "union",
        "models": [{"model": "math", "parameters": {"weight": 0.5}},
                   {"model": "code", "parameters": {"weight": 0.3}},
                   {"model": "chat", "parameters": {"weight": 0.2}}]},
    "a model's tokenizer": {
        "merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "code",
        "models": [{"model": "math", "parameters": {"weight": 0.7}},
                   {"model": "code", "parameters": {"weight": 0.5}}]},
    "union, token sources": {
        "merge_method": "linear", "base_model": "base",
        "tokenizer": {"source": "union", "tokens": {
            "<|im_end|>": {"source": "code", "force": True},
            "quokka": {"source": {"kind": "zero"}},
            "<tool>": {"source": {"kind": "model_token", "model": "math",
                                  "token": "<|im_start|>"}},
            "zebra": {"source": {"kind": "model_token", "model": "code", "token_id": 5},
                      "force": True}}},
        "models": [{"model": "base", "parameters": {"weight": 0.2}},
                   {"model": "math", "parameters": {"weight": 0.4}},
                   {"model": "code", "parameters": {"weight": 0.4}}]},
    "union, the base's tokenizer stripped of tokens past its rows": {
        "merge_method": "linear", "base_model": "over", "tokenizer_source": "union",
        "models": [{"model": "over", "parameters": {"weight": 0.5}},
                   {"model": "code", "parameters": {"weight": 0.5}}]},
    "base, stripped of tokens past its rows": {
        "merge_method": "linear", "base_model": "over", "tokenizer_source": "base",
        "models": [{"model": "over", "parameters": {"weight": 0.6}},
                   {"model": "math", "parameters": {"weight": 0.4}}]},
    "base, padded": {
        "merge_method": "linear", "base_model": "base",
        "tokenizer": {"source": "base", "pad_to_multiple_of": 50},
        "models": [{"model": "base", "parameters": {"weight": 0.2}},
                   {"model": "math", "parameters": {"weight": 0.5}},
                   {"model": "code", "parameters": {"weight": 0.5}}]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_mergekit(case: str, models: dict[str, Path], tmp_path: Path) -> None:
    """Bit-equal to mergekit token by token (mergekit appends the union's new tokens in a
    hash map's order, which changes from run to run; ours are in id order), with the same
    vocabulary and vocab_size; the other tensors bit-equal."""
    pytest.importorskip("mergekit.merge", reason="mergekit (the oracle) missing")

    def paths(value: Any) -> Any:
        if isinstance(value, dict):  # a tokenizer source "base" is the keyword, not the model
            return {k: v if k in ("tokenizer_source", "source") and v == "base" else paths(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [paths(v) for v in value]
        return str(models[value]) if value in models else value

    config = {**paths(CASES[case]), "dtype": "float32"}
    ours, theirs = run_ours(config, tmp_path), run_mergekit(config, tmp_path / "mk")
    ours_vocab, their_vocab = vocab_of(tmp_path / "ours"), vocab_of(tmp_path / "mk")
    assert set(ours_vocab) == set(their_vocab)
    size = json.loads((tmp_path / "mk" / "config.json").read_text())["vocab_size"]
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == size
    assert ours["lm_head.weight"].shape[0] == theirs["lm_head.weight"].shape[0] == size
    if "union" not in case:  # one tokenizer's ids: the same rows, padding included
        assert ours_vocab == their_vocab
        order = [*sorted(ours_vocab, key=ours_vocab.get)]
        assert set(ours) == set(theirs)
        for name, t in theirs.items():
            assert torch.equal(ours[name], t), name
        return
    order = sorted(ours_vocab, key=ours_vocab.get)
    mine, other = by_token(ours, ours_vocab, order), by_token(theirs, their_vocab, order)
    assert set(mine) == set(other)
    for name, t in other.items():
        assert torch.equal(mine[name], t), f"{name}: max diff {(mine[name] - t).abs().max()}"


def test_the_merge_loads_in_transformers_with_each_models_logits(models: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """All weight on math: the union model gives math's logits on a text of math's tokens
    (its ids mapped through the tokenizers), with both tokenizers' added tokens in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m, c = load(models["math"]), load(models["code"])
    aligned = align_vocabularies([m, c])
    linear(aligned, weights=[1.0, 0.0]).save(tmp_path / "out")
    tok, mtok = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(
        models["math"])
    text = "the small zebra <|im_start|> counts <|im_end|>"
    ids, mids = tok(text, return_tensors="pt"), mtok(text, return_tensors="pt")
    assert tok.convert_ids_to_tokens(ids["input_ids"][0]) == mtok.convert_ids_to_tokens(
        mids["input_ids"][0])
    assert tok.convert_tokens_to_ids("<tool>") == 389  # code's token is in it
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = AutoModelForCausalLM.from_pretrained(models["math"]).eval()
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 390
    with torch.no_grad():
        got, want = model(**ids).logits[0], ref(**mids).logits[0]
    mvocab, vocab = mtok.get_vocab(), tok.get_vocab()
    order = sorted(mvocab, key=mvocab.get)
    torch.testing.assert_close(got[:, [vocab[t] for t in order]], want, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "out" / "provenance.json").read_text())


def test_the_union_tokenizer_is_the_same_bytes_in_another_process(models: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """Built twice from nothing (two caches, two processes): the same files, so the output
    is the same bytes whatever machine builds it."""
    code = ("import sys; from surgery import load, align_vocabularies;"
            "a = align_vocabularies([load(p) for p in sys.argv[1:]]);"
            "print(a[0].node.tokenizer_files()[0].parent)")
    dirs = []
    for i in range(2):
        env = {**os.environ, "WEIGHT_SURGERY_CACHE": str(tmp_path / f"cache{i}"),
               "PYTHONHASHSEED": str(i)}
        done = subprocess.run([sys.executable, "-c", code, str(models["math"]),
                               str(models["code"])], env=env, capture_output=True, text=True,
                              check=True, timeout=300)
        dirs.append(Path(done.stdout.strip().splitlines()[-1]))
    assert dirs[0].name == dirs[1].name
    files = sorted(p.name for p in dirs[0].iterdir())
    assert "tokenizer.json" in files
    for name in files:
        assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes(), name


def recipe(models: dict[str, Path], vocabulary: dict[str, Any], **output: Any) -> str:
    return yaml.safe_dump({
        "inputs": {k: str(v) for k, v in models.items()},
        "vocabulary": vocabulary,
        "steps": {"merged": {"op": "linear", "models": ["math", "code"],
                             "weights": [0.5, 0.5]}},
        "output": {"from": "merged", "path": "out", **output}}, sort_keys=False)


def test_recipe_vocabulary_section(models: dict[str, Path], tmp_path: Path) -> None:
    built = build_recipe(recipe(models, {"source": "union", "base": "base"}))
    (_, merged), = built.outputs()
    assert merged.spec("model.embed_tokens.weight").shape == (390, 64)
    assert merged.config["vocab_size"] == 390


@pytest.mark.parametrize(("vocabulary", "output", "message"), [
    ({"models": ["math", "cod"]}, {}, r"vocabulary\.models\.1.*no input named 'cod'; did you "
                                      "mean 'code'"),
    ({"source": "unoin"}, {}, r"vocabulary\.source.*'unoin' is not union or one of the "
                              "models"),
    ({"models": ["math", "code"], "base": "base"}, {},
     r"vocabulary\.base.*'base' is not one of the models"),
    ({}, {"tokenizer_from": "math"}, r"output\.tokenizer_from.*the vocabulary section gives"),
    ({"pad_to_multiple_of": 0}, {}, r"vocabulary\.pad_to_multiple_of"),
    ({"sorce": "union"}, {}, r"vocabulary\.sorce.*unknown key; did you mean 'source'"),
    ({"tokens": {"zebra": {"source": "mat"}}}, {},
     r"vocabulary\.tokens\.zebra\.source.*'mat' is not one of the models; did you mean"),
    ({"tokens": {"zebra": {"source": {"kind": "model_token", "model": "cod", "token": "a"}}}},
     {}, r"vocabulary\.tokens\.zebra\.source\.model.*'cod' is not one of the models"),
    ({"tokens": {"zebra": {"source": {"kind": "model_token", "model": "code"}}}}, {},
     r"vocabulary\.tokens\.zebra\.source.*give token_id or token"),
    ({"tokens": {"nosuch": {"source": {"kind": "zero"}}}}, {},
     r"vocabulary: tokens: 'nosuch' is not a token of the output vocabulary"),
])
def test_recipe_vocabulary_errors(vocabulary: dict, output: dict, message: str,
                                  models: dict[str, Path]) -> None:
    with pytest.raises(RecipeError, match=message):
        build_recipe(recipe(models, vocabulary, **output))


def test_a_model_without_a_tokenizer_is_named(models: dict[str, Path], tmp_path: Path
                                              ) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(models["code"], bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(RecipeError, match=r"recipe\.yaml:\d+:\d+: vocabulary: code \(.*bare\) "
                                          "has no tokenizer files"):
        build_recipe(recipe({**models, "code": bare}, {}))


def test_row_blocks_give_the_same_bytes(models: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors a vocabulary passes through are computed in row blocks (with TIES's
    whole-tensor statistics ahead), the vocabulary tensors whole: the same bytes as one
    block per tensor."""
    from surgery import ties
    from surgery.engine import stream
    from surgery.expr import node

    b, m, c = (load(models[k]) for k in ("base", "math", "code"))
    aligned = align_vocabularies([b, m, c], base=0)
    merged = ties(aligned[0], aligned[1:], density=0.5)
    assert stream.is_rowwise(merged.node, "model.layers.0.mlp.up_proj.weight")
    assert not stream.is_rowwise(merged.node, "lm_head.weight")
    merged.save(tmp_path / "whole")
    monkeypatch.setattr(stream, "ROW_BLOCK_ELEMENTS", 500)
    monkeypatch.setattr(stream, "CACHE_BLOCK_ELEMENTS", 300)
    monkeypatch.setattr(node, "PIECE_ELEMENTS", 400)
    merged.save(tmp_path / "blocks", threads=2)
    whole, blocked = tensors(tmp_path / "whole"), tensors(tmp_path / "blocks")
    assert whole.keys() == blocked.keys()
    for name, t in whole.items():
        assert torch.equal(t, blocked[name]), name
    assert len(stream._jobs(merged.node, "model.layers.0.mlp.up_proj.weight", True)) > 1


@pytest.mark.parametrize(("extra", "message"), [
    ({"tokenizer": {"source": "union", "tokens": {"<tool>": {"source": "elsewhere"}}}},
     r"mk\.yml:\d+:\d+: tokenizer\.tokens\.<tool>\.source: 'elsewhere' is not one of the "
     "merge's models"),
    ({"tokenizer": {"source": "union", "tokens": {"<tool>": {"force": True}}}},
     r"tokenizer\.tokens\.<tool>: a token needs its source"),
    ({"tokenizer": {"source": "union", "tokens": {"<tool>": {"source": {"kind": "one"}}}}},
     r"tokenizer\.tokens\.<tool>\.source: the source is a model"),
    ({"tokenizer": {"tokens": {"<tool>": {"source": {"kind": "zero"}, "forse": True}}}},
     r"tokenizer\.tokens\.<tool>\.forse: unknown key"),
    ({"tokenizer": {"source": "union"}, "tokenizer_source": "base"},
     r"mk\.yml:\d+:\d+: tokenizer: give tokenizer_source or a tokenizer: section"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, r"tokenizer\.pad_to_multiple_of: .*positive"),
    ({"tokenizer": {"sorce": "union"}}, r"tokenizer\.sorce: unknown key"),
    ({"tokenizer_source": "broken"}, r"mk\.yml:3:1: tokenizer_source: .*cannot load its "
                                     "tokenizer"),
])
def test_mergekit_tokenizer_errors(extra: dict, message: str, models: dict[str, Path],
                                   tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models["code"], broken)
    (broken / "tokenizer.json").write_text('{"broken')
    config = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
              "models": [{"model": str(models["math"]), "parameters": {"weight": 0.5}},
                         {"model": str(broken), "parameters": {"weight": 0.5}}]}
    extra = {k: str(broken) if v == "broken" else v for k, v in extra.items()}
    path = tmp_path / "mk.yml"
    path.write_text(yaml.safe_dump({**{k: config[k] for k in ("merge_method", "base_model")},
                                    **extra, "models": config["models"]}, sort_keys=False))
    with pytest.raises(RecipeError, match=message):
        load_mergekit(path, str(tmp_path / "out"))


def test_a_finetune_of_the_merge_tokenizes_with_its_vocabulary(models: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """A finetune step after an aligned merge tokenizes its data with the union tokenizer
    (code's <tool> is one token), and writes a model whose tokenizer fits its rows."""
    from transformers import AutoTokenizer

    from surgery.train.operations import tokenizer_of

    merged = linear(align_vocabularies([load(models["math"]), load(models["code"])]))
    tok = tokenizer_of(merged)
    assert len(tok) == 390 and tok("<tool>")["input_ids"][-1] == 389
    text = yaml.safe_dump({
        "inputs": {"math": str(models["math"]), "code": str(models["code"])},
        "vocabulary": {"source": "union"},
        "steps": {"merged": {"op": "linear", "models": ["math", "code"]},
                  "tuned": {"op": "finetune", "model": "merged", "steps": 1, "batch_size": 2,
                            "data": str(BASE.parents[1] / "data" / "chat.jsonl")}},
        "output": {"from": "tuned", "path": str(tmp_path / "tuned")}})
    run_recipe(build_recipe(text))
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tuned")) == 390
    assert tensors(tmp_path / "tuned")["lm_head.weight"].shape == (390, 64)


def test_a_tokenizer_with_tokens_past_its_rows_is_stripped(tmp_path: Path) -> None:
    """The output's tokenizer loses the tokens at ids past its model's rows, from the BPE
    vocabulary and the added tokens, with the merges that make or use one (a merge that made a
    stripped token would not load); every other token keeps its id. A tokenizer that is not
    BPE cannot be stripped and is named."""
    from transformers import AutoTokenizer

    path = over(MATH, tmp_path / "over", ["qz", "qzq"], ["<|extra|>"], ["q z", "qz q"])
    original = AutoTokenizer.from_pretrained(path)
    assert original("qzq", add_special_tokens=False)["input_ids"] == [385]  # one token
    merged = linear(align_vocabularies([load(path), load(MATH)], source=0))
    merged.save(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    kept = {t: i for t, i in original.get_vocab().items() if i < 384}
    assert tok.get_vocab() == kept and len(kept) == 384
    spec = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    before = json.loads((path / "tokenizer.json").read_text())["model"]["merges"]
    assert spec["model"]["merges"] == before[:-2]  # q z and qz q gone, the rest in order
    q, z = kept["q"], kept["z"]
    assert tok("qzq", add_special_tokens=False)["input_ids"] == [q, z, q]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 384
    # not BPE: named, with the first token past the rows
    bert = tmp_path / "bert"
    shutil.copytree(ROOT / "fixtures" / "tiny-bert" / "base", bert)
    wp = AutoTokenizer.from_pretrained(bert)
    rows = json.loads((bert / "config.json").read_text())["vocab_size"]
    wp.add_tokens(["<|extra|>"])
    wp.save_pretrained(bert)
    with pytest.raises(UsageError, match=rf"bert.*: its tokenizer has 1 token\(s\) at ids past "
                       rf"the model's {rows} embedding rows \(first '<\|extra\|>' at {rows}\), "
                       r"and only a BPE tokenizer can be stripped of them \(this one is "
                       r"WordPiece\)"):
        align_vocabularies([load(bert), load(ROOT / "fixtures" / "tiny-bert" / "base")],
                           source=0)
