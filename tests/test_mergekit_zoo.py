"""TIES, SLERP and DARE against mergekit's ``run_merge`` (float32 compute, ``dtype: float32``) on
the committed tiny-llama fixtures (base, math and code fine-tunes).

Where the semantics are the same the outputs are equal bit for bit. Known differences:
- TIES trim: mergekit keeps max(1, ⌊density·n⌋) entries chosen by an unstable argsort, so tied
  magnitudes at the threshold are kept in an unspecified order; we select by k-th value and keep
  ties by lower flat index, and keep ⌊density·n⌋ (possibly 0). The fixtures' float32 task
  vectors have no ties at the threshold and density·n ≥ 1 here, so the outputs agree exactly.
  mergekit also compares sign(w_i·τ̂_i) with the elected sign where METHODS.md compares
  sign(τ̂_i): the same for the positive weights used here.
- SLERP: mergekit falls back to linear at |cos| > 0.9995; we default to 1 − 1e-6 (METHODS.md),
  so the comparison passes ``epsilon=5e-4``. The base and the math fine-tune's RMSNorm weights
  are that colinear (cos ≈ 0.99993 in block 3), so the default gives a different result there,
  as asserted.
- DARE: mergekit draws drops from torch's global RNG, we from a generator per tensor name, so
  only the statistics can agree: kept fraction, the L1 norm kept by ``rescale: l1`` (mergekit's
  rescale), and the elected sign of ``dare_ties`` on entries both kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from surgery import Weights, dare_linear, dare_ties, load, slerp, ties
from tests.conftest import fixture_dir


@pytest.fixture(scope="module")
def llama() -> list[Path]:
    return [fixture_dir("tiny-llama", n) for n in ("base", "math", "code")]


def mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate({"dtype": "float32", **config}), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def assert_same(ours: Weights, theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours.names) == set(theirs)
    for name in ours.names:
        assert torch.equal(ours[name], theirs[name]), name


def test_ties_equals_mergekit(llama: list[Path], tmp_path: Path) -> None:
    base, m1, m2 = llama
    theirs = mergekit({
        "merge_method": "ties", "base_model": str(base),
        "parameters": {"lambda": 0.8},
        "models": [{"model": str(m1), "parameters": {"density": 0.3, "weight": 0.7}},
                   {"model": str(m2), "parameters": {"density": 0.3, "weight": 0.4}}],
    }, tmp_path / "mk")
    ours = ties(load(base), [load(m1), load(m2)], density=0.3, weights=[0.7, 0.4],
                lambda_=0.8)
    assert_same(ours, theirs)


def test_ties_gradient_density_equals_mergekit(llama: list[Path], tmp_path: Path) -> None:
    base, m1, m2 = llama
    theirs = mergekit({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"density": [0.2, 0.9], "weight": 1.0}}
                   for m in (m1, m2)],
    }, tmp_path / "mk")
    assert_same(ties(load(base), [load(m1), load(m2)], density=[0.2, 0.9]), theirs)


def test_slerp_equals_mergekit(llama: list[Path], tmp_path: Path) -> None:
    base, m1, _ = llama
    theirs = mergekit({
        "merge_method": "slerp", "base_model": str(base), "parameters": {"t": [0.1, 0.8, 0.5]},
        "models": [{"model": str(base)}, {"model": str(m1)}],
    }, tmp_path / "mk")
    assert_same(slerp(load(base), load(m1), t=[0.1, 0.8, 0.5], epsilon=5e-4), theirs)
    ours = slerp(load(base), load(m1), t=[0.1, 0.8, 0.5])
    norm = "model.layers.3.input_layernorm.weight"
    assert not torch.equal(ours[norm], theirs[norm])
    assert torch.allclose(ours[norm], theirs[norm], atol=1e-3)  # an arc of ~0.02 rad


def _kept(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return out != base


def test_dare_statistics_match_mergekit(llama: list[Path], tmp_path: Path) -> None:
    base, m1, m2 = llama
    torch.manual_seed(0)
    theirs = mergekit({
        "merge_method": "dare_linear", "base_model": str(base),
        "models": [{"model": str(m1), "parameters": {"density": 0.4, "weight": 1.0}}],
    }, tmp_path / "mk")
    b, f = load(base), load(m1)
    ours = dare_linear(b, [f], density=0.4, rescale="l1")
    name = "model.layers.2.mlp.down_proj.weight"  # 8192 entries
    theta0, tau = b[name], f[name] - b[name]
    sigma = (0.4 * 0.6 / tau.numel()) ** 0.5
    for out in (ours[name], theirs[name]):
        assert abs(_kept(out, theta0).double().mean().item() - 0.4) < 5 * sigma
        assert (out - theta0).abs().sum().item() == pytest.approx(tau.abs().sum().item(),
                                                                   rel=1e-4)
    torch.manual_seed(0)
    theirs_ties = mergekit({
        "merge_method": "dare_ties", "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 1.0}}
                   for m in (m1, m2)],
    }, tmp_path / "mk-ties")
    ours_ties = dare_ties(b, [f, load(m2)], density=0.5, rescale="l1")
    # Where exactly one model moved an entry in both runs, the result is that model's
    # rescaled entry in both, so the signs of the updates must agree there.
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.5.mlp.up_proj.weight"):
        theta0 = b[name]
        a, c = ours_ties[name] - theta0, theirs_ties[name] - theta0
        both = (a != 0) & (c != 0)
        assert both.double().mean().item() > 0.3
        agree = (a.sign() == c.sign())[both].double().mean().item()
        assert agree > 0.7
