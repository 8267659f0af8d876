"""The write pass computes large row-wise tensors in blocks of rows, from reused buffers; the
bytes written must be those of the whole-tensor computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import surgery.engine.stream as stream
import surgery.expr.node as node
from surgery import dare_linear, dare_ties, linear, load, task_arithmetic, ties
from surgery.engine.buffers import BufferPool
from surgery.errors import CheckpointError
from surgery.writer import PlannedTensor, ShardWriter
from tests.conftest import small_tensors, write_checkpoint


@pytest.mark.parametrize(("block", "cache_block", "threads"),
                         [(5, 3, 1), (5, 3, 3), (7, 1 << 20, 2), (40, 9, 4),
                          (1 << 30, 1 << 30, 2)])
@pytest.mark.parametrize("shared", [True, False], ids=["read-once", "read-twice"])
def test_blocked_save_equals_whole_tensor_values(three_models: list[Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 block: int, cache_block: int,
                                                 threads: int, shared: bool) -> None:
    """Also both ways a tensor with statistics is read: once, whole, for the statistics and
    the blocks (views), or in pieces for the statistics and again in blocks."""
    if not shared:
        monkeypatch.setattr(stream, "SHARED_READ_BYTES", 0)
    monkeypatch.setattr(stream, "ROW_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(stream, "CACHE_BLOCK_ELEMENTS", cache_block)
    monkeypatch.setattr(node, "PIECE_ELEMENTS", cache_block)
    base, m1, m2 = (load(str(p)) for p in three_models)
    expr = task_arithmetic(base, [m1, m2], weights=[1.0, 0.5], lambda_=0.7)
    soup = linear([m1, m2, base], weights=[1.0, 2.0, 3.0])
    # Whole-tensor statistics (TIES's trim threshold) and random draws (DARE) across blocks.
    trimmed = ties(base, [m1, m2], density=0.3, weights=[1.0, 0.6], lambda_=0.9)
    dropped = dare_ties(base, [m1, m2], density=0.4)
    rescaled = dare_linear(base, [m1, m2], density=0.5, weights=[0.5, 1.0])
    # Task vectors of a few exact values: the trim threshold is tied across blocks.
    g = torch.Generator().manual_seed(5)
    grid = {k: (v * 4).round() / 4 if v.is_floating_point() else v
            for k, v in small_tensors(0).items()}
    steps = [write_checkpoint(tmp_path / f"q{j}", {
        k: v + torch.randint(-2, 3, v.shape, generator=g) / 2 if v.is_floating_point() else v
        for k, v in grid.items()}) for j in range(2)]
    tied = ties(load(str(write_checkpoint(tmp_path / "grid", grid))),
                [load(str(p)) for p in steps], density=0.3)
    for i, w in enumerate((expr, soup, trimmed, dropped, rescaled, tied)):
        w.save(tmp_path / f"out{i}", dtype="bfloat16", device="cpu", threads=threads)
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


def test_row_range_reads_are_the_rows_of_the_whole_tensor(three_models: list[Path]) -> None:
    ck = load(str(three_models[0])).node.checkpoints()[0]
    name = max(ck.names, key=lambda n: ck.info(n).nbytes)
    whole = ck.read(name)
    rows = ck.read(name, rows=(1, 2))
    assert torch.equal(rows, whole[1:3])
    buf = torch.empty(rows.numel() * rows.element_size(), dtype=torch.uint8)
    assert torch.equal(ck.read(name, buf, rows=(1, 2)), whole[1:3])
    with pytest.raises(CheckpointError, match="has no rows"):
        ck.read(name, rows=(whole.shape[0], 1))


def test_shard_writer_takes_row_blocks_in_order(tmp_path: Path) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    planned = [PlannedTensor("a", (4, 3), torch.float32), PlannedTensor("b", (), torch.float32)]
    writer = ShardWriter(tmp_path / "s.safetensors", planned, {})
    assert not writer.add("a", t[:1])
    with pytest.raises(RuntimeError, match="does not match the plan"):
        writer.add("a", t)  # only 3 rows are left
    assert writer.add("a", t[1:4]) is True
    assert writer.add("b", torch.tensor(5.0))
    writer.finish()
    saved = load_file(str(tmp_path / "s.safetensors"))
    assert torch.equal(saved["a"], t) and float(saved["b"]) == 5.0


def _peak_scaled(inputs: list[node.Node], calls: list[tuple[str, str]]) -> node.ElementwiseNode:
    """x / max |x| over the whole tensor: a statistic (the maximum, from pieces) that every
    block needs; ``calls`` records (tensor, thread) of each time it is computed."""

    def peak(name: str, ctx: node.EvalContext) -> float:
        import threading

        calls.append((name, threading.current_thread().name))
        return max(float(t.abs().max()) for _, (t,) in ctx.pieces(inputs[:1], name)) or 1.0

    return node.ElementwiseNode(inputs, lambda _, ts, __, top: ts[0] / top, "peak",
                                rowwise=True, statistic=peak)


def test_statistics_are_computed_once_per_tensor_ahead_and_shared_by_its_blocks(
        three_models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "ROW_BLOCK_ELEMENTS", 5)
    monkeypatch.setattr(stream, "CACHE_BLOCK_ELEMENTS", 3)
    monkeypatch.setattr(node, "PIECE_ELEMENTS", 4)
    base = load(str(three_models[0]))
    inner: list[tuple[str, str]] = []
    outer: list[tuple[str, str]] = []
    # A statistic computed from a node that needs one itself.
    w = type(base)(_peak_scaled([_peak_scaled([base.node], inner)], outer))
    w.save(tmp_path / "out", device="cpu", threads=2)
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    floats = [n for n in base.names if base[n].is_floating_point()]
    for name in floats:
        x = base[name].float()
        want = x / (float(x.abs().max()) or 1.0)
        want = want / (float(want.abs().max()) or 1.0)
        torch.testing.assert_close(saved[name], want, rtol=0, atol=0, msg=name)
    for calls in (inner, outer):
        assert sorted(n for n, _ in calls) == sorted(floats)  # once each
        assert {t for _, t in calls} == {"surgery-statistics_0"}


def test_tensors_with_statistics_are_read_once_up_to_the_shared_limit(
        three_models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TIES needs its trim thresholds before any block: within SHARED_READ_BYTES a tensor's
    inputs are read once (whole, the blocks computing from views of them), above it again
    for the statistics' pieces (as often as the threshold's search scans them); the bytes
    are the same either way. Counted where the checkpoints read (Checkpoint.bytes_read) and
    in the run's profile."""
    monkeypatch.setattr(stream, "ROW_BLOCK_ELEMENTS", 5)
    monkeypatch.setattr(node, "PIECE_ELEMENTS", 4)
    models = [load(str(p)) for p in three_models]
    cks = [m.node.checkpoints()[0] for m in models]
    merged = ties(models[0], models[1:], density=0.3)
    once = sum(ck.info(r).nbytes for n in merged.names for ck, r in merged.node.reads(n))
    sizes = {n: sum(ck.info(n).nbytes for ck in cks) for n in merged.names
             if cks[0].info(n).dtype.is_floating_point and cks[0].info(n).shape}
    largest = max(sizes.values())
    reads = {}
    default = stream.SHARED_READ_BYTES
    for limit in (default, 0, largest - 1):
        monkeypatch.setattr(stream, "SHARED_READ_BYTES", limit)
        before = [ck.bytes_read for ck in cks]
        out = tmp_path / f"out{limit}"
        profile = merged.save(out, dtype="bfloat16", device="cpu", threads=2,
                              hash_inputs=False).profile
        reads[limit] = sum(ck.bytes_read - b for ck, b in zip(cks, before, strict=True))
        assert profile.bytes_read == reads[limit]
        saved = load_file(str(out / "model.safetensors"))
        for name in merged.names:
            want = merged[name]
            assert torch.equal(saved[name], want.to(torch.bfloat16)
                               if want.is_floating_point() else want), (limit, name)
    assert reads[default] == once
    assert reads[0] >= once + sum(sizes.values())
    twice = sum(v for v in sizes.values() if v == largest)
    assert once + twice <= reads[largest - 1] < reads[0]


