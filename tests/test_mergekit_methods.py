"""The merge methods of mergekit 0.1.5 that TIES, DARE, SLERP and the soups do not cover, against
mergekit's ``run_merge`` (``dtype: float32``) on the tiny-llama fixtures (base; math, code and
chat fine-tunes). Deterministic methods agree bit for bit. DELLA draws: with ``rng="torch"``
ours draws from a generator seeded per tensor (``della_torch_seed``); mergekit draws from
torch's global generator, which the test seeds with the same value before each tensor (its
``merge_group`` wrapped), and then the outputs agree bit for bit too; the default hash draws are
compared by their statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from surgery import PerModel, Weights, load
from surgery.errors import UsageError
from surgery.methods import ties_dare
from surgery.methods.pass_through import passthrough
from surgery.methods.sphere_means import karcher, multislerp, nuslerp
from surgery.methods.stock import _interpolate, model_stock
from surgery.methods.swaps import arcee_fusion, nearswap
from surgery.methods.task_merges import (
    breadcrumbs,
    breadcrumbs_mask,
    breadcrumbs_ties,
    della,
    della_keep,
    della_linear,
    della_probabilities,
    della_torch_seed,
    hash_draw,
    ram,
    ramplus_tl,
    sce,
)
from tests.conftest import fixture_dir

FINETUNES = ("math", "code", "chat")


@pytest.fixture(scope="module")
def paths() -> dict[str, Path]:
    return {n: fixture_dir("tiny-llama", n) for n in ("base", *FINETUNES)}


@pytest.fixture(scope="module")
def models(paths: dict[str, Path]) -> dict[str, Weights]:
    return {n: load(p) for n, p in paths.items()}


def mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate({"dtype": "float32", **config}), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def entries(paths: dict[str, Path], names: tuple[str, ...] = FINETUNES,
            **params: Any) -> list[dict]:
    """mergekit's model entries; a list value gives one per model."""
    return [{"model": str(paths[n]),
             "parameters": {k: v[i] if isinstance(v, tuple) else v for k, v in params.items()}}
            for i, n in enumerate(names)]


def assert_same(ours: Weights, theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours.names) == set(theirs)
    for name in ours.names:
        mine = ours[name]
        assert torch.equal(mine, theirs[name]), \
            f"{name}: max diff {(mine - theirs[name]).abs().max().item()}"


def fts(models: dict[str, Weights], names: tuple[str, ...] = FINETUNES) -> list[Weights]:
    return [models[n] for n in names]


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_mergekit(paths: dict[str, Path], models: dict[str, Weights],
                                     filter_wise: bool, tmp_path: Path) -> None:
    theirs = mergekit({"merge_method": "model_stock", "base_model": str(paths["base"]),
                       "parameters": {"filter_wise": filter_wise},
                       "models": entries(paths)}, tmp_path / "mk")
    assert_same(model_stock(models["base"], fts(models), filter_wise=filter_wise), theirs)


def test_model_stock_by_hand() -> None:
    """Two orthogonal unit task vectors: cos = 0, t = 0, the base; opposite ones of equal
    length sit at the singularity (1 + cos = 0) and keep the base; at cos = 1/2, t = 2/3."""
    from surgery.methods.stock import model_stock_tensors

    base = torch.tensor([1.0, 1.0, 1.0])
    a, b = base + torch.tensor([1.0, 0, 0]), base + torch.tensor([0, 1.0, 0])
    assert torch.equal(model_stock_tensors(base, [a, b]), base)
    assert torch.equal(model_stock_tensors(base, [a, 2 * base - a]), base)
    c = base + torch.tensor([0.5, 0.75 ** 0.5, 0])  # cos(a - base, c - base) = 1/2
    out = model_stock_tensors(base, [a, c])
    assert torch.allclose(out, base + 2 / 3 * ((a + c) / 2 - base), atol=1e-6)


