"""The fine-tune step on two CPU processes (torchrun, gloo): the same global batch gives the
single process's weights and losses, bit for bit (each process runs half of an update's
forward passes; the gradient sums are the same two-term sums)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from surgery.train import finetune
from tests.conftest import FIXTURES

BASE = FIXTURES / "tiny-llama" / "base"
MATH = FIXTURES / "data" / "math.jsonl"


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WEIGHT_SURGERY_CACHE=str(tmp_path / "cache"))
    cli = Path(sys.executable).with_name("surgery")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "--no-python", str(cli), "train", str(BASE),
                           "--data", str(MATH), "-q", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_processes_give_the_single_process_result(tmp_path: Path) -> None:
    done = _torchrun(tmp_path, "--out", "two", "--steps", "3", "--batch-size", "4",
                     "--grad-accum", "2", "--lr", "1e-3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes
    one = finetune(BASE, MATH, out=tmp_path / "one", steps=3, batch_size=4, grad_accum=2,
                   lr=1e-3)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], load_file(str(BASE / "model.safetensors"))[k]) for k in a)
    two = json.loads((tmp_path / "two" / "provenance.json").read_text())["training"]
    assert [h["loss"] for h in two["history"]] == [h["loss"] for h in one.history]
    assert [h["tokens"] for h in two["history"]] == [h["tokens"] for h in one.history]


def test_grad_accum_must_divide_among_the_processes(tmp_path: Path) -> None:
    done = _torchrun(tmp_path, "--out", "x", "--steps", "1", "--grad-accum", "3")
    assert done.returncode != 0
    assert "grad_accum 3 does not divide among 2 processes" in done.stderr
    assert not (tmp_path / "x").exists()
