"""Corrupt and hostile safetensors files are rejected before any allocation, naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from surgery import load
from surgery.checkpoint import open_checkpoint, read_header
from surgery.errors import CheckpointError
from tests.conftest import small_tensors, write_checkpoint


def raw_file(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def test_header_reads_names_shapes_offsets(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m", small_tensors(0))
    header = read_header(tmp_path / "m" / "model.safetensors")
    info = header.tensors["model.layers.0.mlp.up_proj.weight"]
    assert info.shape == (6, 4) and info.dtype == torch.float32 and info.nbytes == 96
    assert header.metadata == {"format": "pt"}


def test_read_returns_exact_values(tmp_path: Path) -> None:
    tensors = small_tensors(3)
    ck = open_checkpoint(write_checkpoint(tmp_path / "m", tensors))
    for name, t in tensors.items():
        assert torch.equal(ck.read(name), t)


@pytest.mark.parametrize(
    ("header", "data", "length", "needle"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None,
         "run past the end"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None,
         "overlap"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "needs 12"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None,
         "run past"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**12,
         "corrupt safetensors header"),
        ([1, 2], b"", None, "not a JSON object"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "exactly dtype"),
    ],
)
def test_hostile_headers_rejected(tmp_path: Path, header: object, data: bytes,
                                  length: int | None, needle: str) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=needle) as err:
        read_header(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_bytes_outside_every_tensor_rejected(tmp_path: Path) -> None:
    entry = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    trailing = raw_file(tmp_path / "trail.safetensors", entry, b"\0" * 12)
    with pytest.raises(CheckpointError, match="4 bytes of the data section belong to no tensor"):
        read_header(trailing)
    hole = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    with pytest.raises(CheckpointError, match="4 bytes of the data section belong to no tensor"):
        read_header(raw_file(tmp_path / "hole.safetensors", hole, b"\0" * 12))


def test_duplicate_keys_rejected(tmp_path: Path) -> None:
    body = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' \
           b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    with pytest.raises(CheckpointError, match="duplicate key"):
        read_header(path)


def test_truncated_file(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "m", small_tensors(0)) / "model.safetensors"
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="run past the end"):
        load(src.parent)
    src.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="only 5 bytes"):
        load(src.parent)


def test_missing_path_and_pickles(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "nope")
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickled by default"):
        load(d)
    w = load(d, allow_pickle=True)
    assert torch.equal(w["w"], torch.ones(2))


def test_sharded_checkpoint_is_read_through_its_index(tmp_path: Path) -> None:
    from surgery import linear

    tensors = small_tensors(1)
    src = write_checkpoint(tmp_path / "m", tensors)
    linear([load(src)]).save(tmp_path / "sharded", shard_size=100)
    sharded = load(tmp_path / "sharded")
    assert len(sharded.node.checkpoints()[0].files) > 2
    for name, t in tensors.items():
        assert torch.equal(sharded[name].to(t.dtype), t)
