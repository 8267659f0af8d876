"""The fine-tune step on a GPU (bf16 autocast, float32 master weights) against the CPU's
float32 run. Skipped without CUDA; CI has none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.train import finetune
from tests.conftest import FIXTURES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="torch sees no CUDA device")

BASE = FIXTURES / "tiny-llama" / "base"
MATH = FIXTURES / "data" / "math.jsonl"


@pytest.mark.parametrize("objective", ["sft", "asft", "sorted"])
def test_bf16_training_on_cuda_tracks_the_cpu_run(tmp_path: Path, objective: str) -> None:
    losses: dict[str, list[float]] = {"cpu": [], "cuda": []}
    for device in ("cpu", "cuda"):
        finetune(BASE, MATH, out=tmp_path / device, steps=10, lr=1e-3, batch_size=8,
                 objective=objective, device=device,
                 progress=lambda e, d=device: losses[d].append(e.loss))
    cpu, gpu = load_file(str(tmp_path / "cpu" / "model.safetensors")), \
        load_file(str(tmp_path / "cuda" / "model.safetensors"))
    assert gpu.keys() == cpu.keys() and all(gpu[k].dtype == cpu[k].dtype for k in cpu)
    base = load_file(str(BASE / "model.safetensors"))
    for name in cpu:  # the updates agree in direction and size, to bf16 noise
        a, b = (cpu[name] - base[name]).flatten(), (gpu[name] - base[name]).flatten()
        if a.norm() > 0:
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9, name
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=2e-2)
    assert losses["cuda"][-1] == pytest.approx(losses["cpu"][-1], rel=0.1)


def test_cuda_run_is_deterministic_and_resumes(tmp_path: Path) -> None:
    args = {"steps": 6, "lr": 1e-3, "batch_size": 4, "device": "cuda"}
    finetune(BASE, MATH, out=tmp_path / "a", **args)

    def stop(e: object) -> None:
        if getattr(e, "step", 0) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(BASE, MATH, out=tmp_path / "b", progress=stop, **args)
    res = finetune(BASE, MATH, out=tmp_path / "b", **args)
    assert res.resumed_from == 3
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), \
        load_file(str(tmp_path / "b" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)
