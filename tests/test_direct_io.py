"""Direct I/O (surgery/checkpoint/directio.py): reads of files not in the page cache and every
shard write bypass the cache. The bytes must be the same as through the cache, at any offset,
alignment and size, and a merge must give byte-identical shards either way."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery import load, ties
from surgery.checkpoint import directio, open_checkpoint
from surgery.checkpoint.hashing import file_sha256
from surgery.engine.buffers import BufferPool
from surgery.writer import PlannedTensor, ShardWriter


def _uncache(path: Path) -> None:
    """Write back and drop the file's pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_here(tmp_path: Path) -> bool:
    fd = directio.open_direct(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
    if fd is not None:
        os.close(fd)
    return fd is not None


@pytest.fixture
def direct(tmp_path: Path) -> None:
    if not hasattr(os, "posix_fadvise") or not _direct_here(tmp_path):
        pytest.skip("this platform or file system has no O_DIRECT")


def _awkward_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors whose data start at offsets of every alignment: a 3-byte tensor first puts the
    float32 one at an odd offset (read through the cache: no aligned view of it exists)."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "odd": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "f32_at_odd_offset": torch.randn(300, 1001, generator=g),
        "pad": torch.tensor([7], dtype=torch.uint8),
        "bf16": torch.randn(513, 1537, generator=g).to(torch.bfloat16),
        "f32": torch.randn(1024, 777, generator=g),
        "small": torch.randn(5, generator=g),
    }
    planned = [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardWriter(path, planned, {"format": "pt"})
    for n, t in tensors.items():
        writer.add(n, t)
    writer.finish()
    return tensors


def test_direct_reads_equal_the_stored_bytes_at_any_offset(tmp_path: Path, direct: None) -> None:
    path = tmp_path / "model.safetensors"
    want = _awkward_file(path)
    _uncache(path)
    ck = open_checkpoint(path)
    assert ck.info("f32_at_odd_offset").start % 4 != 0
    assert ck.info("f32").start % 4 != 0 and ck.info("bf16").start % 2 == 0
    # The first large aligned read decides (before a read through the cache, whose readahead
    # would bring the whole small file in).
    assert torch.equal(ck.read("bf16"), want["bf16"])
    for name, t in want.items():
        assert torch.equal(ck.read(name), t), name
        if t.dim() and t.shape[0] > 7:
            assert torch.equal(ck.read(name, rows=(3, t.shape[0] - 7)), t[3:-4]), name
            assert torch.equal(ck.read(name, rows=(t.shape[0] - 1, 1)), t[-1:]), name
    assert ck._direct_fds[path] is not None  # the large aligned reads went around the cache
    # Into pooled buffers of read_size bytes, and back: the pool gets each whole buffer.
    pool = BufferPool(1 << 30)
    for name in ("bf16", "f32_at_odd_offset"):  # direct, and through the cache
        size = ck.read_size(name, (1, 250))
        got = ck.read(name, pool.take(size), rows=(1, 250))
        assert torch.equal(got, want[name][1:251])
        assert got.untyped_storage().nbytes() == size
        pool.give(got)
        assert pool.held == size
        assert pool.take(size).untyped_storage().data_ptr() == got.untyped_storage().data_ptr()
        pool.held = 0
        pool.free.clear()


def test_files_in_the_page_cache_are_read_through_it(tmp_path: Path, direct: None) -> None:
    path = tmp_path / "model.safetensors"
    _awkward_file(path)
    _uncache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not directio.mostly_cached(fd)
        path.read_bytes()
        assert directio.mostly_cached(fd)
    finally:
        os.close(fd)
    ck = open_checkpoint(path)
    ck.read("bf16")
    assert ck._direct_fds[path] is None


def test_direct_io_can_be_turned_off(tmp_path: Path, direct: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    want = _awkward_file(path)
    _uncache(path)
    monkeypatch.setenv("WEIGHT_SURGERY_DIRECT_IO", "off")
    ck = open_checkpoint(path)
    assert torch.equal(ck.read("bf16"), want["bf16"])
    assert ck._direct_fds[path] is None


@pytest.mark.parametrize("stage", [4096, 3 * 4096])
def test_sequential_file_writes_every_byte_across_stages(tmp_path: Path, stage: int) -> None:
    rng = random.Random(stage)
    chunks = [bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 4095, 4096, 9000])))
              for _ in range(40)]
    path = tmp_path / "out.bin"
    f = directio.SequentialFile(path, stage_bytes=stage)
    for i, c in enumerate(chunks):  # bytes and tensors, as the shard writer passes them
        f.write(c if i % 2 else torch.frombuffer(bytearray(c), dtype=torch.uint8)
                if c else torch.empty(0, dtype=torch.uint8))
    f.finish()
    assert path.read_bytes() == b"".join(chunks)  # the padded tail was cut
    assert f.direct == _direct_here(tmp_path)


