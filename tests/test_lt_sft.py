"""LT-SFT (arXiv 2110.07560) on the committed tiny-llama fixtures: phase 2 moves only the
mask, the delta holds exactly K entries chosen by sparsify's own selection, deltas compose by
addition and revert to θ0, the base hash is checked, bad input fails before training, and the
masked AdamW equals PyTorch's AdamW on a masked gradient."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery import apply_sparse_deltas, extract_sparse_delta, load, revert_sparse_deltas, sparsify
from surgery.checkpoint.hashing import cache_dir
from surgery.errors import UsageError
from surgery.methods.sparse import (
    SparseDelta,
    SparseDeltaFile,
    load_sparse_delta,
    maskable_filter,
    weights_sha256,
)
from surgery.recipe.build import build_recipe
from surgery.train import lt_sft
from surgery.train.lt_sft import IndexMask, L1Pull, LtSftResult, MaskedAdamW
from tests.conftest import FIXTURES, surgery

BASE = FIXTURES / "tiny-llama" / "base"
MATH = FIXTURES / "data" / "math.jsonl"
GENERAL = FIXTURES / "data" / "general.jsonl"
SETTINGS = {"steps": 3, "lr": 2e-3, "batch_size": 8, "seed": 0}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _maskable_total() -> int:
    keep = maskable_filter()
    return sum(t.numel() for n, t in _weights(BASE).items() if t.is_floating_point() and keep(n))


@pytest.fixture(scope="module")
def math_run(tmp_path_factory: pytest.TempPathFactory) -> LtSftResult:
    out = tmp_path_factory.mktemp("lt") / "math.delta.safetensors"
    # weight decay on: the masked optimiser must still leave every other entry alone
    return lt_sft(BASE, MATH, out=out, density=0.01, weight_decay=0.1, **SETTINGS)


@pytest.fixture(scope="module")
def language_run(tmp_path_factory: pytest.TempPathFactory) -> LtSftResult:
    out = tmp_path_factory.mktemp("lt") / "language.delta.safetensors"
    return lt_sft(BASE, GENERAL, out=out, density=0.02, l1=0.5, **SETTINGS)


def test_phase2_moves_only_masked_entries(math_run: LtSftResult) -> None:
    base, after = _weights(BASE), _weights(math_run.phase2)
    delta = math_run.delta
    assert set(after) == set(base)
    moved = 0
    for name, theta0 in base.items():
        theta2 = after[name]
        keep = torch.zeros(theta0.numel(), dtype=torch.bool)
        if name in delta.indices:
            keep[delta.indices[name]] = True
        outside = ~keep.reshape(theta0.shape)
        # bit-identical outside the mask (norms, head and unselected entries alike)
        assert torch.equal(theta2[outside], theta0[outside]), name
        moved += int((theta2 != theta0).sum())
    assert 0.5 * delta.k < moved <= delta.k  # the selected entries did train


def test_the_delta_holds_exactly_k_entries_with_its_provenance(math_run: LtSftResult) -> None:
    k = math.floor(0.01 * _maskable_total())
    on_disk = load_sparse_delta(math_run.path)
    assert math_run.k == on_disk.k == k == sum(i.numel() for i in on_disk.indices.values())
    assert sum(v.numel() for v in on_disk.values.values()) == k
    base = _weights(BASE)
    after = _weights(math_run.phase2)
    for name, idx in on_disk.indices.items():  # the values are θ2 − θ0 on the entries
        want = (after[name].flatten() - base[name].flatten())[idx]
        assert torch.equal(on_disk.values[name], want), name
    t = on_disk.training
    assert on_disk.base_sha256 == weights_sha256(load(BASE)) == t["base"]["sha256"]
    assert t["base"]["path"] == str(BASE) and t["k"] == k and t["density"] == 0.01
    assert t["data"]["sha256"] == hashlib.sha256(MATH.read_bytes()).hexdigest()
    assert t["phase1"]["steps"] == t["phase2"]["steps"] == 3
    assert t["phase2"]["settings"]["weight_decay"] == 0.1 and t["phase2"]["l1"] == 0.0
    assert t["phase1"]["trainable_params"] == 271_168  # phase 1: every parameter
    assert t["phase2"]["trainable_params"] < 271_168


def test_selection_equals_sparsify_on_the_phase1_model(math_run: LtSftResult) -> None:
    base, phase1 = load(BASE), load(math_run.phase1)
    extracted = extract_sparse_delta(base, phase1, 0.01)
    ours = math_run.delta
    assert set(extracted.indices) == set(ours.indices)
    for name in ours.indices:
        assert torch.equal(extracted.indices[name], ours.indices[name]), name
    # sparsify keeps θ1 on exactly these entries (where τ is not 0) and θ0 elsewhere
    sparse = sparsify(base, phase1, 0.01)
    theta0 = _weights(BASE)
    theta1 = _weights(math_run.phase1)
    for name, idx in ours.indices.items():
        changed = torch.nonzero((sparse[name] != theta0[name]).flatten()).flatten()
        tau = (theta1[name] - theta0[name]).flatten()
        assert torch.equal(changed, idx[tau[idx] != 0]), name


def test_a_given_phase1_is_used_as_is(tmp_path: Path) -> None:
    model = FIXTURES / "tiny-llama" / "math"
    events: list = []
    res = lt_sft(BASE, MATH, out=tmp_path / "d.safetensors", density=0.005, phase1=model,
                 progress=events.append, **SETTINGS)
    assert res.history1 == [] and len(events) == 3  # phase 2's updates only
    extracted = extract_sparse_delta(load(BASE), load(model), 0.005)
    for name in extracted.indices:
        assert torch.equal(extracted.indices[name], res.delta.indices[name]), name
    assert res.delta.training["phase1"] == {"model": str(model),
                                            "sha256": weights_sha256(load(model))}


def test_a_rerun_reuses_both_phases(math_run: LtSftResult, tmp_path: Path) -> None:
    events: list = []
    again = lt_sft(BASE, MATH, out=tmp_path / "again.safetensors", density=0.01,
                   weight_decay=0.1, progress=events.append, **SETTINGS)
    assert events == []
    assert again.path.read_bytes() == math_run.path.read_bytes()  # byte-reproducible


def test_composition_is_the_sum_and_revert_gives_the_base(math_run: LtSftResult,
                                                          language_run: LtSftResult) -> None:
    base = load(BASE)
    files = [SparseDeltaFile(math_run.path), SparseDeltaFile(language_run.path)]
    composed = apply_sparse_deltas(base, files)
    theta0 = _weights(BASE)
    phis = [load_sparse_delta(math_run.path), load_sparse_delta(language_run.path)]
    overlap = 0
    for name, t0 in theta0.items():
        want = t0.to(torch.float64).flatten().clone()
        for phi in phis:
            if name in phi.indices:
                want[phi.indices[name]] += phi.values[name].to(torch.float64)
        assert torch.equal(composed[name], want.to(t0.dtype).reshape(t0.shape)), name
        if name in phis[0].indices and name in phis[1].indices:
            overlap += len(set(phis[0].indices[name].tolist())
                           & set(phis[1].indices[name].tolist()))
    assert overlap < min(p.k for p in phis)  # separate deltas, not one mask twice
    res = surgery("sparse", "stats", str(math_run.path), str(language_run.path),
                  cwd=math_run.path.parent)
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()
            if line.startswith(("layer ", "non-block"))]
    both = sum(int(r[-2]) for r in rows)  # the "A and B" column, summed over the groups
    assert both == overlap and sum(int(r[-4]) for r in rows) == phis[0].k
    back = revert_sparse_deltas(composed, files)
    for name, t0 in theta0.items():
        assert torch.equal(back[name], t0), name


def test_the_l1_pull_is_its_penalty_gradient() -> None:
    p = torch.nn.Parameter(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    idx = torch.tensor([0, 2, 4])
    pull = L1Pull(0.6, {"w": idx}, n=3)
    assert pull.attach({"w": p}) == ["w"]
    with torch.no_grad():
        p.view(-1)[0] += 0.5   # above θ0: +λ/N
        p.view(-1)[2] -= 0.25  # below θ0: -λ/N
        p.view(-1)[1] += 9.0   # outside the selection: untouched
    grad = torch.ones(2, 3)
    pull("w", p, grad)
    assert torch.equal(grad, torch.tensor([[1.2, 1.0, 0.8], [1.0, 1.0, 1.0]]))


def test_the_index_mask_keeps_exactly_its_entries() -> None:
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(6, 5, generator=g)
    idx = torch.tensor([0, 7, 8, 29], dtype=torch.int32)
    mask = IndexMask({"w": idx})
    assert mask.attach({"w": torch.nn.Parameter(torch.zeros(6, 5))}) == ["w"]
    want = torch.zeros(30)
    want[idx.long()] = grad.flatten()[idx.long()]
    mask("w", None, grad)
    assert torch.equal(grad, want.reshape(6, 5))
    with pytest.raises(UsageError, match=r"name no trainable parameter, e\.g\. .w."):
        IndexMask({"w": idx}).attach({"v": torch.nn.Parameter(torch.zeros(1))})


def test_l1_delta_metadata(language_run: LtSftResult) -> None:
    t = language_run.delta.training
    assert t["phase2"]["l1"] == 0.5 and t["density"] == 0.02
    assert language_run.k == math.floor(0.02 * _maskable_total())


def _masked_reference(weight_decay: float) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                    list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (11,), (4, 3, 2)]
    start = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) < 0.3 for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    ref = [torch.nn.Parameter(t.clone()) for t in start]
    opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                            weight_decay=weight_decay, foreach=False)
    for step in grads:
        for p, gr, m in zip(ref, step, masks, strict=True):
            p.grad = gr * m
        opt.step()
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    mine = MaskedAdamW(ours, [torch.nonzero(m.flatten()).flatten() for m in masks], lr=0.01,
                       betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    for step in grads:
        for p, gr in zip(ours, step, strict=True):
            p.grad = gr.clone()  # unmasked: the optimiser itself reads the selection only
        mine.step()
    # two float32 moments and an int32 index per selected entry, and a step counter
    assert mine.state_bytes() == sum(int(m.sum()) * (4 + 4 + 4) + 4 for m in masks)
    return [p.detach() for p in ref], [p.detach() for p in ours], [*masks, *start]


def test_masked_adamw_equals_adamw_on_a_masked_gradient() -> None:
    ref, ours, _ = _masked_reference(0.0)
    for a, b in zip(ref, ours, strict=True):
        assert torch.equal(a, b)


def test_masked_adamw_decays_only_the_selected_entries() -> None:
    ref, ours, rest = _masked_reference(0.1)
    masks, start = rest[:3], rest[3:]
    for a, b, m, s in zip(ref, ours, masks, start, strict=True):
        assert torch.equal(a[m], b[m])  # AdamW's value on the selection
        assert torch.equal(b[~m], s[~m])  # and nothing else moved (AdamW decays it)
        assert not torch.equal(a[~m], s[~m])


def test_sparse_apply_checks_the_base_hash(math_run: LtSftResult, tmp_path: Path) -> None:
    other = load(FIXTURES / "tiny-llama" / "chat")
    delta = SparseDeltaFile(math_run.path)
    with pytest.raises(UsageError) as e:
        apply_sparse_deltas(other, [delta])
    msg = str(e.value)
    assert "\n" not in msg and str(math_run.path) in msg and str(BASE) in msg
    assert "tiny-llama/chat" in msg and delta.base_sha256[:16] in msg
    assert weights_sha256(other)[:16] in msg and "--ignore-base-hash" in msg
    forced = apply_sparse_deltas(other, [delta], ignore_base_hash=True)
    name, idx = next((n, i) for n, i in delta.load().indices.items() if i.numel())
    chat = _weights(FIXTURES / "tiny-llama" / "chat")[name].flatten()
    assert torch.equal(forced[name].flatten()[idx],
                       (chat[idx].double() + delta.load().values[name].double()).float())

    res = surgery("sparse", "apply", str(FIXTURES / "tiny-llama" / "chat"), str(math_run.path),
                  "-o", str(tmp_path / "bad"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: sparse_apply: sparse delta ")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    res = surgery("sparse", "apply", str(FIXTURES / "tiny-llama" / "chat"), str(math_run.path),
                  "-o", str(tmp_path / "forced"), "--ignore-base-hash", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert torch.equal(load(tmp_path / "forced")[name], forced[name])

    recipe = (f"inputs:\n  chat: {FIXTURES / 'tiny-llama' / 'chat'}\nsteps:\n"
              f"  s: {{op: sparse_apply, base: chat, deltas: [{math_run.path}]}}\n"
              "output: {from: s, path: out/s}\n")
    with pytest.raises(UsageError, match=r"recipe.yaml:4.*was made on base"):
        build_recipe(recipe)
    build_recipe(recipe.replace("]}", "], ignore_base_hash: true}"))


def test_a_delta_without_a_base_hash_still_applies(math_run: LtSftResult,
                                                   tmp_path: Path) -> None:
    """Files written before deltas recorded their base (no base_sha256) apply unchecked."""
    d = load_sparse_delta(math_run.path)
    old = SparseDelta(d.base_model, d.k, d.shapes, d.indices, d.values)
    path = old.save(tmp_path / "old.safetensors")
    with open(path, "rb") as f:
        header = json.loads(f.read(8 + int.from_bytes(open(path, "rb").read(8), "little"))[8:])
    assert "base_sha256" not in header["__metadata__"]
    applied = apply_sparse_deltas(load(FIXTURES / "tiny-llama" / "chat"),
                                  [SparseDeltaFile(path)])
    assert len(applied.names) == len(load(BASE).names)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_bad_density_fails_before_training(density: float, tmp_path: Path) -> None:
    before = set((cache_dir() / "lt_sft").glob("*")) if (cache_dir() / "lt_sft").is_dir() \
        else set()
    with pytest.raises(UsageError, match=rf"^density: {density} is outside \(0, 1\]$"):
        lt_sft(BASE, MATH, out=tmp_path / "d.safetensors", density=density, **SETTINGS)
    res = surgery("sparse", "train", str(BASE), "--data", str(MATH), "--density", str(density),
                  "-o", str(tmp_path / "d.safetensors"), "--steps", "2", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: density: {density} is outside (0, 1]"
    assert not (tmp_path / "d.safetensors").exists()
    now = set((cache_dir() / "lt_sft").glob("*")) if (cache_dir() / "lt_sft").is_dir() \
        else set()
    assert now == before  # nothing trained


def test_a_phase1_of_another_architecture_or_shape_fails_before_training(
        tmp_path: Path) -> None:
    res = surgery("sparse", "train", str(BASE), "--data", str(MATH), "-o",
                  str(tmp_path / "d.safetensors"), "--steps", "2", "--phase1",
                  str(FIXTURES / "tiny-gpt2" / "math"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: phase1: {FIXTURES / 'tiny-gpt2' / 'math'} is a gpt2 "
                                  f"model, the base {BASE} a llama model")
    bent = tmp_path / "bent"
    shutil.copytree(FIXTURES / "tiny-llama" / "math", bent)
    tensors = _weights(bent)
    name = "model.layers.2.mlp.up_proj.weight"
    tensors[name] = tensors[name][:64].contiguous()
    save_file(tensors, str(bent / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UsageError) as e:
        lt_sft(BASE, MATH, out=tmp_path / "d.safetensors", phase1=bent, **SETTINGS)
    assert str(e.value) == (f"phase1: tensor {name!r} has shape [64, 64] in {bent} but "
                            f"[128, 64] in the base {BASE}")
    assert not (tmp_path / "d.safetensors").exists()


def test_data_of_the_wrong_kind_fails_before_training(tmp_path: Path) -> None:
    res = surgery("sparse", "train", str(BASE), "--data", str(FIXTURES / "data" /
                                                              "sentiment.jsonl"),
                  "-o", str(tmp_path / "d.safetensors"), "--steps", "2", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("error: ") and "sentiment.jsonl: text+label records train a " \
        "sequence classifier" in res.stderr and "phase 1" not in res.stderr


def test_recipe_step_errors_name_the_yaml_line(tmp_path: Path) -> None:
    recipe = (f"inputs:\n  base: {BASE}\nsteps:\n  t:\n    op: lt_sft\n    base: base\n"
              f"    data: {MATH}\n    density: 2\n    steps: 2\noutput: {{from: t, path: o}}\n")
    with pytest.raises(UsageError, match=r"^recipe.yaml:4.*density: 2(\.0)? is outside"):
        build_recipe(recipe)
    with pytest.raises(UsageError, match=r"trainable is not a setting of LT-SFT"):
        build_recipe(recipe.replace("density: 2", "trainable: mlp"))


def test_ctrl_c_in_phase2_then_rerun_equals_an_uninterrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Phase 2 resumes from its saved state (masked AdamW moments included) with the bytes of
    an uninterrupted run."""
    args = {**SETTINGS, "steps": 5, "weight_decay": 0.05}
    monkeypatch.setenv("WEIGHT_SURGERY_CACHE", str(tmp_path / "cache-whole"))
    whole = lt_sft(BASE, MATH, out=tmp_path / "whole.safetensors", density=0.01, l1=0.3,
                   **args)
    monkeypatch.setenv("WEIGHT_SURGERY_CACHE", str(tmp_path / "cache-cut"))
    phases: list[str] = []

    def stop(e) -> None:
        if phases[-1].startswith("phase 2") and e.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lt_sft(BASE, MATH, out=tmp_path / "cut.safetensors", density=0.01, l1=0.3,
               progress=stop, on_phase=phases.append, **args)
    assert not (tmp_path / "cut.safetensors").exists()
    events: list = []
    resumed = lt_sft(BASE, MATH, out=tmp_path / "cut.safetensors", density=0.01, l1=0.3,
                     progress=events.append, **args)
    assert [e.step for e in events] == [4, 5]  # phase 1 cached, phase 2 from update 3
    assert resumed.path.read_bytes() == whole.path.read_bytes()
    assert (resumed.phase2 / "model.safetensors").read_bytes() == \
        (whole.phase2 / "model.safetensors").read_bytes()