def test_model_stock_gram_of_a_large_tensor() -> None:
    """Above EXACT_ELEMENTS the angle comes from task_gram: float32 products over chunks of
    GRAM_CHUNK entries (here two chunks and a remainder of 1808), summed in float64, equal to
    the float64 products of the task vectors to 1e-6; by hand on a tiny case."""
    from surgery.methods.stock import GRAM_CHUNK, task_gram

    g = torch.Generator().manual_seed(3)
    base = torch.randn(2 * GRAM_CHUNK + 1808, generator=g).bfloat16()
    models = [(base.float() + 0.01 * torch.randn(base.shape, generator=g)).bfloat16()
              for _ in range(3)]
    taus = torch.stack([m.double() - base.double() for m in models])
    assert torch.allclose(task_gram([base, *models]), taus @ taus.T, rtol=1e-6, atol=0)
    # The same on a fresh thread as on one whose buffers grew on a larger piece first.
    import threading

    odd = [v[:GRAM_CHUNK + 1001] for v in (base, *models)]
    fresh: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: fresh.append(task_gram(odd)))
    worker.start()
    worker.join()
    task_gram([base, *models])
    assert torch.equal(task_gram(odd), fresh[0])
    one = torch.tensor([1.0, 2.0])
    assert torch.equal(task_gram([one, one + torch.tensor([1.0, 0]), one + torch.tensor([3.0, 4])]),
                       torch.tensor([[1.0, 3.0], [3.0, 25.0]], dtype=torch.float64))


@pytest.mark.parametrize(("op", "fn", "params"), [
    ("breadcrumbs", breadcrumbs, {}),
    ("breadcrumbs", breadcrumbs, {"normalize": True, "rescale": True, "lambda": 0.7}),
    ("breadcrumbs_ties", breadcrumbs_ties, {}),
    ("breadcrumbs_ties", breadcrumbs_ties, {"normalize": True, "lambda": 1.3}),
])
def test_breadcrumbs_equals_mergekit(paths: dict[str, Path], models: dict[str, Weights],
                                     op: str, fn: Any, params: dict, tmp_path: Path) -> None:
    theirs = mergekit({"merge_method": op, "base_model": str(paths["base"]),
                       "parameters": params,
                       "models": entries(paths, density=0.6, gamma=0.05,
                                         weight=(1.0, 0.5, 0.8))}, tmp_path / "mk")
    ours = fn(models["base"], fts(models), density=0.6, gamma=0.05, weights=[1.0, 0.5, 0.8],
              lambda_=params.get("lambda", 1.0), normalize=params.get("normalize", False),
              rescale=params.get("rescale", False))
    assert_same(ours, theirs)


def test_breadcrumbs_mask_by_hand() -> None:
    """n = 10, density 0.5, gamma 0.2: the 2 largest magnitudes go, the next 5 stay; with
    gamma 0.8 the outliers shrink to the 5 that leave 5 kept."""
    tau = torch.tensor([0.1, -0.9, 0.3, 0.5, -0.2, 0.8, 0.05, -0.6, 0.4, 0.7])
    got = breadcrumbs_mask(tau, 0.5, 0.2)
    assert torch.equal(got, torch.tensor([0, 0, 0.3, 0.5, 0, 0, 0, -0.6, 0.4, 0.7]))
    got = breadcrumbs_mask(tau, 0.5, 0.8)
    assert torch.equal(got, torch.tensor([0.1, 0, 0.3, 0, -0.2, 0, 0.05, 0, 0.4, 0]))
    assert torch.equal(breadcrumbs_mask(tau, 1.0, 0.2), tau)


