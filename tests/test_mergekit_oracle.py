"""Linear soups and task arithmetic agree with mergekit bit for bit (float32 compute) on the
fixtures, and the merged models load and run in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery import linear, load, task_arithmetic
from tests.conftest import fixture_dir

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit (the oracle) missing")


def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions

    mergekit_merge.run_merge(MergeConfiguration.model_validate(config), str(out),
                             MergeOptions(copy_tokenizer=False, write_model_card=False,
                                          lazy_unpickle=False, quiet=True))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def weighted(paths: list[Path], weights: list) -> list[dict]:
    """mergekit's model entries, one weight (scalar or gradient) each."""
    return [{"model": str(p), "parameters": {"weight": w}}
            for p, w in zip(paths, weights, strict=True)]


def ours(path: Path) -> dict[str, torch.Tensor]:
    w = load(path)
    ck = w.node.checkpoints()[0]
    return {n: ck.read(n) for n in w.names}


def assert_same(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(mine) == set(theirs)
    for name, t in theirs.items():
        assert mine[name].dtype == t.dtype, name
        assert torch.equal(mine[name], t), f"{name}: max diff {(mine[name] - t).abs().max()}"


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_linear_matches_mergekit(family: str, tmp_path: Path) -> None:
    paths = [fixture_dir(family, n) for n in ("math", "code", "chat")]
    weights = [0.5, 0.3, 0.2]
    theirs = run_mergekit({
        "merge_method": "linear", "dtype": "float32",
        "models": weighted(paths, weights),
    }, tmp_path / "mk")
    linear([load(p) for p in paths], weights).save(tmp_path / "ours")
    assert_same(ours(tmp_path / "ours"), theirs)


@pytest.mark.parametrize(("family", "normalize", "lam"),
                         [("tiny-llama", False, 1.0), ("tiny-llama", True, 0.7),
                          ("tiny-gpt2", False, 0.5)])
def test_task_arithmetic_matches_mergekit(family: str, normalize: bool, lam: float,
                                          tmp_path: Path) -> None:
    base = fixture_dir(family, "base")
    paths = [fixture_dir(family, n) for n in ("math", "code", "chat")]
    weights = [1.0, 0.6, 0.3]
    theirs = run_mergekit({
        "merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(base),
        "parameters": {"normalize": normalize, "lambda": lam},
        "models": weighted(paths, weights),
    }, tmp_path / "mk")
    task_arithmetic(load(base), [load(p) for p in paths], weights, lambda_=lam,
                    normalize=normalize).save(tmp_path / "ours")
    assert_same(ours(tmp_path / "ours"), theirs)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_soup_of_one_model_has_that_models_logits(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = fixture_dir(family, "math")
    linear([load(src)]).save(tmp_path / "soup")
    tok = AutoTokenizer.from_pretrained(tmp_path / "soup")
    ids = tok("12+7=19\n3+4=7", return_tensors="pt").input_ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "soup").eval()(ids).logits
    assert torch.equal(got, want)


def test_bf16_merge_loads_and_runs_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = load(fixture_dir("tiny-llama", "base"))
    fts = [load(fixture_dir("tiny-llama", n)) for n in ("math", "code")]
    task_arithmetic(base, fts, lambda_=0.5).save(tmp_path / "m", dtype="bfloat16",
                                                  shard_size="300KB")
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_scheduled_weights_match_mergekit(family: str, tmp_path: Path) -> None:
    """Depth-gradient weights (and λ) resolve per tensor exactly as mergekit's gradients."""
    base = fixture_dir(family, "base")
    paths = [fixture_dir(family, n) for n in ("math", "code", "chat")]
    weights: list = [[0.2, 0.9], 0.5, [1.0, 0.1, 0.4]]
    theirs = run_mergekit({
        "merge_method": "linear", "dtype": "float32",
        "models": weighted(paths, weights),
    }, tmp_path / "mk-linear")
    linear([load(p) for p in paths], weights).save(tmp_path / "linear")
    assert_same(ours(tmp_path / "linear"), theirs)
    theirs = run_mergekit({
        "merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(base),
        "parameters": {"normalize": True, "lambda": [0.5, 1.5]},
        "models": weighted(paths, weights),
    }, tmp_path / "mk-ta")
    task_arithmetic(load(base), [load(p) for p in paths], weights, lambda_=[0.5, 1.5],
                    normalize=True).save(tmp_path / "ta")
    assert_same(ours(tmp_path / "ta"), theirs)
