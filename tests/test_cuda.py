"""The GPU path (``device: cuda``) against the CPU's: the same selections and drops, values
equal to float32 rounding, and GPU memory that does not grow with the model. Skipped where
torch sees no CUDA device (CI has none); ``SURGERY_TEST_DEVICE=cpu`` runs the comparisons
with the CPU on both sides, to check the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.merge import Shape, build_models
from surgery import (
    Weights,
    dare_linear,
    dare_ties,
    hft_reset,
    linear,
    lines,
    load,
    slerp,
    sparsify,
    task_arithmetic,
    ties,
)
from surgery.methods import ties_dare

DEVICE = os.environ.get("SURGERY_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="torch sees no CUDA device")


def _models(root: Path, layers: int = 2, hidden: int = 512) -> dict[str, Path]:
    """The benchmark's Llama-shaped base and three fine-tunes (bf16), small."""
    return build_models(Shape(hidden=hidden, inter=2 * hidden, layers=layers, vocab=1000,
                              kv=hidden // 4), root)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _models(tmp_path_factory.mktemp("gpu"))


METHODS = ["linear", "task_arithmetic", "ties", "ties_weighted", "dare_ties", "dare_linear",
           "dare_l1", "slerp", "lines", "sparsify", "hft", "operators"]


def _merges(paths: dict[str, Path]) -> dict[str, Weights]:
    base, a, b, c = (load(str(paths[n])) for n in ("base", "ft1", "ft2", "ft3"))
    return {
        "linear": linear([a, b, c]),
        "task_arithmetic": task_arithmetic(base, [a, b, c], weights=[1.0, 0.5, 0.25],
                                           lambda_=0.8),
        "ties": ties(base, [a, b, c], density=0.2),
        "ties_weighted": ties(base, [a, b, c], density=0.3, weights=[1.0, 0.6, 0.3],
                              consensus="count"),
        "dare_ties": dare_ties(base, [a, b, c], density=0.2),
        "dare_linear": dare_linear(base, [a, b, c], density=0.4),
        "dare_l1": dare_linear(base, [a, b], density=0.5, rescale="l1"),
        "slerp": slerp(a, b, 0.3),
        "lines": lines(base, ties(base, [a, b, c], density=0.2), alpha=0.5, beta=0.5),
        "sparsify": sparsify(base, a, density=0.05),
        "hft": hft_reset(base, a),
        "operators": base + 0.5 * (a - base) - (c - b) / 4,
    }


@pytest.mark.parametrize("method", METHODS)
def test_a_save_on_the_gpu_equals_the_cpus(models: dict[str, Path], tmp_path: Path,
                                           method: str) -> None:
    outs = []
    for i, device in enumerate(("cpu", DEVICE)):
        # A graph of its own per device: whole-model statistics are computed on that device.
        merged = _merges(models)[method]
        merged.save(tmp_path / f"out{i}", dtype="float32", device=device, hash_inputs=False)
        outs.append(load_file(str(tmp_path / f"out{i}" / "model.safetensors")))
    base = load_file(str(models["base"] / "model.safetensors"))
    for name, want in outs[0].items():
        got = outs[1][name]
        # Elementwise float32 arithmetic; a GPU may fuse a multiply and an add (one rounding
        # instead of two), so equal to a few float32 ulps of the operands, not bit for bit.
        # SLERP's angle comes from dot products of whole tensors, summed in another order.
        torch.testing.assert_close(got, want, rtol=1e-5 if method == "slerp" else 4e-7,
                                   atol=1e-8, msg=f"{method} {name}")
        # Selections (TIES trims, DARE drops, top-K masks, HFT halves) are exact: the same
        # entries are left at the base's value.
        kept = base[name].float()
        assert torch.equal(got == kept, want == kept), f"{method} {name}"


def test_trim_cuts_on_the_gpu_equal_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several pieces (the one-pass selection, with torch's bracket and kthvalue on a GPU),
    # many ties, and a few distinct values (the radix passes).
    monkeypatch.setattr(ties_dare, "BLOCK", 4096)
    g = torch.Generator().manual_seed(7)
    spread = (torch.randn(3, 100_000, generator=g) * 1024).round() / 256
    few = (torch.randn(3, 20_000, generator=g) * 4).round() / 4
    for taus in (spread, few):
        n = taus.shape[1]
        for density in (0.01, 0.2, 0.77):
            k = int(density * n)
            cuts = {}
            for device in ("cpu", DEVICE):
                bits = taus.to(device).abs().view(torch.int32)
                pieces = [(s, lambda s=s, bits=bits: list(bits[:, s:s + 4096]))
                          for s in range(0, n, 4096)]
                cuts[device] = ties_dare.find_cuts(pieces, k, n)
            assert cuts[DEVICE] == cuts["cpu"], density
            for i, cut in enumerate(cuts["cpu"]):
                tau = taus[i].clone()
                cut.apply(tau, 0, torch.empty_like(tau))
                assert torch.equal(tau, ties_dare.trim(taus[i], density))


def test_dare_drops_on_the_gpu_equal_the_cpus() -> None:
    # The torch hash on the GPU against the numpy one on the CPU, across spans and 2^32.
    n = 5 * (1 << 16) + 123
    for start in (0, (1 << 16) - 3, (1 << 32) - (3 << 16) - 7):
        kept = {}
        for device in ("cpu", DEVICE):
            ones = torch.ones(n, device=device)
            ties_dare.drop_entries(ones, start, 0.37, lambda high: ties_dare.dare_key(
                7, "model.layers.0.mlp.up_proj.weight", 2, high))
            kept[device] = ones.cpu()
        assert torch.equal(kept[DEVICE], kept["cpu"]), start
        assert abs(kept["cpu"].mean().item() - 0.37) < 0.01


@pytest.mark.skipif(DEVICE != "cuda", reason="measures CUDA memory")
def test_gpu_memory_does_not_grow_with_depth(tmp_path: Path) -> None:
    peaks = {}
    for layers in (2, 8):
        paths = _models(tmp_path / f"d{layers}", layers=layers, hidden=1024)
        merged = ties(load(str(paths["base"])),
                      [load(str(paths[n])) for n in ("ft1", "ft2", "ft3")], density=0.2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        merged.save(tmp_path / f"out{layers}", dtype="bfloat16", device="cuda",
                    hash_inputs=False)
        peaks[layers] = torch.cuda.max_memory_allocated()
    # Four times the depth, the same largest tensor: the same peak (allocator rounding aside).
    assert peaks[8] <= 1.1 * peaks[2], peaks
