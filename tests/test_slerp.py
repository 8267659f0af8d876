"""SLERP on known angles, the colinear fallback, and the parameter t."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from surgery import load, slerp
from surgery.errors import UsageError
from surgery.methods.spherical import slerp_tensors
from tests.conftest import write_checkpoint


def test_known_angles() -> None:
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])  # 90 degrees apart
    half = slerp_tensors(a, b, 0.5)
    assert half.tolist() == pytest.approx([math.sqrt(2), math.sqrt(2)], abs=1e-6)
    third = slerp_tensors(a, b, 1 / 3)  # 30 degrees along the arc
    assert third.tolist() == pytest.approx([2 * math.cos(math.pi / 6), 1.0], abs=1e-6)
    assert torch.equal(slerp_tensors(a, b, 0.0), a)
    # 2x2 tensors are one 4-vector: [1,0,0,0] to [0,0,0,1]
    m = slerp_tensors(torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                      torch.tensor([[0.0, 0.0], [0.0, 1.0]]), 0.5)
    s = math.sqrt(0.5)
    assert m.flatten().tolist() == pytest.approx([s, 0.0, 0.0, s], abs=1e-6)


def test_colinear_and_antipodal_fall_back_to_linear() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])
    assert slerp_tensors(a, b, 0.25).tolist() == [1.25, 2.5]
    assert slerp_tensors(a, -a, 0.5).tolist() == [0.0, 0.0]
    # cos = 1 - 5e-7 is colinear at the default 1e-6 but spherical at mergekit's 5e-4
    angle = math.acos(1 - 5e-7)
    c = torch.tensor([1.0, 0.0], dtype=torch.float64)
    d = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    assert torch.equal(slerp_tensors(c, d, 0.3), 0.7 * c + 0.3 * d)
    near = torch.tensor([1.0, 0.0]), torch.tensor([math.cos(0.01), math.sin(0.01)])
    spherical = slerp_tensors(*near, 0.5, epsilon=1e-6)
    assert spherical.tolist() == pytest.approx([math.cos(0.005), math.sin(0.005)], abs=1e-7)
    assert torch.equal(slerp_tensors(*near, 0.5, epsilon=1e-3), 0.5 * near[0] + 0.5 * near[1])


def test_slerp_models_and_t_range(tmp_path: Path) -> None:
    a = load(write_checkpoint(tmp_path / "a", {"w": torch.tensor([2.0, 0.0]),
                                               "model.layers.1.w": torch.tensor([0.0, 1.0])}))
    b = load(write_checkpoint(tmp_path / "b", {"w": torch.tensor([0.0, 2.0]),
                                               "model.layers.1.w": torch.tensor([1.0, 0.0])}))
    out = slerp(a, b, t=[0.0, 1.0])  # L = 2: block 1 at t = 1, the non-block w at t = 0
    assert out["w"].tolist() == [2.0, 0.0]
    assert out["model.layers.1.w"].tolist() == pytest.approx([1.0, 0.0], abs=1e-7)
    with pytest.raises(UsageError, match=r"^slerp: t 1.5 is outside \[0, 1\]$"):
        slerp(a, b, t=1.5)