def _seeded_mergekit(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Seed torch's global generator before each tensor mergekit merges, as ``rng="torch"``
    seeds its own generator."""
    original = GeneralizedTaskArithmeticMerge.merge_group

    def merge_group(self: Any, group: Any, /, **parameters: Any) -> torch.Tensor:
        torch.manual_seed(della_torch_seed(seed, group.metadata.name))
        return original(self, group, **parameters)

    monkeypatch.setattr(GeneralizedTaskArithmeticMerge, "merge_group", merge_group)


@pytest.mark.parametrize(("op", "fn", "params"), [
    ("della", della, {}),
    ("della", della, {"normalize": False, "lambda": 0.8}),
    ("della_linear", della_linear, {}),
    ("della_linear", della_linear, {"normalize": True, "rescale": False}),
])
def test_della_torch_draws_equal_mergekit(paths: dict[str, Path], models: dict[str, Weights],
                                          op: str, fn: Any, params: dict, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _seeded_mergekit(monkeypatch, 0)
    theirs = mergekit({"merge_method": op, "base_model": str(paths["base"]),
                       "parameters": params,
                       "models": entries(paths, density=0.4, epsilon=0.1,
                                         weight=(1.0, 0.6, 0.9))}, tmp_path / "mk")
    kwargs = {"normalize": params["normalize"]} if "normalize" in params else {}
    ours = fn(models["base"], fts(models), density=0.4, epsilon=0.1, weights=[1.0, 0.6, 0.9],
              lambda_=params.get("lambda", 1.0),
              rescale="l1" if params.get("rescale", True) else "none", rng="torch", **kwargs)
    assert_same(ours, theirs)


# Per-model sparsification parameters, as mergekit's models: - parameters: {density: ...}:
# a gradient, a scalar and (for the third model) a density of 1, which keeps it whole.
PER_MODEL_DENSITY = ([0.9, 0.5, 0.2], 0.6, 1.0)


@pytest.mark.parametrize(("op", "extra"), [
    ("ties", {}),
    ("breadcrumbs", {"gamma": (0.02, [0.1, 0.0], 0.05)}),
    ("breadcrumbs_ties", {"gamma": (0.0, 0.08, 0.05)}),
    ("della", {"epsilon": (0.05, 0.3, 0.1)}),
    ("della_linear", {"epsilon": (0.05, 0.3, 0.1)}),
])
def test_per_model_parameters_equal_mergekit(paths: dict[str, Path], models: dict[str, Weights],
                                             op: str, extra: dict, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each model trimmed (or dropped) with its own density, gamma or epsilon: a PerModel
    schedule, bit for bit with mergekit's per-model parameters (DELLA with torch draws)."""
    import surgery.methods.task_merges as task_merges

    _seeded_mergekit(monkeypatch, 0)
    weights = (1.0, 0.6, 0.9)
    theirs = mergekit({"merge_method": op, "base_model": str(paths["base"]),
                       "models": entries(paths, density=PER_MODEL_DENSITY, weight=weights,
                                         **extra)}, tmp_path / "mk")
    fn = getattr(ties_dare, op, None) or getattr(task_merges, op)
    kwargs = {k: PerModel(per_model=list(v)) for k, v in extra.items()}
    if op.startswith("della"):
        kwargs["rng"] = "torch"
    ours = fn(models["base"], fts(models), density=PerModel(per_model=list(PER_MODEL_DENSITY)),
              weights=list(weights), **kwargs)
    assert_same(ours, theirs)
    # a model with its own density is not the shared one: the third model's 1.0 matters
    shared = fn(models["base"], fts(models), density=0.6, weights=list(weights), **kwargs)
    name = "model.layers.3.mlp.up_proj.weight"
    assert not torch.equal(ours[name], shared[name])


def test_per_model_dare_by_formula(models: dict[str, Weights]) -> None:
    """dare_linear with densities 0.3 and 0.8: each task vector dropped by its own density
    (the hash of its model index) and rescaled by 1/density_i before the sum."""
    from surgery.methods.ties_dare import dare_key, dare_linear, drop_entries

    base, fs = models["base"], fts(models, ("math", "code"))
    ours = dare_linear(base, fs, density=PerModel(per_model=[0.3, 0.8]))
    seed = 0  # the seed of a tensor read from the expression
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        want = torch.zeros_like(base[name])
        for i, (f, d) in enumerate(zip(fs, (0.3, 0.8), strict=True)):
            tau = (f[name] - base[name]).reshape(-1)
            drop_entries(tau, 0, d, lambda high, i=i, name=name: dare_key(seed, name, i, high))
            kept = (tau != 0).double().mean().item()
            assert abs(kept - d) < 5 * (d * (1 - d) / tau.numel()) ** 0.5 + 1e-9, (name, i)
            want += tau.reshape(want.shape) / d
        assert torch.allclose(ours[name], base[name] + want, rtol=0, atol=1e-6), name


def test_della_hash_draws_have_mergekits_statistics(models: dict[str, Weights],
                                                    tmp_path: Path) -> None:
    """Default (hash) draws: each entry kept with its MagPrune probability, so the kept
    fraction of a 128x64 tensor is density within 5σ, larger magnitudes are kept more often
    (ranks of the top half within a row against the bottom half: 0.5 ± 0.1 vs 0.3 ± 0.1 here),
    the l1 rescale keeps ‖τ‖₁, and a different seed draws a different mask."""
    base, ft = models["base"], models["math"]
    name = "model.layers.1.mlp.up_proj.weight"
    tau = ft[name] - base[name]
    ours = della_linear(base, [ft], density=0.4, epsilon=0.1)
    kept = (ours[name] - base[name]) != 0
    n = kept.numel()
    assert abs(kept.double().mean().item() - 0.4) < 5 * (0.4 * 0.6 / n) ** 0.5
    p = della_probabilities(tau, 0.4, 0.1)
    top = p > 0.4
    assert kept[top].double().mean().item() == pytest.approx(0.45, abs=0.02)
    assert kept[~top].double().mean().item() == pytest.approx(0.35, abs=0.02)
    assert (ours[name] - base[name]).abs().sum().item() == pytest.approx(
        tau.abs().sum().item(), rel=1e-4)
    ours.save(tmp_path / "seed1", seed=1)
    other = load_file(tmp_path / "seed1" / "model.safetensors")[name]
    assert not torch.equal((other - base[name]) != 0, kept)


def test_della_probabilities_by_hand() -> None:
    tau = torch.tensor([[0.3, -0.1, 0.2], [1.0, 2.0, -3.0]])
    for ties in ("torch", "index"):
        p = della_probabilities(tau, 0.5, 0.1, ties)
        assert torch.allclose(p, torch.tensor([[0.6, 0.4, 0.5], [0.4, 0.5, 0.6]]))
    # Equal magnitudes by position: ranks 2, 3, 1, 4 of four.
    p = della_probabilities(torch.tensor([0.5, -0.5, 0.1, 0.5]), 0.5, 0.3, "index")
    assert torch.allclose(p, torch.tensor([[0.4, 0.6, 0.2, 0.8]]))
    g = torch.Generator().manual_seed(1)
    quantised = (torch.randn(64, 256, generator=g) * 4).round() / 4  # many ties per row
    ranks = della_probabilities(quantised, 0.5, 0.25, "index")
    stable = torch.sort(quantised.abs(), dim=1, stable=True).indices
    want = torch.empty_like(ranks).scatter_(
        1, stable, torch.linspace(0.25, 0.75, 256).expand(64, 256))
    assert torch.allclose(ranks, want)


def test_della_keep_equals_the_probabilities_and_their_draws() -> None:
    """The sorted-order verdicts (della_keep) are hash_draw(della_probabilities) entry for
    entry: rows with many ties and zeros, a 1-D tensor, a piece starting mid-tensor, positions
    past 2³² (their own key) and a piece across 2³² (the plain path)."""
    g = torch.Generator().manual_seed(3)
    quantised = (torch.randn(37, 300, generator=g) * 3).round() / 8  # ties and zeros
    cases = [(quantised, 0), (quantised, 12_345), (quantised[0], 7), (quantised, (1 << 32) + 9),
             (quantised, (1 << 32) - 5_000), (quantised[:, :1], 3)]
    for tau, start in cases:
        for d, e in ((0.4, 0.1), (0.5, 0.3)):
            want = hash_draw(0, "w", 1)(della_probabilities(tau, d, e, "index"), start) != 0
            out = torch.empty(want.numel(), dtype=torch.bool)
            della_keep(tau, d, e, 0, "w", 1, start, out)
            assert torch.equal(out, want.reshape(-1)), (tuple(tau.shape), start, d)
            assert 0 < out.double().mean() < 1 or tau.shape[-1] == 1


def test_out_of_range_parameters_are_one_line_errors(models: dict[str, Weights]) -> None:
    base, fs = models["base"], fts(models)
    with pytest.raises(UsageError, match=r"della: density 0\.1 and epsilon 0\.15 .*\(0, 1\)"):
        della(base, fs, density=0.1)
    with pytest.raises(UsageError, match=r"breadcrumbs: gamma 1\.5 is outside \[0, 1\]"):
        breadcrumbs(base, fs, density=0.5, gamma=1.5)
    with pytest.raises(UsageError, match=r"breadcrumbs_ties: density 0\.0 is outside"):
        breadcrumbs_ties(base, fs, density=0.0)
    with pytest.raises(UsageError, match="model_stock: needs at least two"):
        model_stock(base, fs[:1])


def test_breadcrumbs_torch_sort_ties_equal_mergekits_sparsify() -> None:
    """A task vector of a bf16 checkpoint has many equal magnitudes at the cuts: ``index``
    orders them by position, ``torch_sort`` as mergekit's own ``magnitude_outliers`` does."""
    from mergekit.sparsify import magnitude_outliers

    g = torch.Generator().manual_seed(3)
    base = torch.randn(256, 96, generator=g).bfloat16().float()
    tau = (base + 0.002 * torch.randn(256, 96, generator=g)).bfloat16().float() - base
    assert tau.abs().unique().numel() < tau.numel() // 4  # ties everywhere
    theirs = magnitude_outliers(tau, density=0.7, gamma=0.05)
    assert torch.equal(breadcrumbs_mask(tau, 0.7, 0.05, "torch_sort"), theirs)
    ours = breadcrumbs_mask(tau, 0.7, 0.05)
    assert not torch.equal(ours, theirs)
    assert (ours != 0).sum() == (theirs != 0).sum()
    # Same counts and same magnitudes kept; only which of the tied entries differs.
    assert torch.equal(ours.abs().flatten().sort().values, theirs.abs().flatten().sort().values)


@pytest.mark.parametrize(("with_base", "params"), [
    (False, {}),
    (True, {}),
    (True, {"nuslerp_flatten": False}),
    (False, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
])
def test_nuslerp_equals_mergekit(paths: dict[str, Path], models: dict[str, Weights],
                                 with_base: bool, params: dict, tmp_path: Path) -> None:
    config: dict[str, Any] = {"merge_method": "nuslerp", "parameters": params,
                              "models": entries(paths, ("math", "code"), weight=(0.3, 0.5))}
    if with_base:
        config["base_model"] = str(paths["base"])
    theirs = mergekit(config, tmp_path / "mk")
    ours = nuslerp(fts(models, ("math", "code")), [0.3, 0.5],
                   models["base"] if with_base else None,
                   row_wise=params.get("nuslerp_row_wise", False),
                   flatten=params.get("nuslerp_flatten", True))
    assert_same(ours, theirs)


@pytest.mark.parametrize(("with_base", "params"), [(False, {}), (True, {}),
                                                   (True, {"normalize_weights": False})])
def test_multislerp_equals_mergekit(paths: dict[str, Path], models: dict[str, Weights],
                                    with_base: bool, params: dict, tmp_path: Path) -> None:
    config: dict[str, Any] = {"merge_method": "multislerp", "parameters": params,
                              "models": entries(paths, weight=(0.5, 0.2, 0.3))}
    if with_base:
        config["base_model"] = str(paths["base"])
    theirs = mergekit(config, tmp_path / "mk")
    ours = multislerp(fts(models), [0.5, 0.2, 0.3], models["base"] if with_base else None,
                      normalize_weights=params.get("normalize_weights", True))
    assert_same(ours, theirs)


def test_karcher_equals_mergekit(paths: dict[str, Path], models: dict[str, Weights],
                                 tmp_path: Path) -> None:
    theirs = mergekit({"merge_method": "karcher", "parameters": {"max_iter": 5, "tol": 1e-6},
                       "models": entries(paths)}, tmp_path / "mk")
    assert_same(karcher(fts(models), max_iter=5, tol=1e-6), theirs)


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_equals_mergekit(paths: dict[str, Path], models: dict[str, Weights],
                             select_topk: float, tmp_path: Path) -> None:
    theirs = mergekit({"merge_method": "sce", "base_model": str(paths["base"]),
                       "parameters": {"select_topk": select_topk},
                       "models": entries(paths)}, tmp_path / "mk")
    assert_same(sce(models["base"], fts(models), select_topk), theirs)


@pytest.mark.parametrize(("op", "params"), [("ram", {"epsilon": 0.02}),
                                            ("ramplus_tl", {"epsilon": 0.02}),
                                            ("ramplus_tl", {"r": 0.5, "alpha": 0.7,
                                                            "epsilon": 0.01})])
def test_ram_equals_mergekit(paths: dict[str, Path], models: dict[str, Weights], op: str,
                             params: dict, tmp_path: Path) -> None:
    theirs = mergekit({"merge_method": op, "base_model": str(paths["base"]),
                       "parameters": params, "models": entries(paths)}, tmp_path / "mk")
    if op == "ram":
        ours = ram(models["base"], fts(models), **params)
    else:
        ours = ramplus_tl(models["base"], fts(models), **params)
    assert_same(ours, theirs)


def test_nearswap_and_arcee_fusion_equal_mergekit(paths: dict[str, Path],
                                                  models: dict[str, Weights],
                                                  tmp_path: Path) -> None:
    pair = [{"model": str(paths["math"])}]
    theirs = mergekit({"merge_method": "nearswap", "base_model": str(paths["base"]),
                       "parameters": {"t": 0.01}, "models": pair}, tmp_path / "mk-ns")
    assert_same(nearswap(models["base"], models["math"], 0.01), theirs)
    theirs = mergekit({"merge_method": "arcee_fusion", "base_model": str(paths["base"]),
                       "models": pair}, tmp_path / "mk-af")
    ours = arcee_fusion(models["base"], models["math"])
    assert_same(ours, theirs)
    name = "model.layers.0.mlp.gate_proj.weight"
    moved = (ours[name] != models["base"][name]).double().mean().item()
    assert 0 < moved < 0.5  # only the outliers of importance are taken


def test_small_cases_by_hand() -> None:
    from surgery.methods.swaps import nearswap_tensors
    from surgery.methods.task_merges import ram_tensors

    a, b = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.005, 0.02, -0.04])
    # t = 0.01: within 0.01 b is taken; 0.02 away moves half way; 0.04 a quarter.
    assert torch.allclose(nearswap_tensors(a, b, 0.01), torch.tensor([0.005, 0.01, -0.01]))
    base = torch.zeros(3)
    t1, t2 = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])
    # entry 0 shared (mean 2), entry 1 unique (2), entry 2 untouched.
    assert torch.equal(ram_tensors(base, [t1, t2]), torch.tensor([2.0, 2.0, 0.0]))
    # RAM+: model 1 has 1 shared and 1 unique entry, rho = 1 -> clamp 0.2 -> x 1.1.
    assert torch.allclose(ram_tensors(base, [t1, t2], r=0.5), torch.tensor([2.0, 2.2, 0.0]))