def test_phase2_updates_equal_a_plain_pytorch_masked_adamw_loop(tmp_path: Path) -> None:
    """Two phase-2 updates against the loop a reader would write: the base, every tensor
    without a selected entry frozen, the gradient multiplied by a boolean mask, clip, then
    torch.optim.AdamW; bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.train.data import epoch_order
    from tests.test_train_loop import _plain_batch

    res = lt_sft(BASE, MATH, out=tmp_path / "d.safetensors", density=0.01,
                 phase1=FIXTURES / "tiny-llama" / "math", steps=2, lr=1e-3, batch_size=4)
    ours = _weights(res.phase2)

    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).train()
    chosen = {n: i for n, i in res.delta.indices.items() if i.numel()}
    params = []
    masks = {}
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        if name in chosen:
            params.append(p)
            m = torch.zeros(p.numel(), dtype=torch.bool)
            m[chosen[name]] = True
            masks[name] = m.reshape(p.shape)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    rows = [json.loads(line) for line in MATH.read_text().splitlines()]
    order = epoch_order(len(rows), 0, 0)
    for step in range(2):
        batch = _plain_batch(tok, rows, order[4 * step:4 * step + 4])
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100)
        loss.backward()
        for name, p in model.named_parameters():
            if name in masks:
                p.grad.mul_(masks[name])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ours[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_phase2_on_a_gpu_moves_only_masked_entries(tmp_path: Path) -> None:
    res = lt_sft(BASE, MATH, out=tmp_path / "d.safetensors", density=0.01, l1=0.5,
                 device="cuda", weight_decay=0.1, **{**SETTINGS, "seed": 1})
    base, after = _weights(BASE), _weights(res.phase2)
    moved = 0
    for name, theta0 in base.items():
        keep = torch.zeros(theta0.numel(), dtype=torch.bool)
        if name in res.delta.indices:
            keep[res.delta.indices[name]] = True
        outside = ~keep.reshape(theta0.shape)
        assert torch.equal(after[name][outside], theta0[outside]), name
        moved += int((after[name] != theta0).sum())
    assert 0.5 * res.k < moved <= res.k


def test_the_recipe_step_yields_the_base_plus_its_delta(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.recipe import run_recipe

    monkeypatch.setenv("WEIGHT_SURGERY_CACHE", str(tmp_path / "cache"))  # its own runs

    delta, out = tmp_path / "d.safetensors", tmp_path / "o"
    text = (f"inputs:\n  base: {BASE}\n  math: {FIXTURES / 'tiny-llama' / 'math'}\nsteps:\n"
            f"  lt: {{op: lt_sft, base: base, phase1: math, data: {MATH}, density: 0.01, "
            f"steps: 2, lr: 0.001, batch_size: 4, delta: {delta}}}\n"
            f"output: {{from: lt, path: {out}}}\n")
    events: list = []
    run_recipe(build_recipe(text), on_train=events.append)
    assert len(events) == 2  # phase 2 only: phase1 is given
    got, want = load(out), apply_sparse_deltas(load(BASE), [SparseDeltaFile(delta)])
    assert got.names == want.names
    for name in got.names:
        assert torch.equal(got[name], want[name]), name
    record = json.loads((out / "provenance.json").read_text())
    assert record["sections"]["LT-SFT"].startswith("LT-SFT (composable sparse fine-tuning")
    events.clear()
    run_recipe(build_recipe(text), force=True, on_train=events.append)
    assert events == []  # cached
