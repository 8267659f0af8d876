"""LoRA extraction against mergekit-extract-lora (same A and B, bit for bit), through PEFT
(the adapter loads and gives the fine-tune's logits at full rank, base + BA at low rank, on
Llama and GPT-2's Conv1D layers), and its errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from surgery import load
from surgery.errors import UsageError
from surgery.methods.lora_extract import extract_lora, low_rank
from tests.conftest import FIXTURES, surgery

LLAMA, GPT2 = FIXTURES / "tiny-llama", FIXTURES / "tiny-gpt2"
IDS = torch.tensor([[1, 5, 9, 23, 44, 7, 100, 3]])
KEEP = ["embedding", "norm", "head"]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_low_rank_is_the_truncated_svd() -> None:
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(12, 7, generator=g)
    a, b, err = low_rank(tau, 3)
    s = torch.linalg.svdvals(tau)
    assert a.shape == (3, 7) and b.shape == (12, 3)
    assert torch.allclose(torch.linalg.svdvals(b @ a)[:3], s[:3], atol=1e-5)
    want = float(torch.linalg.norm(tau - b @ a) / torch.linalg.norm(tau))
    assert err == pytest.approx(want, rel=1e-5)
    assert err == pytest.approx(float((s[3:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()),
                                rel=1e-6)
    a2, b2, _ = low_rank(tau, 3, distribute_scale=False)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-5) and torch.allclose(b2.T @ b2,
                                                                       torch.eye(3), atol=1e-5)
    full_a, full_b, zero = low_rank(tau, 50)
    assert full_a.shape == (7, 7) and zero == 0.0 and torch.allclose(full_b @ full_a, tau,
                                                                      atol=1e-5)


def test_same_adapter_tensors_as_mergekit(tmp_path: Path) -> None:
    theirs = tmp_path / "mergekit"
    cli = Path(sys.executable).with_name("mergekit-extract-lora")
    # Both SVDs on one thread: LAPACK's result may differ in the last bit with the thread
    # count, which an earlier test may have left at anything.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([str(cli), "--model", str(LLAMA / "math"), "--base-model",
                           str(LLAMA / "base"), "--out-path", str(theirs), "--max-rank", "8"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = extract_lora(load(LLAMA / "math"), load(LLAMA / "base"), tmp_path / "ours",
                            rank=8, keep_full=KEEP)
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(theirs / "adapter_model.safetensors"))
    b = load_file(str(ours.path / "adapter_model.safetensors"))
    assert set(a) == set(b)  # mergekit keeps norms, embeddings and head whole too
    for key in a:
        assert torch.equal(a[key], b[key]), key
    cfg = json.loads((ours.path / "adapter_config.json").read_text())
    mk = json.loads((theirs / "adapter_config.json").read_text())
    assert cfg["r"] == mk["r"] == 8 and cfg["lora_alpha"] == mk["lora_alpha"]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_full_rank_adapter_gives_the_fine_tune_in_peft(tmp_path: Path, family: str) -> None:
    root = FIXTURES / family
    res = extract_lora(load(root / "math"), load(root / "base"), tmp_path / "a", rank=512,
                       keep_full=KEEP)
    assert res.uncaptured == [] and res.max_error < 1e-5
    stored = load_file(str(res.path / "adapter_model.safetensors"))
    ft = load_file(str(root / "math" / "model.safetensors"))
    whole = {k.removeprefix("base_model.model."): t for k, t in stored.items() if "lora_" not in k}
    assert len(whole) > 10
    for name, t in whole.items():  # kept modules hold the fine-tune's values (a tied head its
        source = name if name in ft else "transformer.wte.weight"  # embedding's)
        assert torch.equal(t, ft[source]), name
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (family == "tiny-gpt2")  # Conv1D, decomposed, not copied
    assert cfg["lora_bias"] is (family == "tiny-gpt2")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"),
                                        str(res.path))
    want = _logits(AutoModelForCausalLM.from_pretrained(root / "math"))
    base = _logits(AutoModelForCausalLM.from_pretrained(root / "base"))
    got = _logits(adapted)
    assert (want - base).abs().max() > 1.0
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_low_rank_adapter_is_base_plus_ba_with_the_reported_errors(tmp_path: Path) -> None:
    res = extract_lora(load(GPT2 / "math"), load(GPT2 / "base"), tmp_path / "a", rank=4)
    assert len(res.layers) == 16 and all(r.rank == 4 for r in res.layers)
    assert sorted(res.uncaptured) == sorted(
        n for n in load(GPT2 / "base").names if ".ln_" in n or "wte" in n or "wpe" in n)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(GPT2 / "base"),
                                       str(res.path)).merge_and_unload().state_dict()
    ft, base = load_file(str(GPT2 / "math" / "model.safetensors")), \
        load_file(str(GPT2 / "base" / "model.safetensors"))
    record = json.loads((res.path / "extraction.json").read_text())
    for layer in record["layers"]:
        w = layer["module"] + ".weight"
        tau, approx = ft[w] - base[w], merged[w] - base[w]
        err = float(torch.linalg.norm(tau - approx) / torch.linalg.norm(tau))
        assert err == pytest.approx(layer["relative_error"], abs=2e-5), w
        assert 0.05 < err < 1.0
        bias = layer["module"] + ".bias"  # biases are carried exactly
        assert torch.allclose(merged[bias], ft[bias], atol=1e-6)
    res8 = extract_lora(load(GPT2 / "math"), load(GPT2 / "base"), tmp_path / "b", rank=8)
    for lo, hi in zip(res.layers, res8.layers, strict=True):
        assert hi.relative_error < lo.relative_error


def test_cli_recipe_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    res = surgery("extract-lora", str(LLAMA / "math"), str(LLAMA / "base"), "--rank", "8",
                  "-o", str(out), "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "42 layers at rank <= 8" in res.stdout and "not in the adapter: 15" in res.stdout
    again = surgery("extract-lora", str(LLAMA / "math"), str(LLAMA / "base"), "--rank", "8",
                    "-o", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    other = surgery("extract-lora", str(GPT2 / "math"), str(LLAMA / "base"), "--rank", "8",
                    "-o", str(tmp_path / "x"), cwd=tmp_path)
    assert other.returncode == 2 and "lacks tensor" in other.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    with pytest.raises(UsageError, match="matches no module"):
        extract_lora(load(LLAMA / "math"), load(LLAMA / "base"), tmp_path / "y", rank=2,
                     include=["q_prj"])
    with pytest.raises(UsageError, match="unknown kind"):
        extract_lora(load(LLAMA / "math"), load(LLAMA / "base"), tmp_path / "y", rank=2,
                     keep_full=["norms"])

    shutil.copytree(LLAMA, tmp_path / "tiny-llama")
    (tmp_path / "r.yaml").write_text(
        "inputs: {base: tiny-llama/base, math: tiny-llama/math, code: tiny-llama/code}\n"
        "steps:\n"
        "  merged: {op: ties, base: base, models: [math, code], density: 0.5}\n"
        "  lora: {op: extract_lora, model: merged, base: base, rank: 4, out: out/lora,\n"
        "         keep_full: [norm]}\n"
        "output: []\n")
    res = surgery("apply", "r.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "out/lora/adapter_config.json").read_text())
    assert cfg["r"] == 4 and len(cfg["modules_to_save"]) == 13
    record = json.loads((tmp_path / "out/lora/extraction.json").read_text())
    assert sorted(record["uncaptured"]) == ["lm_head.weight", "model.embed_tokens.weight"]