@pytest.mark.parametrize("ahead_bytes", [0, 1, None], ids=["none", "one-byte", "default"])
def test_whole_reads_wait_for_the_read_ahead_budget(
        three_models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ahead_bytes: int | None) -> None:
    """Reads beyond the tensor computing and the next one's statistics wait while those held
    would pass SHARED_AHEAD_BYTES (0: only when none are held): the run still reads every
    input once and writes the same bytes, however the reads queue."""
    monkeypatch.setattr(stream, "ROW_BLOCK_ELEMENTS", 5)
    monkeypatch.setattr(node, "PIECE_ELEMENTS", 4)
    if ahead_bytes is not None:
        monkeypatch.setattr(stream, "SHARED_AHEAD_BYTES", ahead_bytes)
    models = [load(str(p)) for p in three_models]
    cks = [m.node.checkpoints()[0] for m in models]
    merged = ties(models[0], models[1:], density=0.3)
    once = sum(ck.info(r).nbytes for n in merged.names for ck, r in merged.node.reads(n))
    before = [ck.bytes_read for ck in cks]
    merged.save(tmp_path / "out", dtype="bfloat16", device="cpu", threads=2, hash_inputs=False)
    assert sum(ck.bytes_read - b for ck, b in zip(cks, before, strict=True)) == once
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in merged.names:
        want = merged[name]
        assert torch.equal(saved[name], want.to(torch.bfloat16)
                           if want.is_floating_point() else want), name


def test_a_failing_statistic_fails_the_save_and_writes_nothing(
        three_models: list[Path], tmp_path: Path) -> None:
    base = load(str(three_models[0]))

    def broken(name: str, ctx: node.EvalContext) -> None:
        raise ValueError(f"{name}: no statistic")

    w = type(base)(node.ElementwiseNode([base.node], lambda _, ts, __, ___: ts[0], "broken",
                                        rowwise=True, statistic=broken))
    with pytest.raises(ValueError, match="no statistic"):
        w.save(tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_kept_tensors_of_a_plain_stream_are_copies_of_their_own() -> None:
    """Without reuse_outputs the consumer may keep every tensor: none may alias a read buffer
    that the engine reuses for the next tensors (it once did, for tensors read as stored)."""
    from safetensors.torch import load_file

    from surgery import load
    from surgery.engine.stream import StreamOptions, resolve_device, stream_tensors
    from tests.conftest import FIXTURES

    path = FIXTURES / "tiny-gpt2" / "math"
    model = load(path)
    # A small read-ahead budget, so that read buffers are reused many times over.
    opts = StreamOptions(device=resolve_device("cpu"), prefetch_bytes=64 * 1024)
    kept = dict(stream_tensors(model.node, model.names, opts, lambda n: model.spec(n).dtype))
    want = load_file(str(path / "model.safetensors"))
    assert kept.keys() == want.keys()
    assert [n for n in want if not torch.equal(kept[n], want[n])] == []
