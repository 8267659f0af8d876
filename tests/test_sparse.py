"""Sparse deltas and masks against hand-computed selections, round trips and sizes on disk."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from surgery import (
    Mask,
    apply_sparse_deltas,
    extract_sparse_delta,
    load,
    load_mask,
    load_sparse_delta,
    overlap_by_layer,
    revert_sparse_deltas,
    sparsify,
)
from surgery.errors import ShapeMismatchError, UsageError
from surgery.methods.sparse import GlobalTopK, SparseDeltaFile, pack_bits, unpack_bits
from surgery.recipe import build_recipe, run_recipe
from tests.conftest import small_tensors, write_checkpoint

EMB = "model.embed_tokens.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
NORMS = ("model.layers.1.input_layernorm.weight", "model.norm.weight")


def _pair(tmp_path: Path, seed: int = 1) -> tuple[dict, dict, Path, Path]:
    t0 = small_tensors(0)
    g = torch.Generator().manual_seed(seed)
    t1 = {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in t0.items()}
    return t0, t1, write_checkpoint(tmp_path / "base", t0), write_checkpoint(
        tmp_path / f"ft{seed}", t1)


def _reference_selection(t0: dict, t1: dict, k: int) -> dict[str, torch.Tensor]:
    """Global top-K by a full sort over (|τ| desc, tensor order, flat index): the oracle."""
    names = [n for n in t0 if n not in NORMS and t0[n].is_floating_point()]
    entries = []
    for ordinal, n in enumerate(names):
        tau = (t1[n] - t0[n]).flatten()
        entries += [(-abs(float(tau[i])), ordinal, i) for i in range(tau.numel())]
    entries.sort()
    chosen: dict[str, list[int]] = {n: [] for n in names}
    for _, ordinal, i in entries[:k]:
        chosen[names[ordinal]].append(i)
    return {n: torch.tensor(sorted(v), dtype=torch.int64) for n, v in chosen.items()}


def test_global_selection_equals_full_sort(tmp_path: Path) -> None:
    t0, t1, base, ft = _pair(tmp_path)
    for k in (1, 7, 30, 88):
        delta = extract_sparse_delta(load(base), load(ft), k=k)
        ref = _reference_selection(t0, t1, k)
        assert delta.k == k
        assert set(delta.indices) == set(ref)  # norms excluded, embeddings included
        for n, idx in ref.items():
            assert torch.equal(delta.indices[n], idx), (k, n)
            assert torch.equal(delta.values[n], (t1[n] - t0[n]).flatten()[idx])


def test_ties_at_the_threshold_go_to_earlier_tensors_and_lower_indices(tmp_path: Path) -> None:
    t0 = {"a.weight": torch.zeros(4), "b.weight": torch.zeros(4)}
    t1 = {"a.weight": torch.tensor([0.0, 1.0, 2.0, 1.0]),
          "b.weight": torch.tensor([1.0, 3.0, 1.0, 0.0])}
    base, ft = write_checkpoint(tmp_path / "b", t0), write_checkpoint(tmp_path / "f", t1)
    # |τ| sorted: 3 (b1), 2 (a2), then four 1s: a1, a3, b0, b2 in that order
    delta = extract_sparse_delta(load(base), load(ft), k=4)
    assert delta.indices["a.weight"].tolist() == [1, 2, 3]
    assert delta.indices["b.weight"].tolist() == [1]
    delta = extract_sparse_delta(load(base), load(ft), k=5)
    assert delta.indices["b.weight"].tolist() == [0, 1]


def test_buffer_cuts_keep_the_exact_threshold() -> None:
    # Many tensors, small K: the candidate buffer is cut repeatedly.
    g = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(50, generator=g).round(decimals=1) for i in range(40)}
    red = GlobalTopK(None, list(tensors), 25)  # type: ignore[arg-type]
    for n, t in tensors.items():
        red.update(n, [t])
    result = red.finalize()
    allabs = torch.cat([t.abs() for t in tensors.values()])
    kth = float(allabs.sort(descending=True).values[24])
    assert result.value == kth
    assert int((allabs > kth).sum()) + sum(result.ties.values()) == 25


def test_per_tensor_selection(tmp_path: Path) -> None:
    t0, t1, base, ft = _pair(tmp_path)
    delta = extract_sparse_delta(load(base), load(ft), 0.25, per_tensor=True)
    for n, idx in delta.indices.items():
        tau = (t1[n] - t0[n]).abs().flatten()
        k = math.floor(0.25 * tau.numel())
        assert idx.numel() == k
        assert torch.equal(idx, tau.topk(k).indices.sort().values)


def test_round_trip_apply_equals_masked_task_vector(tmp_path: Path) -> None:
    t0, t1, base, ft = _pair(tmp_path)
    delta = extract_sparse_delta(load(base), load(ft), 0.2)
    path = delta.save(tmp_path / "delta.safetensors")
    loaded = load_sparse_delta(path)
    assert loaded.k == delta.k == math.floor(0.2 * sum(
        t0[n].numel() for n in (EMB, Q0, UP0, Q1)))
    assert loaded.base_model == str(base)
    applied = apply_sparse_deltas(load(base), [SparseDeltaFile(path)])
    for n in t0:
        if n in loaded.shapes:
            mask = torch.zeros(t0[n].numel(), dtype=torch.bool)
            mask[loaded.indices[n]] = True
            expected = t0[n] + mask.reshape(t0[n].shape) * (t1[n] - t0[n])
        else:
            expected = t0[n]
        assert torch.equal(applied[n], expected.to(applied[n].dtype)), n
    # sparsify builds the same model in one lazy step
    direct = sparsify(load(base), load(ft), 0.2)
    for n in loaded.shapes:
        assert torch.equal(direct[n], applied[n])
    assert torch.equal(direct[NORMS[0]], t1[NORMS[0]])


def test_compose_then_revert_gives_the_base_bit_for_bit(tmp_path: Path) -> None:
    t0, _, base, ft1 = _pair(tmp_path, 1)
    _, _, _, ft2 = _pair(tmp_path, 2)
    d1 = extract_sparse_delta(load(base), load(ft1), 0.3)
    d2 = extract_sparse_delta(load(base), load(ft2), 0.3)
    composed = apply_sparse_deltas(load(base), [d1, d2])
    assert torch.equal(composed[Q0], t0[Q0] + d1.dense(Q0) + d2.dense(Q0))
    reverted = revert_sparse_deltas(composed, [d2, d1])
    reverted.save(tmp_path / "reverted")
    back = load(tmp_path / "reverted")
    for n in t0:
        assert torch.equal(back.node.checkpoint.read(n), t0[n]), n


def test_size_on_disk_is_the_density_plus_indices(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    t0 = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 256, generator=g)
          for i in range(4)}
    t0["model.norm.weight"] = torch.ones(256)
    t1 = {k: v + torch.randn(v.shape, generator=g) for k, v in t0.items()}
    base, ft = write_checkpoint(tmp_path / "b", t0), write_checkpoint(tmp_path / "f", t1)
    path = extract_sparse_delta(load(base), load(ft)).save(tmp_path / "d.safetensors")
    model_bytes = (base / "model.safetensors").stat().st_size
    k = math.floor(0.01 * 4 * 256 * 256)
    # values: 1% of the (float32) weights; indices: int64, twice that; the header is small
    assert k * 12 < path.stat().st_size < k * 12 + 4096
    assert 0.029 < path.stat().st_size / model_bytes < 0.032


def test_masks_bit_packed_set_operations_and_jaccard(tmp_path: Path) -> None:
    idx = torch.tensor([0, 3, 8, 9, 17])
    packed = pack_bits(idx, 20)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b1001, 0b11, 0b10]
    assert torch.nonzero(unpack_bits(packed, 20)).flatten().tolist() == idx.tolist()
    _, _, base, ft1 = _pair(tmp_path, 1)
    _, _, _, ft2 = _pair(tmp_path, 2)
    a = extract_sparse_delta(load(base), load(ft1), 0.3).mask()
    b = extract_sparse_delta(load(base), load(ft2), 0.3).mask()
    sa = {n: set(torch.nonzero(a.dense(n).flatten()).flatten().tolist()) for n in a.shapes}
    sb = {n: set(torch.nonzero(b.dense(n).flatten()).flatten().tolist()) for n in b.shapes}
    for op, expect in (("union", lambda x, y: x | y), ("intersection", lambda x, y: x & y),
                       ("difference", lambda x, y: x - y)):
        got = getattr(a, op)(b)
        for n in a.shapes:
            assert set(torch.nonzero(got.dense(n).flatten()).flatten().tolist()) == \
                expect(sa[n], sb[n]), (op, n)
    a.save(tmp_path / "a.mask.safetensors")
    again = load_mask(tmp_path / "a.mask.safetensors")
    assert all(torch.equal(again.bits[n], a.bits[n]) for n in a.bits)
    stats = {s.group: s for s in overlap_by_layer(a, b)}
    assert list(stats) == ["layer 0", "layer 1", "non-block"]
    inter = len(sa[Q0] & sb[Q0]) + len(sa[UP0] & sb[UP0])
    union = len(sa[Q0] | sb[Q0]) + len(sa[UP0] | sb[UP0])
    assert stats["layer 0"].jaccard == inter / union
    assert stats["non-block"].a == len(sa[EMB])


def test_mask_from_dense_empty_and_random() -> None:
    dense = {"a": torch.tensor([[True, False, False], [False, True, True]]),
             "b": torch.zeros(9, dtype=torch.bool)}
    m = Mask.from_dense(dense)
    assert m.shapes == {"a": (2, 3), "b": (9,)} and m.bits["a"].tolist() == [0b110001]
    assert all(torch.equal(m.dense(n), d) for n, d in dense.items()) and m.count() == 3
    none = Mask.empty({"a": (2, 3), "b": (9,)})
    assert none.count() == 0 and none.bits["b"].tolist() == [0, 0]
    shapes = {"x": (50, 40), "y": (7,), "z": (3, 3)}
    r = Mask.random(shapes, {"x": 100, "y": 7}, seed=3)
    assert (r.count("x"), r.count("y"), r.count("z")) == (100, 7, 0)
    # seeded: the same draw again; another seed draws other entries; tensor by tensor as a
    # permutation of each tensor's entries from one generator
    gen = torch.Generator().manual_seed(3)
    want = torch.zeros(2000, dtype=torch.bool)
    want[torch.randperm(2000, generator=gen)[:100]] = True
    assert torch.equal(r.dense("x").flatten(), want)
    assert torch.equal(Mask.random(shapes, {"x": 100, "y": 7}, seed=3).bits["x"], r.bits["x"])
    other = Mask.random(shapes, {"x": 100}, seed=4)
    assert not torch.equal(other.bits["x"], r.bits["x"]) and other.count("y") == 0
    like = r.random_like(seed=5)
    assert {n: like.count(n) for n in shapes} == {"x": 100, "y": 7, "z": 0}
    with pytest.raises(UsageError, match=r"^random mask: 8 entries asked of tensor 'y', which "
                       r"has 7$"):
        Mask.random(shapes, {"y": 8})


def test_bad_input(tmp_path: Path) -> None:
    _, _, base, ft = _pair(tmp_path)
    delta = extract_sparse_delta(load(base), load(ft), 0.2)
    other = small_tensors(0)
    other[Q0] = torch.zeros(4, 5)
    wrong = write_checkpoint(tmp_path / "wrong", other)
    with pytest.raises(ShapeMismatchError,
                       match=r"^sparse_apply: tensor '.*q_proj.weight' has shape \[4, 4\] in "
                             r"sparse delta .* but \[4, 5\] in the base model$"):
        apply_sparse_deltas(load(wrong), [delta])
    for density in (0.0, 1.5):
        with pytest.raises(UsageError, match=r"^density: .* is outside \(0, 1\]$"):
            extract_sparse_delta(load(base), load(ft), density)
    with pytest.raises(UsageError, match=r"^maskable: unknown kind 'attn'"):
        extract_sparse_delta(load(base), load(ft), maskable=["attn"])
    with pytest.raises(UsageError, match="not a sparse delta"):
        SparseDeltaFile(base / "model.safetensors")


def test_recipe_sparse_ops(tmp_path: Path) -> None:
    t0, _, base, ft = _pair(tmp_path)
    delta = extract_sparse_delta(load(base), load(ft), 0.2)
    delta.save(tmp_path / "d.safetensors")
    text = f"""
