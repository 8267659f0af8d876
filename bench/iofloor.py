"""The I/O floor of a merge: read every input file once, then write one output of the merge's
size in shards, each fsync'd as the engine does. Run as its own process by ``bench.merge``:

    python -m bench.iofloor {buffered,direct} OUT_DIR OUT_BYTES SHARD_BYTES INPUT_FILE...

``buffered`` reads and writes through the page cache; ``direct`` bypasses it (O_DIRECT, aligned
16 MB requests), the faster of the two on the benchmark machine. The benchmark measures both and
takes the faster as the floor, so the floor is the best this machine's storage does, whichever
way the engine itself reads.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

CHUNK = 16 * 1024 * 1024  # a multiple of any block size O_DIRECT asks alignment to
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def read_all(files: list[Path], buf: mmap.mmap, flags: int) -> int:
    view = memoryview(buf)
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY | flags)
        try:
            offset = 0
            while n := os.preadv(fd, [view], offset):
                offset += n
            total += offset
        finally:
            os.close(fd)
    return total


def write_shards(out: Path, size: int, shard: int, buf: mmap.mmap, flags: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    view = memoryview(buf)
    written = 0
    index = 0
    while written < size:
        index += 1
        target = min(shard, size - written)
        fd = os.open(out / f"floor-{index:05d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags,
                     0o644)
        try:
            done = 0
            while done < target:
                n = min(CHUNK, target - done)
                if flags:  # direct: whole 4 KB blocks, the excess cut below
                    n = -(-n // 4096) * 4096
                done += os.pwrite(fd, view[:n], done)
            os.ftruncate(fd, target)
            os.fsync(fd)
        finally:
            os.close(fd)
        written += target
    return written


def main(argv: list[str]) -> None:
    mode, out, size, shard, *files = argv
    if mode not in ("buffered", "direct"):
        raise SystemExit(f"mode {mode!r}: buffered or direct")
    if mode == "direct" and not O_DIRECT:
        raise SystemExit("this platform has no O_DIRECT")
    flags = O_DIRECT if mode == "direct" else 0
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    read_all([Path(f) for f in files], buf, flags)
    write_shards(Path(out), int(size), int(shard), buf, flags)


if __name__ == "__main__":
    main(sys.argv[1:])
