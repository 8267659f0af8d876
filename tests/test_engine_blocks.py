"""The write pass computes large row-wise tensors in blocks of rows, from reused buffers; the
bytes written must be those of the whole-tensor computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import surgery.engine.stream as stream
from surgery import linear, load, task_arithmetic
from surgery.engine.buffers import BufferPool


@pytest.mark.parametrize("block", [5, 7, 1 << 30])
def test_blocked_save_equals_whole_tensor_values(three_models: list[Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 block: int) -> None:
    monkeypatch.setattr(stream, "ROW_BLOCK_ELEMENTS", block)
    base, m1, m2 = (load(str(p)) for p in three_models)
    expr = task_arithmetic(base, [m1, m2], weights=[1.0, 0.5], lambda_=0.7)
    soup = linear([m1, m2, base], weights=[1.0, 2.0, 3.0])
    for i, w in enumerate((expr, soup)):
        w.save(tmp_path / f"out{i}", dtype="bfloat16", device="cpu")
        saved = load_file(str(tmp_path / f"out{i}" / "model.safetensors"))
        for name in w.names:
            want = w[name]
            want = want.to(torch.bfloat16) if want.is_floating_point() else want
            assert torch.equal(saved[name], want), name


def test_pool_reuses_buffers_and_drops_the_oldest() -> None:
    pool = BufferPool(limit=100)
    a = pool.take(40)
    pool.give(a)
    assert pool.take(40).data_ptr() == a.data_ptr()
    b, c, d = pool.take(40), pool.take(40), pool.take(30)
    for t in (b, c, d):
        pool.give(t)
    assert pool.held == 70  # b was dropped: 40 + 40 + 30 > 100
    assert pool.take(30).data_ptr() == d.data_ptr()
