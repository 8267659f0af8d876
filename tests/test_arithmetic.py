"""Weight arithmetic, linear soups and task arithmetic against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery import linear, load, task_arithmetic
from surgery.errors import ShapeMismatchError, UsageError
from tests.conftest import small_tensors, write_checkpoint

Q = "model.layers.0.self_attn.q_proj.weight"


def test_expression_values(three_models: list[Path]) -> None:
    a, b, _ = (load(p) for p in three_models)
    ta, tb = small_tensors(0), small_tensors(1)
    merged = a + 0.5 * (b - a)
    assert torch.equal(merged[Q], ta[Q] + 0.5 * (tb[Q] - ta[Q]))
    assert torch.equal((a / 4)[Q], ta[Q] / 4)
    assert torch.equal((-a)[Q], -ta[Q])
    assert torch.equal((a - a)[Q], torch.zeros(4, 4))
    # integer buffers are copied from the first input, never combined
    assert torch.equal((a + b)["buffer.position_ids"], torch.arange(6))


def test_hand_computed_two_by_two(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
    ft1 = write_checkpoint(tmp_path / "ft1", {"w": torch.tensor([[2.0, 2.0], [3.0, 0.0]])})
    ft2 = write_checkpoint(tmp_path / "ft2", {"w": torch.tensor([[1.0, 5.0], [3.0, 8.0]])})
    b, m1, m2 = load(base), load(ft1), load(ft2)
    # τ1 = [[1,0],[0,-4]], τ2 = [[0,3],[0,4]]
    ta = task_arithmetic(b, [m1, m2], weights=[1.0, 0.5], lambda_=2.0)
    assert ta["w"].tolist() == [[3.0, 5.0], [3.0, 0.0]]
    ta_norm = task_arithmetic(b, [m1, m2], weights=[1.0, 1.0], normalize=True)
    assert ta_norm["w"].tolist() == [[1.5, 3.5], [3.0, 4.0]]
    soup = linear([b, m1, m2], weights=[2.0, 1.0, 1.0])
    assert soup["w"].tolist() == [[1.25, 2.75], [3.0, 4.0]]
    raw = linear([m1, m2], weights=[1.0, 1.0], normalize=False)
    assert raw["w"].tolist() == [[3.0, 7.0], [6.0, 8.0]]
    assert linear([m1])["w"].tolist() == [[2.0, 2.0], [3.0, 0.0]]


def test_low_precision_inputs_compute_in_float32(tmp_path: Path) -> None:
    x = torch.tensor([1.0, 1.0 + 2**-7], dtype=torch.bfloat16)
    y = torch.tensor([1.0 + 2**-7, 1.0], dtype=torch.bfloat16)
    a = load(write_checkpoint(tmp_path / "a", {"w": x}))
    b = load(write_checkpoint(tmp_path / "b", {"w": y}))
    # The mean 1 + 2^-8 is not representable in bfloat16; float32 compute keeps it.
    assert linear([a, b])["w"].tolist() == [1.0 + 2**-8, 1.0 + 2**-8]


def test_mismatches_name_the_tensor(tmp_path: Path) -> None:
    a = load(write_checkpoint(tmp_path / "a", small_tensors(0)))
    other = small_tensors(1)
    other[Q] = torch.zeros(4, 5)
    b = load(write_checkpoint(tmp_path / "b", other))
    with pytest.raises(ShapeMismatchError, match=r"tensor '.*q_proj.weight' has shape \[4, 5\]"):
        a + b
    fewer = small_tensors(2)
    del fewer["model.norm.weight"]
    c = load(write_checkpoint(tmp_path / "c", fewer))
    with pytest.raises(ShapeMismatchError, match=r"lacks tensor 'model\.norm\.weight'"):
        linear([a, c])


def test_bad_parameters() -> None:
    with pytest.raises(UsageError, match="linear: needs at least one model"):
        linear([], weights=[])
    with pytest.raises(UsageError, match="needs at least one"):
        task_arithmetic(None, [])  # type: ignore[arg-type]


def test_weight_count_must_match(three_models: list[Path]) -> None:
    a, b, _ = (load(p) for p in three_models)
    with pytest.raises(UsageError, match="weights has 3 values for 2 models"):
        linear([a, b], weights=[1, 2, 3])


def _layered(path: Path, value: float) -> Path:
    """Three blocks, an embedding and a final norm, every entry ``value``."""
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    tensors = {n: torch.full((2, 2), value) for n in names}
    tensors["model.embed_tokens.weight"] = torch.full((4, 2), value)
    tensors["model.norm.weight"] = torch.full((2,), value)
    return write_checkpoint(path, tensors, {"num_hidden_layers": 3})


def test_scheduled_weights_and_lambda(tmp_path: Path) -> None:
    base, m1, m2 = (load(_layered(tmp_path / n, v)) for n, v in
                    (("base", 0.0), ("m1", 3.0), ("m2", 6.0)))
    up = "model.layers.{}.mlp.up_proj.weight"
    # w₂ rises over the blocks 0, 1, 2 as 0, 1, 2; non-block tensors take the first value.
    soup = linear([m1, m2], weights=[2.0, [0.0, 2.0]])
    assert [soup[up.format(i)].unique().tolist() for i in range(3)] == [[3.0], [4.0], [4.5]]
    assert soup["model.embed_tokens.weight"].unique().tolist() == [3.0]
    # w₂ = 0, 0.25, 0.5 over the blocks; λ by rules: norms 0.5, the rest 1 → 3 over depth.
    lam = [{"match": "norm", "value": 0.5}, {"match": "*", "value": [1.0, 3.0]}]
    ta = task_arithmetic(base, [m1, m2], weights=[1.0, [0.0, 0.5]], lambda_=lam)
    assert [ta[up.format(i)].unique().tolist() for i in range(3)] == [[3.0], [9.0], [18.0]]
    assert ta["model.embed_tokens.weight"].unique().tolist() == [3.0]
    assert ta["model.norm.weight"].unique().tolist() == [1.5]
    assert ta.node.params()["lambda"] == lam
    assert ta.node.params()["weights"] == [1.0, [0.0, 0.5]]
    with pytest.raises(UsageError, match=r"weights sum to 0 for tensor 'model\.embed_tokens"):
        linear([m1, m2], weights=[[0.0, 1.0], 0.0])
    with pytest.raises(UsageError, match=r"task_arithmetic: weights\[1\]: rule 'attention' "
                                         "matches no tensor"):
        task_arithmetic(base, [m1, m2], weights=[1.0, [{"match": "attention", "value": 1.0},
                                                       {"match": "*", "value": 0.5}]])


def test_mixed_stored_dtypes_match_mergekits_formula(tmp_path: Path) -> None:
    # Inputs stored as bfloat16, float16 and float32, each method converting them itself
    # (one 640K-element tensor: the engine computes it in row pieces and cache-sized blocks).
    g = torch.Generator().manual_seed(3)
    shape = (1280, 512)
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    stored = [(torch.randn(shape, generator=g) * s).to(d)
              for s, d in zip((0.02, 0.03, 0.05, 0.02), dtypes, strict=True)]
    stored.append(torch.tensor([2.0], dtype=torch.bfloat16))  # ("b"): a one-element tensor
    models = [load(write_checkpoint(tmp_path / f"m{i}", {"w": t, "b": stored[4] + i}))
              for i, t in enumerate(stored[:4])]
    theta = [t.float() for t in stored[:4]]
    weights, lam = [1.0, 0.6, 0.3], 0.7
    # mergekit: stacked task vectors times weights, summed over the models; θ₀ + λ·Σ
    taus = torch.stack([t - theta[0] for t in theta[1:]])
    w = torch.tensor(weights).view(3, 1, 1)
    for normalize in (False, True):
        want = (taus * w).sum(dim=0)
        if normalize:
            want = want / w.sum()
        want = theta[0] + want * lam
        ta = task_arithmetic(models[0], models[1:], weights, lambda_=lam, normalize=normalize)
        ta.save(tmp_path / f"ta-{normalize}", dtype="float32")
        assert torch.equal(load(tmp_path / f"ta-{normalize}")["w"], want)
    unit = task_arithmetic(models[0], models[1:])
    unit.save(tmp_path / "unit", dtype="float32")
    assert torch.equal(load(tmp_path / "unit")["w"], theta[0] + taus.sum(dim=0))
    assert load(tmp_path / "unit")["b"].tolist() == [8.0]  # 2 + (1 + 2 + 3)
    # mergekit's linear: a float32 zero tensor, addcmul_(θᵢ, wᵢ) for each model, / Σ wᵢ
    soup_w = [0.5, 0.2, 0.2, 0.1]
    want = torch.zeros(shape)
    for t, sw in zip(theta, soup_w, strict=True):
        want.addcmul_(t, torch.tensor(sw))
    linear(models, soup_w).save(tmp_path / "soup", dtype="float32")
    assert torch.equal(load(tmp_path / "soup")["w"], want / torch.tensor(soup_w).sum())
    linear(models, soup_w, normalize=False).save(tmp_path / "raw", dtype="float32")
    assert torch.equal(load(tmp_path / "raw")["w"], want)
