"""The I/O floor of a merge: read every input file once, then write one output of the merge's
size in shards, each fsync'd as the engine does. Run as its own process by ``bench.merge``:

    python -m bench.iofloor OUT_DIR OUT_BYTES SHARD_BYTES INPUT_FILE...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CHUNK = 16 * 1024 * 1024


def read_all(files: list[Path], buf: bytearray) -> int:
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return total


def write_shards(out: Path, size: int, shard: int, buf: bytearray) -> int:
    out.mkdir(parents=True, exist_ok=True)
    view = memoryview(buf)
    written = 0
    index = 0
    while written < size:
        index += 1
        target = min(shard, size - written)
        with open(out / f"floor-{index:05d}.bin", "wb", buffering=0) as f:
            done = 0
            while done < target:
                done += f.write(view[:min(len(buf), target - done)])
            os.fsync(f.fileno())
        written += target
    return written


def main(argv: list[str]) -> None:
    out, size, shard, *files = argv
    buf = bytearray(CHUNK)
    read_all([Path(f) for f in files], buf)
    write_shards(Path(out), int(size), int(shard), buf)


if __name__ == "__main__":
    main(sys.argv[1:])
