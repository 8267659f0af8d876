"""CorDA (arXiv 2406.05223) against PEFT 0.21's ``preprocess_corda`` + ``init_lora_weights=
"corda"`` on the tiny Llama and the tiny GPT-2 (Conv1D layers) fixtures; residual + adapter
through ``PeftModel.from_pretrained``; adapter training (only A and B move) and
``merge_adapter`` (ours and PEFT's ``merge_and_unload``); bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery import load
from surgery.errors import ShapeMismatchError, UsageError
from surgery.train.adapter import load_adapter
from surgery.train.corda import (
    Covariances,
    _examples,
    collect_covariances,
    corda_decompose,
    decompose,
    residual,
    select_layers,
    write_corda,
)
from tests.conftest import FIXTURES, fixture_dir, surgery

CALIB_FULL = FIXTURES / "data" / "general.jsonl"
TASK = FIXTURES / "data" / "math.jsonl"
TARGETS = {"tiny-llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"],
           "tiny-gpt2": ["c_attn", "c_proj", "c_fc"]}
IDS = torch.tensor([[5, 17, 33, 4, 90, 61, 7, 12, 200, 3]])


@pytest.fixture(scope="module", autouse=True)
def _calibration(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The first 12 examples of general.jsonl (about 280 tokens, more than the 64 to 256
    inputs of any layer): enough for full-rank covariances, quick on a shared CPU."""
    global CALIB
    CALIB = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    CALIB.write_text("".join(CALIB_FULL.read_text().splitlines(keepends=True)[:12]))


CALIB = CALIB_FULL


def base(family: str) -> Path:
    return fixture_dir(family, "base")


def lm(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def peft_corda(family: str, mode: str, rank: int, alpha: float,
               covariance_file: Path | None = None) -> tuple[dict, torch.nn.Module]:
    """PEFT's CorDA initialisation of the fixture: its state dict (lora_A, lora_B,
    base_layer = W_res) and the model, from its own hooks or a covariance file."""
    model = lm(base(family))
    tok = AutoTokenizer.from_pretrained(str(base(family)))
    examples = _examples(tok, CALIB, 512, None)

    def run() -> None:
        for _, ids in examples:
            model(input_ids=torch.tensor([ids]))

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS[family],
                     init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method={"kpa": "kpm", "ipa": "ipm"}[mode],
                                              covariance_file=str(covariance_file)
                                              if covariance_file else None))
    with torch.no_grad():
        preprocess_corda(model, cfg, run_model=None if covariance_file else run)
    peft = get_peft_model(model, cfg)
    return peft.state_dict(), peft


def ours(family: str, mode: str, rank: int, alpha: float, dtype: torch.dtype = torch.float64,
         covariances: Covariances | None = None
         ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], Covariances]:
    """Our A, B and W_res (through the streaming residual node) per layer, and the
    covariances they came from."""
    model = lm(base(family))
    tok = AutoTokenizer.from_pretrained(str(base(family)))
    layers = select_layers(model, TARGETS[family])
    cov = covariances or collect_covariances(model, tok, CALIB, layers, dtype=dtype)
    result = corda_decompose(model, tok, None, rank, mode, targets=TARGETS[family],  # type: ignore[arg-type]
                             alpha=alpha, covariances=cov)
    res = residual(load(base(family)), result)
    out = {name: (layer.A, layer.B, res[layer.tensor])
           for name, layer in result.adapter.layers.items()}
    return out, cov