inputs: {{base: {base}, ft: {ft}}}
steps:
  applied: {{op: sparse_apply, base: base, deltas: [{tmp_path / "d.safetensors"}]}}
  reverted: {{op: sparse_revert, base: applied, deltas: [{tmp_path / "d.safetensors"}]}}
  top: {{op: sparsify, base: base, model: ft, density: 0.2}}
output:
  - {{from: reverted, path: {tmp_path / "off"}}}
  - {{from: top, path: {tmp_path / "top"}}}
"""
    recipe = build_recipe(text)
    run_recipe(recipe)
    assert torch.equal(load(tmp_path / "off").node.checkpoint.read(Q0), t0[Q0])
    assert torch.equal(load(tmp_path / "top").node.checkpoint.read(Q0),
                       t0[Q0] + delta.dense(Q0))
    bad = text.replace("density: 0.2", "density: 2")
    with pytest.raises(UsageError, match=r"steps\.top.*density: 2.0 is outside"):
        build_recipe(bad)


def test_cli_extract_apply_revert_stats(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from surgery_cli.main import main

    t0, _, base, ft = _pair(tmp_path)
    _, _, _, ft2 = _pair(tmp_path, 2)
    run = CliRunner().invoke
    d1, d2 = str(tmp_path / "d1.safetensors"), str(tmp_path / "d2.safetensors")
    res = run(main, ["sparse", "extract", str(base), str(ft), d1, "--density", "0.2"])
    assert res.exit_code == 0, res.output
    assert run(main, ["sparse", "extract", str(base), str(ft2), d2, "--k", "17"]).exit_code == 0
    assert load_sparse_delta(d2).k == 17
    res = run(main, ["sparse", "apply", str(base), d1, "-o", str(tmp_path / "on")])
    assert res.exit_code == 0, res.output
    assert torch.equal(load(tmp_path / "on")[Q0], t0[Q0] + load_sparse_delta(d1).dense(Q0))
    res = run(main, ["sparse", "apply", str(tmp_path / "on"), d1, "--revert", "-o",
                     str(tmp_path / "off")])
    assert res.exit_code == 0, res.output
    res = run(main, ["sparse", "stats", d1, d2])
    assert res.exit_code == 0 and "layer 0" in res.output and "jaccard" in res.output
    res = run(main, ["sparse", "extract", str(base), str(ft), d1, "--density", "2"])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1] == \
        "error: density: 2.0 is outside (0, 1]"
