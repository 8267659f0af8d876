"""Floor 4: the fine-tune step (one loop with named extension points) and the methods that
are a choice of its objective, trainable set or data."""

from surgery.train.config import TrainConfig
from surgery.train.hooks import GradientMask, GradientTransform, TrainableSet
from surgery.train.loop import TrainEvent, TrainingDiverged, TrainResult, finetune
from surgery.train.lt_sft import LtSftResult, MaskedAdamW, lt_sft
from surgery.train.objectives import Objective

__all__ = ["GradientMask", "GradientTransform", "Objective", "TrainConfig", "TrainEvent",
           "TrainResult", "TrainableSet", "TrainingDiverged", "finetune"]
__all__ += ["LtSftResult", "MaskedAdamW", "lt_sft"]
