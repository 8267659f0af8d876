"""Shared helpers: real safetensors checkpoints written to tmp_path, fixture paths."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from surgery_cli.main import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor],
                     config: dict | None = None) -> Path:
    """A model directory with model.safetensors and config.json."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {"num_hidden_layers": 2}))
    return path


def small_tensors(seed: int, extra: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=g) + extra,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
        "model.layers.1.input_layernorm.weight": torch.randn(4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g),
        "buffer.position_ids": torch.arange(6),
    }


@pytest.fixture
def three_models(tmp_path: Path) -> list[Path]:
    return [write_checkpoint(tmp_path / f"m{i}", small_tensors(i)) for i in range(3)]


def fixture_dir(family: str, name: str) -> Path:
    path = FIXTURES / family / name
    if not path.is_dir():
        pytest.fail(f"missing committed fixture {path}; run python fixtures/make_fixtures.py")
    return path


def surgery(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the real `surgery` command in-process (click's runner), in directory ``cwd``."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(main, list(args), prog_name="surgery")
    finally:
        os.chdir(old)
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Content-addressed results (fine-tunes, distilled data, materialised models, file
    hashes) go to a cache of this test session, never the user's."""
    os.environ["WEIGHT_SURGERY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _one_thread_for_mergekit(request: pytest.FixtureRequest):
    """mergekit computes on the calling thread, our engine on threads of one intra-op thread
    each; a whole-tensor reduction (a norm in karcher or model_stock) summed by two threads
    can differ in the last bit. Oracle tests run mergekit on one thread too, whatever an
    earlier test left set."""
    if "mergekit" not in request.module.__name__:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
