"""Floor 4: the fine-tune step (one loop with named extension points) and the methods that
are a choice of its objective, trainable set or data."""

from surgery.methods.drift import drift_prior
from surgery.train.config import DriftSettings, TrainConfig
from surgery.train.drift import DriftBias
from surgery.train.hooks import GradientMask, GradientTransform, TrainableSet
from surgery.train.loop import TrainEvent, TrainingDiverged, TrainResult, finetune
from surgery.train.objectives import Objective

__all__ = ["DriftBias", "DriftSettings", "GradientMask", "GradientTransform", "Objective",
           "TrainConfig", "TrainEvent", "TrainResult", "TrainableSet", "TrainingDiverged",
           "drift_prior", "finetune"]