RECIPE = """inputs: {{base: {d}/base, math: {d}/math, code: {d}/code, chat: {d}/chat}}
steps:
  m: {step}
output: {{from: m, path: out}}
"""


def _recipe(step: str) -> str:
    return RECIPE.format(d=fixture_dir("tiny-llama", "base").parent, step=step)


@pytest.mark.parametrize(("step", "message"), [
    ("{op: della, base: base, models: [math, code], density: 0.1}",
     r":3:3: steps\.m: della: density 0\.1 and epsilon 0\.15 .* must lie within \(0, 1\)"),
    ("{op: breadcrumbs_ties, base: base, models: [math], density: 0.5, gamma: 2}",
     r":3:3: steps\.m: breadcrumbs_ties: gamma 2\.0 is outside \[0, 1\]"),
    ("{op: karcher, models: [math, code], max_iter: 0}",
     r"steps\.m\.max_iter: Input should be greater than or equal to 1"),
    ("{op: sce, base: base, models: [math, code], select_topk: 1.5}",
     r"steps\.m\.select_topk: Input should be less than or equal to 1"),
    ("{op: nuslerp, models: [math], weights: [1]}", r"steps\.m\.models: List should have"),
    ("{op: model_stock, base: base, models: [math]}", r"steps\.m\.models: List should have"),
    ("{op: della_linear, base: base, models: [math], density: 0.5, rng: numpy}",
     r"steps\.m\.rng: Input should be 'hash' or 'torch'"),
    ("{op: nearswap, base: base, model: math, t: -1}", r"steps\.m: nearswap: t -1\.0 is neg"),
    ("{op: ties, base: base, models: [math, code], density: {per_model: [0.5, 1.5]}}",
     r":3:3: steps\.m: ties: density of models\[1\] \(.*code\) 1\.5 is outside \(0, 1\]"),
    ("{op: della, base: base, models: [math, code], density: 0.5, "
     "epsilon: {per_model: [0.1, 0.6]}}",
     r":3:3: steps\.m: della: density 0\.5 and epsilon 0\.6 of models\[1\] \(.*code\) "
     r"for tensor .* must lie within \(0, 1\)"),
    ("{op: breadcrumbs, base: base, models: [math, code], density: {per_model: [0.5]}}",
     r":3:3: steps\.m: breadcrumbs: density: per_model has 1 values for 2 models"),
    ("{op: dare_ties, base: base, models: [math], density: {per_model: [0.5], x: 1}}",
     r"steps\.m\.density\.x: unknown key"),
    ("{op: dare_ties, base: base, models: [math, code], density: {per_model: [0.5, abc]}}",
     r"steps\.m\.density\.per_model\.1: expected a number, a list of numbers"),
    ("{op: dare_ties, base: base, models: [math], density: {abc: 1}}",
     r"steps\.m\.density\.abc: unknown key"),
    ("{op: dare_ties, base: base, models: [math], density: abc}",
     r"steps\.m\.density: expected a number, .* rules, or \{per_model: \[\.\.\.\]\}"),
])
def test_recipe_parameters_out_of_range_are_one_line_errors(step: str, message: str) -> None:
    from surgery.errors import RecipeError
    from surgery.recipe.build import build_recipe

    with pytest.raises(RecipeError, match=message) as e:
        build_recipe(_recipe(step))
    assert "\n" not in str(e.value)


