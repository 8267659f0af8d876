"""DRIFT (arXiv 2510.15050): the prior file against θ_reasoning − θ_target, the three bias
modes against their formulas, one biased update against a plain PyTorch loop, and the errors
for priors that do not fit (missing projections are never skipped)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgery import load
from surgery.errors import UsageError
from surgery.methods.drift import drift_prior, is_projection
from surgery.train import finetune
from surgery.train.drift import DriftBias, biased_gradient
from tests.conftest import FIXTURES, surgery
from tests.test_train_loop import Grab, plain_backward

BASE = FIXTURES / "tiny-llama" / "base"
MATH_MODEL = FIXTURES / "tiny-llama" / "math"
MATH = FIXTURES / "data" / "math.jsonl"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _projections(path: Path) -> list[str]:
    return [n for n, t in _tensors(path).items() if is_projection(n, t.shape)]


# ‖g‖ = 5, ‖Δ‖ = 2, cos(g, Δ) = 8 / 10 = 0.8, α = 0.5
G, D, ALPHA = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]), 0.5


@pytest.mark.parametrize(("mode", "want"), [
    ("adaptive_cosine", [3.0, 4.0 - 0.5 * 0.9 * 5.0]),  # (0.8 + 1) / 2 = 0.9
    ("gradnorm", [3.0, 4.0 - 0.5 * 5.0]),
    ("absolute", [3.0, 4.0 - 0.5 * 2.0]),
])
def test_modes_against_their_formulas(mode: str, want: list[float]) -> None:
    got = biased_gradient(G, D, 2.0, mode, ALPHA)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6, rtol=0), (mode, got)


def test_opposed_gradient_gets_no_adaptive_pull_and_zero_prior_none() -> None:
    # cos = −1: the adaptive weight (cos + 1) / 2 is 0, g stays; gradnorm still pulls.
    g = torch.tensor([0.0, -4.0])
    assert torch.equal(biased_gradient(g, D, 2.0, "adaptive_cosine", 1.0), g)
    assert torch.equal(biased_gradient(g, D, 2.0, "gradnorm", 1.0), torch.tensor([0.0, -8.0]))
    zero = torch.zeros(2)
    for mode in ("adaptive_cosine", "gradnorm"):
        assert torch.equal(biased_gradient(G, zero, 0.0, mode, 1.0), G)
        assert torch.equal(biased_gradient(zero, D, 2.0, mode, 1.0), zero)


def test_prior_is_reasoning_minus_target_over_the_projections(tmp_path: Path) -> None:
    res = drift_prior(load(MATH_MODEL), load(BASE), tmp_path / "p.safetensors")
    prior = load_file(str(res.path))
    want = _projections(BASE)
    assert list(prior) == sorted(want) and res.tensors == len(want) == 42
    reasoning, target = _tensors(MATH_MODEL), _tensors(BASE)
    for name, delta in prior.items():
        assert delta.dtype == torch.float32
        assert torch.equal(delta, reasoning[name].float() - target[name].float()), name
    with safe_open(str(res.path), "pt") as f:
        meta = f.metadata()
    provenance = json.loads(meta["provenance"])
    assert meta["format"] == "weight-surgery-drift-prior"
    assert [i["source"] for i in provenance["inputs"]] == [str(MATH_MODEL), str(BASE)]
    assert all(len(rec["sha256"]) == 64 for i in provenance["inputs"] for rec in i["files"])
    half = drift_prior(load(MATH_MODEL), load(BASE), tmp_path / "h.safetensors",
                       dtype="bfloat16")
    for name, delta in load_file(str(half.path)).items():
        assert delta.dtype == torch.bfloat16 and torch.equal(delta, prior[name].bfloat16())


def _renamed(src: Path, dst: Path, rename=lambda n: n, drop: str | None = None) -> Path:
    shutil.copytree(src, dst)
    tensors = {rename(n): t for n, t in _tensors(src).items() if n != drop}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_name_maps_are_explicit_and_missing_projections_are_errors(tmp_path: Path) -> None:
    vl = _renamed(MATH_MODEL, tmp_path / "vl", lambda n: "language_model." + n)
    with pytest.raises(UsageError, match=r"42 projection\(s\) of .* have no tensor"):
        drift_prior(load(vl), load(BASE), tmp_path / "x.safetensors")
    mapped = drift_prior(load(vl), load(BASE), tmp_path / "m.safetensors",
                         map={r"^language_model\.": ""})
    plain = drift_prior(load(MATH_MODEL), load(BASE), tmp_path / "p.safetensors")
    a, b = load_file(str(mapped.path)), load_file(str(plain.path))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(UsageError, match="matches no tensor"):
        drift_prior(load(MATH_MODEL), load(BASE), tmp_path / "y.safetensors",
                    map={r"^vision\.": ""})

    lost = "model.layers.1.mlp.up_proj.weight"
    short = _renamed(MATH_MODEL, tmp_path / "short", drop=lost)
    with pytest.raises(UsageError, match=rf"1 projection\(s\).*{lost}"):
        drift_prior(load(short), load(BASE), tmp_path / "z.safetensors")
    allowed = drift_prior(load(short), load(BASE), tmp_path / "a.safetensors",
                          allow_missing=[lost])
    assert allowed.tensors == 41 and allowed.missing == [lost]
    assert not (tmp_path / "z.safetensors").exists()
    # A file that lost a tensor without saying so is refused by the bias, at set-up.
    hand = tmp_path / "hand.safetensors"
    with safe_open(str(plain.path), "pt") as f:
        meta = f.metadata()
    save_file({n: t for n, t in b.items() if n != lost}, str(hand), metadata=meta)
    with pytest.raises(UsageError, match=rf"1 trainable projection\(s\) have no prior.*{lost}"):
        finetune(BASE, MATH, out=tmp_path / "t", steps=1, drift={"prior": str(hand)})
    res = finetune(BASE, MATH, out=tmp_path / "ok", steps=1, batch_size=4,
                   drift={"prior": str(allowed.path)})
    assert res.transforms == {"drift": 41}


def test_prior_of_another_model_is_refused(tmp_path: Path) -> None:
    gpt2 = FIXTURES / "tiny-gpt2"
    other = drift_prior(load(gpt2 / "math"), load(gpt2 / "base"), tmp_path / "g.safetensors")
    with pytest.raises(UsageError, match=r"tensor.*the model lacks.*another model"):
        finetune(BASE, MATH, out=tmp_path / "t", steps=1, drift={"prior": str(other.path)})
    with pytest.raises(UsageError, match="shape"):
        drift_prior(load(gpt2 / "math"), load(BASE), tmp_path / "s.safetensors",
                    map={r"^transformer\.h\.(\d+)\.attn\.c_attn\.weight$":
                         r"model.layers.\1.self_attn.q_proj.weight"},
                    allow_missing=["attention", "mlp"])
    with pytest.raises(UsageError, match="not a DRIFT prior"):
        DriftBias(BASE / "model.safetensors")


@pytest.mark.parametrize("mode", ["adaptive_cosine", "gradnorm", "absolute"])
def test_one_biased_update_equals_a_plain_loop(tmp_path: Path, mode: str) -> None:
    """The biased gradients against the formula in float64 on a plain loop's gradients (the
    same bits: see test_train_loop), then the update against a plain AdamW fed our biased
    gradients (fed the float64 ones instead, a near-zero entry's Adam step could move by up
    to lr on last-bit differences: a flaky test)."""
    prior = drift_prior(load(MATH_MODEL), load(BASE), tmp_path / "p.safetensors").path
    alpha = 0.7
    grab = Grab()
    hooked = finetune(BASE, MATH, out=tmp_path / "hooks", steps=1, lr=1e-3, batch_size=4,
                      hooks=[DriftBias(prior, mode, alpha), grab])
    res = finetune(BASE, MATH, out=tmp_path / "ours", steps=1, lr=1e-3, batch_size=4,
                   drift={"prior": str(prior), "mode": mode, "alpha": alpha})
    ours = _tensors(tmp_path / "ours")
    assert res.transforms == {"drift": 42} and hooked.transforms["drift"] == 42
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == \
        (tmp_path / "hooks" / "model.safetensors").read_bytes()

    deltas = load_file(str(prior))
    model, opt = plain_backward(lr=1e-3, examples=4)
    for name, p in model.named_parameters():
        if name not in deltas:
            assert torch.equal(grab.grads[name], p.grad), name
            continue
        g, d = p.grad.double(), deltas[name].double()
        gn, dn = g.norm().item(), d.norm().item()
        pull = {"absolute": alpha,
                "gradnorm": alpha * gn / dn,
                "adaptive_cosine": alpha * gn / dn * ((g * d).sum().item() / (gn * dn) + 1) / 2
                }[mode]
        want = g - pull * d
        scale = want.abs().max().item()
        assert torch.allclose(grab.grads[name].double(), want, rtol=0, atol=1e-5 * scale), name
        p.grad = grab.grads[name].clone()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    opt.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), ours[name], rtol=0, atol=1e-7), name
    moved = [n for n in deltas if not torch.equal(ours[n], _tensors(BASE)[n])]
    assert len(moved) == 42
    record = json.loads((tmp_path / "ours" / "provenance.json").read_text())["training"]
    assert record["transforms"] == {"drift": 42}
    assert "- drift: on 42 tensor(s)" in (tmp_path / "ours" / "README.md").read_text()


def test_frozen_projections_are_not_biased(tmp_path: Path) -> None:
    prior = drift_prior(load(MATH_MODEL), load(BASE), tmp_path / "p.safetensors").path
    res = finetune(BASE, MATH, out=tmp_path / "t", steps=1, batch_size=4, trainable=["mlp"],
                   drift={"prior": str(prior)})
    assert res.transforms == {"drift": 18}  # 6 blocks x (gate, up, down)
    trained, base = _tensors(tmp_path / "t"), _tensors(BASE)
    attention = [n for n in _projections(BASE) if ".self_attn." in n]
    assert len(attention) == 24 and all(torch.equal(trained[n], base[n]) for n in attention)
    record = json.loads((tmp_path / "t" / "provenance.json").read_text())["training"]
    assert record["settings"]["drift"] == {"prior": str(prior), "mode": "adaptive_cosine",
                                           "alpha": 1.0}


def test_cli_prior_and_train(tmp_path: Path) -> None:
    prior = tmp_path / "prior.safetensors"
    res = surgery("drift-prior", str(MATH_MODEL), str(BASE), "-o", str(prior), "-q",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "42 projection(s)" in res.stdout
    again = surgery("drift-prior", str(MATH_MODEL), str(BASE), "-o", str(prior), cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    res = surgery("train", str(BASE), "--data", str(MATH), "--out", str(tmp_path / "t"),
                  "--steps", "1", "--batch-size", "4", "--drift", str(prior),
                  "--drift-mode", "gradnorm", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "DRIFT bias on 42 tensor(s)" in res.stdout
    bad = surgery("train", str(BASE), "--data", str(MATH), "--out", str(tmp_path / "u"),
                  "--steps", "1", "--drift-alpha", "2", cwd=tmp_path)
    assert bad.returncode == 2 and "need --drift PRIOR" in bad.stderr
    missing = surgery("train", str(BASE), "--data", str(MATH), "--out", str(tmp_path / "v"),
                      "--steps", "1", "--drift", str(tmp_path / "nope.safetensors"),
                      cwd=tmp_path)
    assert missing.returncode == 2 and "no such prior file" in missing.stderr
    assert not (tmp_path / "v").exists()
