"""Scoring lazy candidate models (greedy-soup candidates, coefficient grids) on held-out data.

Each candidate is materialised by the streaming engine into one temporary directory, loaded
with transformers, scored and deleted before the next: memory holds one model at a time (plus
the engine's few tensors), disk one candidate at a time. Building in-memory state dicts from the
graph instead would hold the same model plus a second copy during loading.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from surgery.data import Record, read_records, subsample
from surgery.engine import save
from surgery.errors import UsageError
from surgery.evaluate.metrics import METRICS, EvalResult, Progress, evaluate_model, load_model
from surgery.expr import Weights


class CheckpointScorer:
    """Callable ``Weights -> float`` on fixed held-out records; keeps every result."""

    def __init__(self, data: str | Path, metric: str, *, max_samples: int | None = None,
                 seed: int = 0, batch_size: int = 8, max_length: int = 1024,
                 device: str | torch.device | None = "auto", work_dir: str | Path | None = None,
                 progress: Progress | None = None) -> None:
        if metric not in METRICS:
            raise UsageError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
        self.records: list[Record] = subsample(read_records(data), max_samples, seed)
        self.metric = metric
        self.higher_is_better = METRICS[metric]
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.work_dir = work_dir
        self.progress = progress
        self.results: list[EvalResult] = []

    def evaluate(self, weights: Weights) -> EvalResult:
        tmp = Path(tempfile.mkdtemp(prefix="surgery-candidate-", dir=self.work_dir))
        try:
            out = tmp / "model"
            save(weights.node, out, device="cpu", hash_inputs=False)
            model, tokenizer = load_model(out, self.metric, self.device)
            result = evaluate_model(model, tokenizer, self.records, self.metric,
                                    self.batch_size, self.max_length, self.progress)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.results.append(result)
        return result

    def __call__(self, weights: Weights) -> float:
        return self.evaluate(weights).value
