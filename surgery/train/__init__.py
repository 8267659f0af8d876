"""Floor 4: the fine-tune step (one loop with named extension points) and the methods that
are a choice of its objective, trainable set or data."""

from surgery.methods.drift import drift_prior
from surgery.train.config import DriftSettings, TrainConfig
from surgery.train.drift import DriftBias
from surgery.train.graft import GraftConfig, graft, graft_stitch
from surgery.train.hooks import GradientMask, GradientTransform, TrainableSet
from surgery.train.loop import TrainEvent, TrainingDiverged, TrainResult, finetune
from surgery.train.lt_sft import LtSftResult, MaskedAdamW, lt_sft
from surgery.train.objectives import Objective

__all__ = ["DriftBias", "DriftSettings", "GradientMask", "GradientTransform", "GraftConfig",
           "LtSftResult", "MaskedAdamW", "Objective", "TrainConfig", "TrainEvent",
           "TrainResult", "TrainableSet", "TrainingDiverged", "drift_prior", "finetune", "graft",
           "graft_stitch", "lt_sft"]

from surgery.train.adapter import LoraAdapter, load_adapter, merge_adapter
from surgery.train.corda import CordaSettings, corda, write_corda

__all__ += ["CordaSettings", "LoraAdapter", "corda", "load_adapter", "merge_adapter",
            "write_corda"]
