"""Running out of memory mid-run is one RunError line (exit 1 in the CLI), not a traceback,
leaves nothing that looks complete, and leaves no thread of ours running (the input hasher
still hashing into the interpreter's exit used to abort the process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT, write_checkpoint

SCRIPT = """
import resource, sys, threading
from surgery import load, slerp
from surgery.errors import RunError
a, b = load(sys.argv[1]), load(sys.argv[2])
# Address space for the interpreter and torch plus a little: one 200 MB tensor per input and
# their float32 copies (slerp needs whole tensors) cannot fit.
resource.setrlimit(resource.RLIMIT_AS, (1200 * 2**20, resource.RLIM_INFINITY))
try:
    slerp(a, b, 0.3).save(sys.argv[3])
except RunError as e:
    print("RunError:", e)
print("threads:", sorted(t.name for t in threading.enumerate()))
"""


def test_out_of_memory_is_one_line(tmp_path: Path) -> None:
    paths = [str(write_checkpoint(tmp_path / f"m{i}", {"w": torch.full((50 * 2**20,), i + 1.0)}))
             for i in range(2)]
    res = subprocess.run([sys.executable, "-c", SCRIPT, *paths, str(tmp_path / "out")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)},
                         timeout=300)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and lines, res.stderr
    assert lines[-2].startswith("RunError: out of memory during the run ("), lines
    assert "rerun the same command to resume" in lines[-2]
    assert lines[-1] == "threads: ['MainThread']"
    assert not (tmp_path / "out").exists()
