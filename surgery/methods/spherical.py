"""SLERP: spherical linear interpolation between two models."""

from __future__ import annotations

import torch
from pydantic import Field

from surgery.expr import ElementwiseNode, EvalContext, Weights
from surgery.methods.schedule import Depth, Schedule, Scheduled, in_closed_unit_interval
from surgery.methods.soup import Params

SLERP_REF = "Shoemake, Animating rotation with quaternion curves (SIGGRAPH 1985)"

def slerp_tensors(a: torch.Tensor, b: torch.Tensor, t: float, epsilon: float = 1e-6
                  ) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1).

    With u = a/‖a‖, v = b/‖b‖, cos Ω = u·v: result = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,
    and (1−t)·a + t·b where |cos Ω| > 1 − ``epsilon`` (nearly colinear). The tensors are
    flattened to one vector each. Norms below 1e-8 count as 1, and the steps are those of
    mergekit's ``slerp``, so results agree with it bit for bit at the same threshold.
    """
    if a.numel() == 0:
        return a.clone()
    x = a.reshape(1, -1)
    y = b.reshape(1, -1)
    norm_x = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    norm_y = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    norm_x = torch.where(norm_x > 1e-8, norm_x, 1)
    norm_y = torch.where(norm_y > 1e-8, norm_y, 1)
    cos = ((x / norm_x) * (y / norm_y)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = cos.abs() > 1 - epsilon
    tt = torch.tensor(t, dtype=x.dtype, device=x.device)
    omega = torch.acos(torch.where(linear, 0, cos))
    sin_omega = torch.sin(omega)
    coef_x = torch.where(linear, 1 - tt, torch.sin((1 - tt) * omega) / sin_omega)
    coef_y = torch.where(linear, tt, torch.sin(tt * omega) / sin_omega)
    return (coef_x * x + coef_y * y).reshape(a.shape)


def slerp(a: Weights, b: Weights, t: Scheduled, epsilon: float = 1e-6,
          layer_pattern: str | None = None) -> Weights:
    """SLERP between two models, per tensor (spherical interpolation of the flattened tensors,
    linear fallback when |cos| > 1 − 1e-6). ``t`` in [0, 1] may be a schedule (a depth gradient
    or name/kind rules, :mod:`surgery.methods.schedule`); t = 0 gives ``a``, t = 1 gives ``b``.
    mergekit's ``slerp`` falls back to linear at |cos| > 0.9995, i.e. ``epsilon=5e-4``.
    """
    depth = Depth.of(a.node, layer_pattern)
    ts = Schedule("slerp: t", t, a.node, depth, check=in_closed_unit_interval)

    def fn(name: str, tensors: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        return slerp_tensors(tensors[0], tensors[1], ts(name), epsilon)

    return Weights(ElementwiseNode(
        [a.node, b.node], fn, "slerp",
        {"t": ts.describe(), "epsilon": epsilon}, SLERP_REF))


class SlerpParams(Params):
    a: str = Field(description="the model at t = 0 (mergekit's base_model)")
    b: str = Field(description="the model at t = 1")
    t: Scheduled = Field(description="interpolation factor in [0, 1]")
    epsilon: float = Field(1e-6, gt=0, lt=1, description="linear when |cos| > 1 - epsilon")
    layer_pattern: str | None = Field(None, description="regex capturing the block index")
