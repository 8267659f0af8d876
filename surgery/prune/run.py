"""``prune``: score blocks on calibration text, then stream the model without the chosen ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.data import read_records, subsample
from surgery.engine import SaveResult, save
from surgery.evaluate.layers import LayerScores, score_layers
from surgery.evaluate.metrics import Progress, load_model
from surgery.expr import load
from surgery.methods.layers import drop_layers

ANGULAR_REF = "The Unreasonable Ineffectiveness of the Deeper Layers, arXiv 2403.17887"
BI_REF = "ShortGPT, arXiv 2403.03853"


def score_table(scores: LayerScores, method: str, dropped: list[int], data: str | Path) -> str:
    """The model-card section of a pruning: what was dropped, why, and every block's scores."""
    rows = ["| block | angular distance (start of n-block run) | block influence |",
            "|---:|---:|---:|"]
    for i, bi in enumerate(scores.block_influence):
        ang = f"{scores.angular[i]:.6f}" if i < len(scores.angular) else ""
        rows.append(f"| {i} | {ang} | {bi:.6f} |")
    ref = ANGULAR_REF if method == "angular" else BI_REF
    return (f"Dropped blocks {dropped} of {len(scores.block_influence)} by `{method}` "
            f"({ref}), scored on {scores.samples} samples ({scores.tokens} tokens) of "
            f"`{Path(data).name}`, n = {scores.n}.\n\n" + "\n".join(rows))


@dataclass
class PruneResult:
    scores: LayerScores
    method: str
    dropped: list[int]
    saved: SaveResult


def prune(model_dir: str | Path, n: int, data: str | Path, out: str | Path, *,
          method: str = "angular", max_samples: int | None = None, seed: int = 0,
          batch_size: int = 8, max_length: int = 1024,
          device: str | torch.device | None = "auto", force: bool = False,
          progress: Progress | None = None) -> PruneResult:
    """Drop ``n`` blocks of ``model_dir`` chosen by ``method`` (angular | block_influence) on
    the calibration file ``data``; the scores go into the output's provenance and model card."""
    records = subsample(read_records(data), max_samples, seed)
    model, tokenizer = load_model(model_dir, "perplexity", device)
    scores = score_layers(model, tokenizer, records, n, batch_size, max_length, progress)
    del model
    dropped = scores.drop(method)
    ref = ANGULAR_REF if method == "angular" else BI_REF
    section = score_table(scores, method, dropped, data)
    saved = save(drop_layers(load(model_dir), dropped).node, out, force=force, seed=seed,
                 extra_provenance={"pruning": {"method": method, "reference": ref,
                                               "data": str(data), "dropped": dropped,
                                               **scores.to_json()}},
                 extra_sections={"Block pruning": section})
    return PruneResult(scores, method, dropped, saved)