def assert_like_peft(family: str, got: dict, peft_state: dict, exact: bool) -> None:
    for name, (a, b, w_res) in got.items():
        key = f"base_model.model.{name}"
        want = (peft_state[f"{key}.lora_A.default.weight"],
                peft_state[f"{key}.lora_B.default.weight"],
                peft_state[f"{key}.base_layer.weight"])
        for what, x, y in zip(("A", "B", "W_res"), (a, b, w_res), want, strict=True):
            assert x.shape == y.shape, (name, what)
            if exact:
                assert torch.equal(x, y), (family, name, what, (x - y).abs().max())
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_decomposition_equals_peft_from_the_same_covariance(tmp_path: Path, family: str
                                                            ) -> None:
    """Our float64 covariances handed to PEFT (its covariance_file): A, B and W_res are
    PEFT's bit for bit in both modes; q/k/v and gate/up share one covariance."""
    model = lm(base(family))
    tok = AutoTokenizer.from_pretrained(str(base(family)))
    cov = collect_covariances(model, tok, CALIB, select_layers(model, TARGETS[family]))
    f = tmp_path / "cov.pt"
    torch.save({n: cov.of(n) for n in cov.groups}, f)
    for mode in ("kpa", "ipa"):
        got, _ = ours(family, mode, rank=4, alpha=8, covariances=cov)
        state, _ = peft_corda(family, mode, 4, 8, covariance_file=f)
        assert len(got) == (42 if family == "tiny-llama" else 16)
        assert_like_peft(family, got, state, exact=True)
    if family == "tiny-llama":
        assert cov.groups["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
        assert cov.groups["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
        assert len(cov.matrices) == 6 * 4


@pytest.mark.parametrize("family,mode", [("tiny-llama", "kpa"), ("tiny-gpt2", "ipa")])
def test_end_to_end_equals_peft_with_float32_sums(family: str, mode: str) -> None:
    """With PEFT's float32 sums, the whole run (its hooks against ours) gives PEFT's A, B
    and W_res bit for bit."""
    got, _ = ours(family, mode, rank=3, alpha=6, dtype=torch.float32)
    state, _ = peft_corda(family, mode, 3, 6)
    assert_like_peft(family, got, state, exact=True)


def test_float64_covariance_is_peft_to_float32_rounding() -> None:
    model = lm(base("tiny-gpt2"))
    tok = AutoTokenizer.from_pretrained(str(base("tiny-gpt2")))
    layers = select_layers(model, TARGETS["tiny-gpt2"])
    c64 = collect_covariances(model, tok, CALIB, layers)
    c32 = collect_covariances(model, tok, CALIB, layers, dtype=torch.float32)
    assert c64.examples == 12 and c64.tokens > 256
    for name, _, _ in layers:
        torch.testing.assert_close(c64.of(name).float(), c32.of(name), rtol=1e-5, atol=1e-7)
        assert c64.of(name).dtype == torch.float64


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_residual_plus_adapter_is_the_original_model(tmp_path: Path, family: str) -> None:
    out = tmp_path / "corda"
    res = surgery("corda", str(base(family)), "--data", str(CALIB), "--rank", "4", "--mode",
                  "kpa", "--out", str(out), "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "rank 4 on" in res.stdout
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["fan_in_fan_out"] == (family == "tiny-gpt2")
    assert (out / "residual" / "tokenizer.json").is_file()
    original = lm(base(family))
    adapted = PeftModel.from_pretrained(lm(out / "residual"), str(out / "adapter")).eval()
    with torch.no_grad():
        want, got = original(IDS).logits, adapted(IDS).logits
        plain = lm(out / "residual")(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=5e-5)
    assert (plain - want).abs().max() > 1e-3  # the residual alone is another model


def test_training_moves_only_a_and_b_and_merge_matches_peft(tmp_path: Path) -> None:
    """Train the CorDA adapter of the tiny GPT-2 (Conv1D): the output is W_res + s·B'A' for
    the adapted weights and W_res elsewhere, bit for bit; its logits are PeftModel's on the
    trained adapter; merge-adapter and PEFT's merge_and_unload give the same weights."""
    out = tmp_path / "corda"
    write_corda(base("tiny-gpt2"), out, data=str(CALIB), rank=4, mode="ipa", device="cpu")
    before = load_adapter(out)
    trained_dir = tmp_path / "trained"
    res = surgery("train", str(out / "residual"), "--adapter", str(out), "--data", str(TASK),
                  "--out", str(trained_dir), "--steps", "3", "--lr", "0.01", "--batch-size",
                  "4", "--device", "cpu", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    after = load_adapter(trained_dir / "adapter")
    assert set(after.layers) == set(before.layers)
    assert all(not torch.equal(after.layers[n].A, before.layers[n].A) and
               not torch.equal(after.layers[n].B, before.layers[n].B) for n in after.layers)
    record = json.loads((trained_dir / "provenance.json").read_text())["training"]
    assert record["trainable_params"] == sum(x.A.numel() + x.B.numel()
                                             for x in before.layers.values())
    res_w = load_file(str(out / "residual" / "model.safetensors"))
    got = load_file(str(trained_dir / "model.safetensors"))
    assert got.keys() == res_w.keys()
    by_tensor = {f"{n}.weight": layer for n, layer in after.layers.items()}
    for name, w in res_w.items():
        if name in by_tensor:
            layer = by_tensor[name]
            layer.kind = "conv1d"
            assert torch.equal(got[name], w + layer.delta()), name
        else:
            assert torch.equal(got[name], w), name  # frozen: the residual as it was
    peft = PeftModel.from_pretrained(lm(out / "residual"), str(trained_dir / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(trained_dir)(IDS).logits, peft(IDS).logits, rtol=0,
                                   atol=5e-5)
    merged = tmp_path / "merged"
    res = surgery("merge-adapter", str(out / "residual"), str(trained_dir / "adapter"),
                  "--out", str(merged), "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ours_w = load_file(str(merged / "model.safetensors"))
    theirs = peft.merge_and_unload().state_dict()
    for name, w in ours_w.items():
        torch.testing.assert_close(w, theirs[name], rtol=0, atol=1e-6)
        assert torch.equal(w, got[name])


def test_merge_adapter_recipe_op_and_any_peft_adapter(tmp_path: Path) -> None:
    """A PEFT LoRA adapter made by PEFT (random B, so not a no-op) on the tiny Llama,
    merged by ``op: merge_adapter``: PEFT's merge_and_unload weights."""
    model = lm(base("tiny-llama"))
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "down_proj"],
                     init_lora_weights=False)
    torch.manual_seed(0)
    peft = get_peft_model(model, cfg)
    peft.save_pretrained(str(tmp_path / "lora"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{base: {base('tiny-llama')}}}\nsteps:\n  m: {{op: merge_adapter, "
                      f"model: base, adapter: {tmp_path / 'lora'}}}\n"
                      f"output: {{from: m, path: {tmp_path / 'out'}}}\n")
    res = surgery("apply", str(recipe), "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    theirs = peft.merge_and_unload().state_dict()
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    changed = 0
    for name, w in got.items():
        torch.testing.assert_close(w, theirs[name], rtol=0, atol=1e-6)
        changed += not torch.equal(w, load(base("tiny-llama"))[name])
    assert changed == 12  # q_proj and down_proj of 6 blocks


def test_finetune_recipe_with_corda_adapter_plans_its_parameters(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"inputs: {{base: {base('tiny-llama')}}}\nsteps:\n  t:\n    op: finetune\n"
        f"    model: base\n    data: {TASK}\n    steps: 1\n"
        f"    adapter: {{corda: {{data: {CALIB}, rank: 2, targets: [q_proj, v_proj]}}}}\n"
        f"output: {{from: t, path: {tmp_path / 'out'}}}\n")
    res = surgery("plan", str(recipe), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # q_proj 64x64 and v_proj 32x64 in 6 blocks: 6 * 2 * ((64 + 64) + (32 + 64))
    assert f"{6 * 2 * (128 + 96):,} of" in res.stdout


def error(tmp_path: Path, *args: str) -> str:
    res = surgery(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    llama, gpt2 = str(base("tiny-llama")), str(base("tiny-gpt2"))
    msg = error(tmp_path, "corda", llama, "--data", str(CALIB), "--rank", "33", "--out",
                str(tmp_path / "a"), "-q")
    assert "rank 33 exceeds min(out, in) = 32" in msg and "k_proj" in msg
    assert not (tmp_path / "a").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    msg = error(tmp_path, "corda", gpt2, "--data", str(empty), "--rank", "2", "--out",
                str(tmp_path / "b"), "-q")
    assert "yields no tokens" in msg
    msg = error(tmp_path, "corda", llama, "--data", str(CALIB), "--rank", "2", "--targets",
                "c_attn", "--out", str(tmp_path / "c"), "-q")
    assert "'c_attn' matches no linear layer" in msg
    # A covariance file of the GPT-2 used for the Llama, an adapter of the Llama on the GPT-2
    cov = tmp_path / "gpt2.cov"
    ok = surgery("corda", gpt2, "--data", str(CALIB), "--rank", "2", "--covariance", str(cov),
                 "--out", str(tmp_path / "d"), "-q", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    msg = error(tmp_path, "corda", llama, "--data", str(CALIB), "--rank", "2", "--covariance",
                str(cov), "--out", str(tmp_path / "e"), "-q")
    assert "made from another model" in msg
    model = lm(base("tiny-llama"))
    with pytest.raises(ShapeMismatchError, match=r"no covariance for layer 'model\.layers\.0"):
        corda_decompose(model, None, None, 2, covariances=Covariances.load(cov))
    msg = error(tmp_path, "corda", gpt2, "--data", str(TASK), "--rank", "2", "--covariance",
                str(cov), "--out", str(tmp_path / "e2"), "-q")
    assert "made from another model, other calibration data" in msg
    msg = error(tmp_path, "merge-adapter", llama, str(tmp_path / "d"), "--out",
                str(tmp_path / "f"), "-q")
    assert "adapter layer 'transformer.h.0.attn.c_attn'" in msg
    other = tmp_path / "wide"
    write_wide_llama(other)
    msg = error(tmp_path, "merge-adapter", str(other), str(tmp_path / "d"), "--out",
                str(tmp_path / "g"), "-q")
    assert "tensor 'transformer.h.0.mlp.c_fc.weight'" in msg and "holds shape [64, 512]" in msg
    msg = error(tmp_path, "train", gpt2, "--adapter", str(tmp_path / "d"), "--data", str(TASK),
                "--out", str(tmp_path / "h"), "--steps", "1", "-q")
    assert "whose adapter belongs on" in msg and "residual" in msg
    # a singular covariance damping cannot fix names the layer
    with pytest.raises(UsageError, match=r"layer 'blocks\.3\.fc'.*stays singular"):
        decompose(torch.randn(4, 6), torch.zeros(6, 6), 2, "kpa", 1.0, "blocks.3.fc")
    with pytest.raises(UsageError, match="stays singular"):
        decompose(torch.randn(4, 6), torch.full((6, 6), float("nan")), 2, "ipa", 1.0, "x")


def write_wide_llama(path: Path) -> None:
    """The tiny GPT-2 with a wider MLP: the adapter's c_fc no longer fits."""
    model = lm(base("tiny-gpt2"))
    cfg = copy.deepcopy(model.config)
    cfg.n_inner = 512
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))


def test_merge_adapter_with_lora_bias_and_modules_to_save(tmp_path: Path) -> None:
    """A PEFT adapter on the tiny GPT-2 (Conv1D) with lora_bias and a module kept whole
    (modules_to_save): merge-adapter gives PEFT's merge_and_unload weights."""
    model = lm(base("tiny-gpt2"))
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], lora_bias=True,
                     modules_to_save=["ln_f"], init_lora_weights=False, fan_in_fan_out=True)
    torch.manual_seed(1)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "modules_to_save" in name or "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft.save_pretrained(str(tmp_path / "lora"))
    res = surgery("merge-adapter", str(base("tiny-gpt2")), str(tmp_path / "lora"), "--out",
                  str(tmp_path / "out"), "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    theirs = peft.merge_and_unload().state_dict()
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    original = load(base("tiny-gpt2"))
    changed = set()
    for name, w in got.items():
        torch.testing.assert_close(w, theirs[name], rtol=0, atol=1e-6)
        if not torch.equal(w, original[name]):
            changed.add(name)
    assert changed == {f"transformer.h.{i}.{m}.{p}" for i in range(4)
                       for m in ("attn.c_attn", "mlp.c_fc") for p in ("weight", "bias")} | \
        {"transformer.ln_f.weight", "transformer.ln_f.bias"}


def test_merge_adapter_undoes_extract_lora_at_full_rank(tmp_path: Path) -> None:
    """`surgery extract-lora` at full rank merged back into the base gives the fine-tune's
    linear layers and their biases (GPT-2: Conv1D, lora_bias); the rest stays the base."""
    ft, b = fixture_dir("tiny-gpt2", "math"), base("tiny-gpt2")
    res = surgery("extract-lora", str(ft), str(b), "-r", "64", "-o", str(tmp_path / "lora"),
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = surgery("merge-adapter", str(b), str(tmp_path / "lora"), "--out",
                  str(tmp_path / "back"), "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    back, want, start = load(tmp_path / "back"), load(ft), load(b)
    adapted = {f"{n}.{p}" for n in load_adapter(tmp_path / "lora").layers
               for p in ("weight", "bias")}
    assert len(adapted) == 32
    for name in want.names:
        torch.testing.assert_close(back[name], want[name] if name in adapted else start[name],
                                   rtol=0, atol=1e-5)