def test_recipe_steps_build_the_functions_graphs(models: dict[str, Weights]) -> None:
    from surgery.recipe.build import build_recipe

    name = "model.layers.2.self_attn.q_proj.weight"
    for step, ours in [
        ("{op: model_stock, base: base, models: [math, code, chat], filter_wise: true}",
         model_stock(models["base"], fts(models), filter_wise=True)),
        ("{op: breadcrumbs, base: base, models: [math, code], density: 0.6, gamma: 0.05, "
         "tie_break: torch_sort}",
         breadcrumbs(models["base"], fts(models, ("math", "code")), 0.6, 0.05,
                     tie_break="torch_sort")),
        ("{op: ties, base: base, models: [math, code], density: {per_model: [[0.9, 0.2], 0.5]}}",
         ties_dare.ties(models["base"], fts(models, ("math", "code")),
                        PerModel(per_model=[[0.9, 0.2], 0.5]))),
        ("{op: della_linear, base: base, models: [math, code], density: 0.5, "
         "epsilon: {per_model: [0.1, 0.3]}}",
         della_linear(models["base"], fts(models, ("math", "code")), 0.5,
                      PerModel(per_model=[0.1, 0.3]))),
        ("{op: multislerp, base: base, models: [math, code], weights: [0.2, 0.8]}",
         multislerp(fts(models, ("math", "code")), [0.2, 0.8], models["base"])),
    ]:
        recipe = build_recipe(_recipe(step))
        assert torch.equal(recipe.values["m"][name], ours[name]), step