def test_sequential_file_reports_a_failed_write(tmp_path: Path) -> None:
    f = directio.SequentialFile(tmp_path / "out.bin", stage_bytes=4096)
    read_only = os.open(tmp_path / "out.bin", os.O_RDONLY)
    os.close(f.fd)
    f.fd = read_only  # the writing thread's pwrite now fails (EBADF)
    with pytest.raises(OSError):
        for _ in range(4):
            f.write(bytes(4096))
        f.finish()
    f.abort()


def _models(tmp_path: Path) -> list[Path]:
    """A base and two fine-tunes with tensors large enough to be read directly and, for the
    largest (4.2M elements), in several row pieces."""
    g = torch.Generator().manual_seed(1)
    base = {"model.embed_tokens.weight": torch.randn(4100, 1024, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(1000, 257, generator=g),
            "model.layers.0.input_layernorm.weight": torch.randn(1024, generator=g)}
    paths = []
    for i in range(3):
        noise = torch.Generator().manual_seed(10 + i)
        ts = {n: (t + (0.01 * torch.randn(t.shape, generator=noise) if i else 0))
              .to(torch.bfloat16) for n, t in base.items()}
        d = tmp_path / f"m{i}"
        d.mkdir()
        planned = [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
        w = ShardWriter(d / "model.safetensors", planned, {"format": "pt"})
        for n, t in ts.items():
            w.add(n, t)
        w.finish()
        (d / "config.json").write_text('{"num_hidden_layers": 1}')
        paths.append(d)
    return paths


def test_merges_are_byte_identical_with_and_without_direct_io(
        tmp_path: Path, direct: None, monkeypatch: pytest.MonkeyPatch) -> None:
    base, a, b = _models(tmp_path)
    outputs = {}
    for mode in ("off", "auto"):
        monkeypatch.setenv("WEIGHT_SURGERY_DIRECT_IO", mode)
        for p in (base, a, b):
            _uncache(p / "model.safetensors")
        m0, m1, m2 = load(str(base)), load(str(a)), load(str(b))
        for op, w in (("ta", m0 + 0.5 * ((m1 - m0) + (m2 - m0))),
                      ("ties", ties(m0, [m1, m2], density=0.2))):
            out = tmp_path / f"{op}-{mode}"
            w.save(out, dtype="bfloat16", hash_inputs=False)
            outputs[(op, mode)] = (out / "model.safetensors").read_bytes()
        used = [ck._direct_fds.get(ck.files[0]) for ck in dict.fromkeys(w.node.checkpoints())]
        assert len(used) == 3
        assert all(fd is None for fd in used) if mode == "off" else \
            all(fd is not None for fd in used)
    for op in ("ta", "ties"):
        assert outputs[(op, "off")] == outputs[(op, "auto")], op
    # and the direct-written output is what safetensors reads
    got = load_file(str(tmp_path / "ta-auto" / "model.safetensors"))
    assert got["model.embed_tokens.weight"].shape == (4100, 1024)


@pytest.mark.parametrize("chunk", [8192, 1 << 20])
def test_file_hashes_read_around_the_cache_are_the_files_sha256(
        tmp_path: Path, direct: None, chunk: int) -> None:
    path = tmp_path / "model.safetensors"
    _awkward_file(path)  # 6 MB, not a multiple of the block size
    assert path.stat().st_size % directio.ALIGN
    _uncache(path)
    assert file_sha256(path, chunk) == hashlib.sha256(path.read_bytes()).hexdigest()
