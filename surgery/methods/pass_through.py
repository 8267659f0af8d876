"""Passthrough: one model's tensors, each optionally scaled (mergekit's ``passthrough`` method;
its slices of layers are ``stack_layers``)."""

from __future__ import annotations

import torch
from pydantic import Field

from surgery.expr import ElementwiseNode, EvalContext, Weights
from surgery.methods.schedule import Depth, Schedule, Scheduled
from surgery.methods.soup import Params

PASSTHROUGH_REF = "mergekit's passthrough"


def passthrough(model: Weights, scale: Scheduled = 1.0,
                layer_pattern: str | None = None) -> Weights:
    """θ = s·θ_model per tensor, s = ``scale`` (a number, a depth gradient or rules by tensor
    kind or name, as mergekit's per-tensor ``scale`` filters; 1 leaves a tensor as it is).
    Agrees with mergekit's ``passthrough`` of one model bit for bit."""
    depth = Depth.of(model.node, layer_pattern)
    scales = Schedule("passthrough: scale", scale, model.node, depth)

    def fn(name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        s = scales(name)
        return ts[0] if s == 1.0 else ts[0] * s

    return Weights(ElementwiseNode([model.node], fn, "passthrough",
                                   {"scale": scales.describe()}, PASSTHROUGH_REF, rowwise=True))


class PassthroughParams(Params):
    model: str
    scale: Scheduled = Field(1.0, description="factor per tensor (rules by kind or name)")
    layer_pattern: str | None = Field(None, description="regex capturing the block index")