def test_blocked_tensors_equal_mergekit(paths: dict[str, Path], models: dict[str, Weights],
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """Tensors computed in blocks of rows (as the engine does above 4M entries; here above
    1000) with whole-tensor statistics from pieces of 700 entries: breadcrumbs' cuts and
    filter-wise Model Stock are exact; per-tensor Model Stock is exact up to EXACT_ELEMENTS
    (here 5000) and agrees to float32 rounding above, from its float64 angle; DELLA's
    blocks equal its whole-tensor values."""
    import surgery.engine.stream as stream
    import surgery.expr.node as node
    import surgery.methods.stock as stock

    monkeypatch.setattr(stream, "ROW_BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(stream, "CACHE_BLOCK_ELEMENTS", 700)
    monkeypatch.setattr(node, "PIECE_ELEMENTS", 700)
    monkeypatch.setattr(stock, "EXACT_ELEMENTS", 5000)
    monkeypatch.setattr(stock, "GRAM_CHUNK", 64)  # pieces of 700: 10 chunks and 60 more
    base = str(paths["base"])
    cases = [
        ({"merge_method": "breadcrumbs_ties", "base_model": base,
          "models": entries(paths, density=0.6, gamma=0.05, weight=1.0)},
         breadcrumbs_ties(models["base"], fts(models), density=0.6, gamma=0.05), 0.0),
        ({"merge_method": "model_stock", "base_model": base,
          "parameters": {"filter_wise": True}, "models": entries(paths)},
         model_stock(models["base"], fts(models), filter_wise=True), 0.0),
        ({"merge_method": "model_stock", "base_model": base, "models": entries(paths)},
         model_stock(models["base"], fts(models)), 1e-6),
        ({"merge_method": "ram", "base_model": base, "parameters": {"epsilon": 0.02},
          "models": entries(paths)}, ram(models["base"], fts(models), epsilon=0.02), 0.0),
        ({"merge_method": "nearswap", "base_model": base, "parameters": {"t": 0.01},
          "models": [{"model": str(paths["math"])}]},
         nearswap(models["base"], models["math"], 0.01), 0.0),
        ({"merge_method": "nuslerp", "base_model": base, "parameters": {"nuslerp_flatten": False},
          "models": entries(paths, ("math", "code"), weight=(0.3, 0.5))},
         nuslerp(fts(models, ("math", "code")), [0.3, 0.5], models["base"], flatten=False), 0.0),
    ]
    per_model = PerModel(per_model=list(PER_MODEL_DENSITY))
    cases += [
        ({"merge_method": "breadcrumbs_ties", "base_model": base,
          "models": entries(paths, density=PER_MODEL_DENSITY, gamma=(0.05, 0.0, 0.1),
                            weight=1.0)},
         breadcrumbs_ties(models["base"], fts(models), density=per_model,
                          gamma=PerModel(per_model=[0.05, 0.0, 0.1])), 0.0),
        ({"merge_method": "ties", "base_model": base,
          "models": entries(paths, density=PER_MODEL_DENSITY, weight=1.0)},
         ties_dare.ties(models["base"], fts(models), density=per_model), 0.0),
    ]
    # DELLA's default hash draws: blocks and their l1 statistic draw what the whole tensor does.
    for i, ours in enumerate([della(models["base"], fts(models), density=per_model,
                                    epsilon=0.05),
                              della(models["base"], fts(models), density=0.5, epsilon=0.2),
                              della_linear(models["base"], fts(models), density=0.5,
                                           rescale="inverse_probability")]):
        ours.save(tmp_path / f"della{i}", threads=2)
        saved = load_file(tmp_path / f"della{i}" / "model.safetensors")
        for name in ours.names:
            assert torch.equal(saved[name], ours[name]), name
    for i, (config, ours, atol) in enumerate(cases):
        theirs = mergekit(config, tmp_path / f"mk{i}")
        ours.save(tmp_path / f"ours{i}", threads=2)
        saved = load_file(tmp_path / f"ours{i}" / "model.safetensors")
        for name, want in theirs.items():
            if atol:
                assert torch.allclose(saved[name], want, rtol=0, atol=atol), name
            else:
                assert torch.equal(saved[name], want), name


def test_passthrough_with_scale_filters_equals_mergekit(paths: dict[str, Path],
                                                       models: dict[str, Weights],
                                                       tmp_path: Path) -> None:
    theirs = mergekit({"merge_method": "passthrough", "models": [{
        "model": str(paths["math"]),
        "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                 {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}}]},
        tmp_path / "mk")
    ours = passthrough(models["math"], [{"match": "*o_proj*", "value": 0.0},
                                        {"match": "*down_proj*", "value": 0.5},
                                        {"match": "*", "value": 1.0}])
    assert_same(ours, theirs)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert not theirs[name].any()


def test_model_stock_interpolation_in_place_is_mergekits_expression() -> None:
    """The in-place interpolation gives mergekit's ``t * (sum(ws) / count) + (1 - t) * w_0``
    bit for bit: float32, float64 and bf16 tensors, a tensor-wide or per-row t, t of the
    tensors' dtype or float32 over bf16 (promoted, as mergekit's expression promotes)."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for count in (1, 2, 3, 5):
            ws = [torch.randn(7, 33, generator=gen).to(dtype) for _ in range(count)]
            w0 = torch.randn(7, 33, generator=gen).to(dtype)
            for t in (torch.tensor([0.37]), torch.rand(7, 1, generator=gen),
                      torch.rand(7, 1, generator=gen).to(dtype)):
                average = ws[0]
                for w in ws[1:]:
                    average = average + w
                want = t * (average / count) + (1 - t) * w0
                got = _interpolate(t, w0, ws)
                assert got.dtype == want.dtype and torch.equal(got, want), (dtype, count)
    assert float((want - w0).abs().max()) > 0.01  # not the base back
