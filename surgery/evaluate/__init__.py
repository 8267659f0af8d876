"""Forward passes over transformers models: metrics, candidate scoring, layer scores."""

from surgery.evaluate.layers import LayerScores, find_blocks, score_layers
from surgery.evaluate.metrics import (
    METRICS,
    EvalResult,
    evaluate,
    evaluate_model,
    load_model,
)
from surgery.evaluate.scoring import CheckpointScorer

__all__ = ["METRICS", "CheckpointScorer", "EvalResult", "LayerScores", "evaluate",
           "evaluate_model", "find_blocks", "load_model", "score_layers"]
