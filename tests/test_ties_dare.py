"""TIES and DARE against hand-computed values and their statistical contracts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from surgery import dare_linear, dare_ties, load, ties
from surgery.errors import UsageError
from surgery.methods import ties_dare
from surgery.methods.ties_dare import dare_key, trim
from surgery.recipe import build_recipe
from tests.conftest import small_tensors, write_checkpoint


def _models(tmp_path: Path, base: list[float], *taus: list[float]) -> list:
    b = torch.tensor(base)
    paths = [write_checkpoint(tmp_path / "base", {"w": b})]
    for i, tau in enumerate(taus):
        paths.append(write_checkpoint(tmp_path / f"m{i}", {"w": b + torch.tensor(tau)}))
    return [load(p) for p in paths]


def test_trim_keeps_exactly_k_and_breaks_ties_by_lower_index() -> None:
    tau = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5])
    assert trim(tau, 0.4).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]
    assert trim(tau, 0.5).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]  # ⌊2.5⌋ = 2
    assert trim(tau, 0.6).tolist() == [1.0, -1.0, 1.0, 0.0, 0.0]
    assert trim(tau, 0.1).tolist() == [0.0] * 5  # ⌊0.5⌋ = 0
    assert trim(tau, 1.0).tolist() == tau.tolist()
    big = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    kept = trim(big, 0.37)
    assert int((kept != 0).sum()) == 370
    assert kept.abs()[kept != 0].min() >= big.abs()[kept == 0].max()


def test_ties_hand_computed(tmp_path: Path) -> None:
    base = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    b, m1, m2 = _models(tmp_path, base, [3, -2, 2, 2, -1, 0], [-1, 2, 2, -4, 1, 0])
    # trim (k = 3): τ̂1 = [3,-2,2,0,0,0] (ties at |2| kept by lower index), τ̂2 = [0,2,2,-4,0,0]
    # elect: Σ = [3,0,4,-4,0,0] -> s = [+,+,+,-,+,+] (zero sum elects +1)
    # disjoint mean: [3/1, 2/1, 4/2, -4/1, 0, 0]
    assert ties(b, [m1, m2], density=0.5)["w"].tolist() == [4, 3, 3, -3, 1, 1]
    raw = ties(b, [m1, m2], density=0.5, normalize=False, lambda_=0.5)["w"]
    assert raw.tolist() == [2.5, 2, 3, -1, 1, 1]
    # weights [2, 1]: Σ w τ̂ = [6,-2,6,-4,0,0]; agreeing: 1 at 0,1,2; 2 at 2,3
    weighted = ties(b, [m1, m2], density=0.5, weights=[2.0, 1.0])["w"]
    assert weighted.tolist() == [1 + 3, 1 - 2, 1 + 6 / 3, 1 - 4, 1, 1]


def test_ties_consensus_sum_versus_count(tmp_path: Path) -> None:
    b, *ms = _models(tmp_path, [0.0], [5.0], [-1.0], [-1.0])
    assert ties(b, ms, density=1.0)["w"].tolist() == [5.0]  # Σ = 3 > 0
    assert ties(b, ms, density=1.0, consensus="count")["w"].tolist() == [-1.0]  # 2 of 3 negative


def test_ties_no_agreeing_input_gives_base(tmp_path: Path) -> None:
    b, m1, m2 = _models(tmp_path, [2.0, 2.0], [0.0, 1.0], [0.0, -1.0])
    # entry 0: nobody moved; entry 1: Σ = 0, s = +1, only m1 agrees
    assert ties(b, [m1, m2], density=1.0)["w"].tolist() == [2.0, 3.0]


def _dare_pair(tmp_path: Path, n: int = 200_000, value: float = 0.5) -> list:
    base = torch.zeros(n)
    a = write_checkpoint(tmp_path / "base", {"w": base, "v": base.clone()})
    tau = torch.full((n,), value)
    f = write_checkpoint(tmp_path / "ft", {"w": base + tau, "v": base + tau})
    return [load(a), load(f)]


def test_dare_kept_fraction_and_expectation(tmp_path: Path) -> None:
    b, f = _dare_pair(tmp_path)
    out = dare_linear(b, [f], density=0.3)["w"]
    kept = out != 0
    frac = kept.double().mean().item()
    sigma = (0.3 * 0.7 / out.numel()) ** 0.5
    assert abs(frac - 0.3) < 5 * sigma
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 0.5 / 0.3))  # 1/(1 - p)
    assert abs(out.double().mean().item() - 0.5) < 5 * sigma * 0.5 / 0.3  # E[τ̃] = τ
    l1 = dare_linear(b, [f], density=0.3, rescale="l1")["w"]
    assert l1.double().abs().sum().item() == pytest.approx(0.5 * out.numel(), rel=1e-5)


def test_dare_draws_seeded_per_tensor_name(tmp_path: Path) -> None:
    b, f = _dare_pair(tmp_path, n=4096)
    merged = dare_linear(b, [f], density=0.5)
    again = dare_linear(b, [f], density=0.5)
    assert torch.equal(merged["w"], again["w"])  # reproducible
    assert not torch.equal(merged["w"], merged["v"])  # same values, other name: other draws
    merged.save(tmp_path / "s0", seed=0)
    merged.save(tmp_path / "s1", seed=1)
    s0 = load_file(tmp_path / "s0" / "model.safetensors")
    s1 = load_file(tmp_path / "s1" / "model.safetensors")
    assert torch.equal(s0["w"], merged["w"])
    assert not torch.equal(s0["w"], s1["w"])


def test_dare_ties_elects_signs(tmp_path: Path) -> None:
    b, m1, m2 = _models(tmp_path, [0.0, 0.0], [2.0, -1.0], [-1.0, 3.0])
    # density 1 drops nothing: sum of agreeing entries (normalize false by default)
    assert dare_ties(b, [m1, m2], density=1.0)["w"].tolist() == [2.0, 3.0]
    assert dare_ties(b, [m1, m2], density=1.0, normalize=True)["w"].tolist() == [2.0, 3.0]
    assert dare_linear(b, [m1, m2], density=1.0)["w"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval(tmp_path: Path, density: float) -> None:
    b, m1 = _models(tmp_path, [0.0], [1.0])
    for fn in (ties, dare_linear, dare_ties):
        with pytest.raises(UsageError, match=rf"^{fn.__name__}: density {density} is outside"):
            fn(b, [m1], density=density)


def test_density_error_in_recipe_names_the_step(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", small_tensors(0))
    ft = write_checkpoint(tmp_path / "ft", small_tensors(1))
    text = (f"inputs: {{base: {base}, ft: {ft}}}\n"
            "steps:\n  merged: {op: ties, base: base, models: [ft], density: 1.2}\n"
            f"output: {{from: merged, path: {tmp_path / 'out'}}}\n")
    with pytest.raises(UsageError) as err:
        build_recipe(text)
    assert str(err.value) == ("recipe.yaml:3:3: steps.merged: ties: density 1.2 is outside "
                              "(0, 1]")


@pytest.mark.parametrize("block", [3, 64, 1 << 20])
def test_trim_matches_a_stable_sort_on_quantised_values_with_many_ties(
        monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    monkeypatch.setattr(ties_dare, "BLOCK", block)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4000, generator=g).bfloat16()
    tau = (base.float() + torch.randn(4000, generator=g) * 0.01).bfloat16().float() - base.float()
    for density in (0.05, 0.2, 0.5, 0.93):
        k = int(density * tau.numel())
        order = torch.sort(-tau.abs(), stable=True).indices[:k]  # ties: lower index first
        want = torch.zeros_like(tau)
        want[order] = tau[order]
        assert torch.equal(trim(tau, density), want), density


@pytest.mark.parametrize("skew", [1.0, 1e-3, 1e3])
def test_one_pass_selection_and_its_fallback_match_a_stable_sort(
        monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    # A sample of the pieces estimates the threshold: sampled pieces of much smaller (or
    # larger) magnitudes than the rest send the one-pass selection back to the radix passes.
    # (Pieces large enough that the sample's bracket holds few of their entries.)
    monkeypatch.setattr(ties_dare, "BLOCK", 4096)
    fallbacks = []
    radix = ties_dare.radix_cuts
    monkeypatch.setattr(ties_dare, "radix_cuts", lambda *a: fallbacks.append(1) or radix(*a))
    g = torch.Generator().manual_seed(2)
    tau = (torch.randn(100_000, generator=g) * 1024).round() / 256  # many ties
    sampled = ties_dare.sample_pieces(-(-100_000 // 4096))
    assert sampled == [0, 6, 12, 18]
    for i in sampled:
        tau[i * 4096:(i + 1) * 4096] *= skew
    for density in (0.2, 0.77, 0.01):
        k = int(density * tau.numel())
        order = torch.sort(-tau.abs(), stable=True).indices[:k]
        want = torch.zeros_like(tau)
        want[order] = tau[order]
        assert torch.equal(trim(tau, density), want), density
        if density == 0.77:  # sampled pieces like the rest estimate well
            assert len(fallbacks) == (0 if skew == 1.0 else 2)


def test_a_few_distinct_values_go_to_the_radix_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Task vectors of a few distinct values put more than NEAR_LIMIT of a piece's entries
    # next to the threshold: rather than collect them all, the selection counts by radix.
    monkeypatch.setattr(ties_dare, "BLOCK", 256)
    fallbacks = []
    radix = ties_dare.radix_cuts
    monkeypatch.setattr(ties_dare, "radix_cuts", lambda *a: fallbacks.append(1) or radix(*a))
    tau = (torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 4).round() / 4
    k = int(0.3 * tau.numel())
    order = torch.sort(-tau.abs(), stable=True).indices[:k]
    want = torch.zeros_like(tau)
    want[order] = tau[order]
    assert torch.equal(trim(tau, 0.3), want)
    assert fallbacks == [1]


def test_ties_in_small_blocks_equals_one_block(three_models: list[Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    base, m1, m2 = (load(str(p)) for p in three_models)
    whole = ties(base, [m1, m2], density=0.3, weights=[1.0, 0.7])
    want = {n: whole[n] for n in whole.names}
    monkeypatch.setattr(ties_dare, "BLOCK", 5)
    for n, t in want.items():
        assert torch.equal(ties(base, [m1, m2], density=0.3, weights=[1.0, 0.7])[n], t), n


@pytest.mark.parametrize("block", [5, 1 << 20])
def test_dare_in_blocks_drops_as_the_whole_tensor(three_models: list[Path],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  block: int) -> None:
    monkeypatch.setattr(ties_dare, "BLOCK", block)
    base, m1, m2 = (load(str(p)) for p in three_models)
    merged = dare_linear(base, [m1, m2], density=0.4, weights=[1.0, 0.5])
    for name in base.names:
        if not base[name].is_floating_point():
            assert torch.equal(merged[name], base[name])
            continue
        theta0 = base[name].float()
        taus = [ties_dare.drop_and_rescale(m[name].float() - theta0, 0.4, "inverse_density",
                                           lambda high, i=i, name=name: dare_key(0, name, i,
                                                                                 high))
                for i, m in enumerate((m1, m2))]
        want = theta0 + (taus[0] * 1.0 + taus[1] * 0.5)
        torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-7, msg=name)
        # the same entries dropped: zero in the merge exactly where both τ̃ are
        assert torch.equal(merged[name] == theta0, (taus[0] == 0) & (taus[1] == 0)), name


def _lowbias31(j: int, key: int) -> int:
    """The top 31 bits of the position hash, in plain Python integers (the oracle)."""
    m = 0xFFFFFFFF
    x = (j ^ key) & m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x >> 1


@pytest.mark.parametrize("start", [0, 40_000, (1 << 16) - 3, (1 << 31) - 3, (1 << 32) - 3,
                                   5 << 32, (5 << 32) + (7 << 16) + 2])
def test_dare_drops_follow_the_position_hash(start: int) -> None:
    density = 0.37
    key = dare_key(3, "model.layers.0.mlp.up_proj.weight", 1, start >> 32)
    assert key == dare_key(3, "model.layers.0.mlp.up_proj.weight", 1, start >> 32)
    assert key != dare_key(3, "model.layers.0.mlp.up_proj.weight", 0, start >> 32)
    tau = torch.arange(1, 4097, dtype=torch.float32)
    ties_dare.drop_entries(tau, start, density, lambda high: dare_key(
        3, "model.layers.0.mlp.up_proj.weight", 1, high))
    limit = ties_dare.keep_threshold(density)
    assert limit == round(0.37 * 2**31)
    want = [float(i + 1) if _lowbias31(start + i, dare_key(
        3, "model.layers.0.mlp.up_proj.weight", 1, (start + i) >> 32)) < limit else 0.0
            for i in range(4096)]
    assert tau.tolist() == want


@pytest.mark.parametrize("start", [0, (1 << 16) - 3, (1 << 32) - (3 << 16),
                                   (1 << 32) - (3 << 16) - 7])
def test_dare_drops_over_many_spans_follow_the_position_hash(start: int) -> None:
    # Steps of several whole spans, one of them across 2^32, against the hash in numpy.
    n, density = 5 * (1 << 16) + 123, 0.61
    tau = torch.ones(n)
    ties_dare.drop_entries(tau, start, density, lambda high: dare_key(7, "w", 2, high))
    j = np.arange(start, start + n, dtype=np.uint64)
    keys = np.array([dare_key(7, "w", 2, h) & 0xFFFFFFFF for h in (j >> np.uint64(32))],
                    dtype=np.uint64)
    m = np.uint64(0xFFFFFFFF)
    x = (j ^ keys) & m
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    kept = (x >> np.uint64(1)) < ties_dare.keep_threshold(density)
    assert torch.equal(tau, torch.from_numpy(kept.astype(np.float32)))


def test_dare_drops_are_independent_between_models_and_neighbours() -> None:
    n, d = 1 << 20, 0.3
    kept = []
    for i in range(2):
        ones = torch.ones(n)
        ties_dare.drop_entries(ones, 0, d, lambda high, i=i: dare_key(0, "w", i, high))
        kept.append(ones.double())
    sigma = (d * (1 - d) / n) ** 0.5
    for k in kept:
        assert abs(k.mean().item() - d) < 5 * sigma
        assert abs((k[1:] * k[:-1]).mean().item() - d * d) < 5 * sigma  # neighbours
        assert abs((k[1024:] * k[:-1024]).mean().item() - d * d) < 5 * sigma  # rows apart
    assert abs((kept[0] * kept[1]).mean().item() - d * d) < 5 * sigma  # models


def test_bracket_in_numpy_equals_torch() -> None:
    g = torch.Generator().manual_seed(5)
    flat = torch.randint(0, 1 << 20, (10_000,), generator=g, dtype=torch.int32)
    for lo, hi in ((0, 1), (1000, 5000), (300_000, 300_001), (1 << 20, 1 << 21)):
        above, index, values = ties_dare._bracket(flat, lo, hi)
        want = ties_dare._bracket_torch(flat, lo, hi)
        assert above == want[0] == int((flat >= hi).sum())
        assert torch.equal(index, want[1]) and torch.equal(values, want[2])
        assert torch.equal(values, flat[(flat >= lo) & (flat < hi)])


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.8])
def test_trim_with_infinities_and_nans_matches_a_stable_sort_of_magnitude_bits(
        density: float) -> None:
    # Magnitudes order as their bits: NaN above ±inf above every finite value. A cut at
    # infinity or NaN is applied by bits, not by hardshrink.
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(2000, generator=g)
    special = torch.randperm(2000, generator=g)
    tau[special[:300]] = float("inf")
    tau[special[300:500]] = -float("inf")
    tau[special[500:800]] = float("nan")
    k = int(density * tau.numel())
    bits = tau.abs().view(torch.int32)
    order = torch.sort(-bits.long(), stable=True).indices[:k]
    want = torch.zeros_like(tau)
    want[order] = tau[order]
    assert torch.equal(trim(tau, density).view(torch.int32), want.view(torch.int32))


def test_the_sample_bracket_holds_the_kth_largest_of_the_whole() -> None:
    g = torch.Generator().manual_seed(4)
    whole = torch.randn(1 << 20, generator=g).abs().view(torch.int32)
    sample = whole[::4]
    for density in (1e-5, 0.01, 0.2, 0.5, 0.9, 1 - 1e-5):
        k = max(int(density * whole.numel()), 1)
        kth = int(torch.sort(whole, descending=True).values[k - 1])
        lo, hi = ties_dare.sample_bracket(sample, k, whole.numel())
        assert lo <= kth < hi, density
        inside = int(((whole >= lo) & (whole < hi)).sum())
        assert inside < 0.02 * whole.numel(), (density, inside)
    assert ties_dare.sample_bracket(sample, 1, whole.numel())[1] == (1 << 31) - 1
    assert ties_dare.sample_bracket(sample, whole.numel() - 1, whole.numel())[0] == 0


def test_the_keep_mask_in_numpy_equals_torch() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randint(-(1 << 31), (1 << 31) - 1, (50_000,), generator=g, dtype=torch.int32)
    for density in (0.0001, 0.2, 0.5, 0.9999):
        limit = ties_dare.keep_threshold(density)
        a, b = x.clone(), x.clone()
        ties_dare._keep_mask(a, torch.empty_like(a), limit)
        ties_dare._keep_mask_numpy(b, torch.empty_like(b), limit)
        assert torch.equal(a, b), density
        assert set(a.unique().tolist()) <= {-1, 0}
