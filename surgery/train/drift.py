"""DRIFT's gradient bias (arXiv 2510.15050) as a gradient transform of the fine-tune step, and
the recipe step ``drift_prior`` that makes its prior (:mod:`surgery.methods.drift`).

Each trainable attention/MLP projection W with prior Δ gets, after backward and before
clipping and AdamW, per tensor (norms ‖·‖ over the whole tensor, in float32):

- ``adaptive_cosine`` (default): g' = g − α·(cos(g, Δ) + 1)/2·‖g‖·Δ/‖Δ‖
- ``gradnorm``: g' = g − α·‖g‖·Δ/‖Δ‖
- ``absolute``: g' = g − α·Δ

so the descent step −g' leans toward θ + Δ, the reasoning model's side. A zero Δ leaves g
as it is (its direction is undefined), as does a zero g under the modes scaled by ‖g‖.

Every trainable projection must have a prior: one without is an error naming it (the
reference code skips it silently), unless the prior's maker allowed it (``allow_missing``,
recorded in the file). A prior tensor for a parameter the model lacks, or of another
shape, is an error too. Frozen projections (a trainable set) are not biased; the run's
record says how many tensors carry the bias.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from surgery.checkpoint.hashing import cache_dir
from surgery.errors import ShapeMismatchError, UsageError
from surgery.expr import Weights
from surgery.methods.drift import DriftPriorParams, PriorFile, drift_prior, is_projection
from surgery.train.hooks import GradientTransform
from surgery.train.model import content_key

DriftMode = Literal["adaptive_cosine", "gradnorm", "absolute"]


def biased_gradient(g: torch.Tensor, delta: torch.Tensor, delta_norm: float, mode: str,
                    alpha: float) -> torch.Tensor:
    """g' of the chosen mode (a new float32 tensor; see the module docstring)."""
    g32 = g.float()
    d32 = delta.to(g32.device, torch.float32)
    if mode == "absolute":
        return g32 - alpha * d32
    if delta_norm == 0.0:
        return g32.clone()
    g_norm = float(torch.linalg.vector_norm(g32))
    if g_norm == 0.0:
        return g32.clone()
    scale = alpha * g_norm / delta_norm
    if mode == "adaptive_cosine":
        cos = float(torch.dot(g32.flatten(), d32.flatten())) / (g_norm * delta_norm)
        scale *= (cos + 1.0) / 2.0
    elif mode != "gradnorm":
        raise UsageError(f"drift: unknown mode {mode!r}")
    return g32 - scale * d32


def check_prior(label: str, prior: Mapping[str, tuple[int, ...]], allowed: list[str],
                shapes: Mapping[str, tuple[int, ...]], trainable: set[str]
                ) -> tuple[list[str], int]:
    """The parameter names a prior biases (in model order) and how many prior tensors fall on
    frozen parameters, from shapes alone (the plan checks a recipe with this); errors when
    the prior does not fit the model or a trainable projection has none."""
    unknown = sorted(set(prior) - set(shapes))
    if unknown:
        raise UsageError(f"drift: {label} holds {len(unknown)} tensor(s) the model lacks, "
                         f"e.g. {unknown[0]!r} (a prior of another model?)")
    for name, shape in prior.items():
        if tuple(shape) != tuple(shapes[name]):
            raise ShapeMismatchError(f"drift: {label}: {name!r} has shape {list(shape)}, "
                                     f"the model's {list(shapes[name])}")
    lacking = [n for n in shapes if n in trainable and is_projection(n, shapes[n])
               and n not in prior and n not in set(allowed)]
    if lacking:
        shown = ", ".join(lacking[:5]) + (", ..." if len(lacking) > 5 else "")
        raise UsageError(f"drift: {len(lacking)} trainable projection(s) have no prior in "
                         f"{label}: {shown}")
    names = [n for n in shapes if n in trainable and n in prior]
    if not names:
        raise UsageError(f"drift: no trainable parameter has a prior in {label}")
    return names, sum(1 for n in prior if n not in trainable)


class DriftBias(GradientTransform):
    """Biases each trainable projection's gradient toward its prior (one prior tensor per
    biased parameter stays on the training device, in the prior's dtype)."""

    name = "drift"

    def __init__(self, prior: str | Path, mode: DriftMode = "adaptive_cosine",
                 alpha: float = 1.0) -> None:
        self.prior = PriorFile(prior)
        self.mode = mode
        self.alpha = float(alpha)
        self._delta: dict[str, torch.Tensor] = {}
        self._norm: dict[str, float] = {}
        self.frozen_with_prior = 0

    def check(self, shapes: Mapping[str, tuple[int, ...]], trainable: set[str]) -> list[str]:
        names, self.frozen_with_prior = check_prior(
            str(self.prior.path), self.prior.shapes, self.prior.missing, shapes, trainable)
        return names

    def bind(self, model: torch.nn.Module) -> None:
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def attach(self, params: Mapping[str, torch.nn.Parameter]) -> list[str]:
        shapes = getattr(self, "_shapes", None) or {n: tuple(p.shape) for n, p in params.items()}
        names = self.check(shapes, set(params))
        for name in names:
            delta = self.prior.tensor(name).to(params[name].device)
            self._delta[name] = delta
            self._norm[name] = float(torch.linalg.vector_norm(delta.float()))
        return names

    def __call__(self, name: str, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        grad.copy_(biased_gradient(grad, self._delta[name], self._norm[name], self.mode,
                                   self.alpha))

    def params(self) -> dict[str, object]:
        return {"prior": self.prior.path.name, "mode": self.mode, "alpha": self.alpha,
                "prior_tensors": len(self.prior.shapes),
                "allowed_missing": len(self.prior.missing),
                "frozen_with_prior": self.frozen_with_prior}


class DriftPriorStep:
    """The file an ``op: drift_prior`` step makes, on first use, into the cache (keyed by
    both inputs' bytes and the parameters); ``out:`` also writes it there."""

    kind = "prior"

    def __init__(self, reasoning: Weights, target: Weights, params: DriftPriorParams) -> None:
        from surgery.methods.drift import PriorNode

        self.reasoning, self.target, self.params = reasoning, target, params
        self.node = PriorNode(reasoning.node, target.node, params.map, params.allow_missing)
        self.shapes = {n: self.node.spec(n).shape for n in self.node.names()}
        self._key: str | None = None
        self._path: Path | None = None
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = content_key(self.node, self.params.model_dump(exclude={"out"}))
        return self._key

    @property
    def path(self) -> Path:
        with self._lock:
            if self._path is None:
                target = cache_dir() / "drift" / f"prior-{self.key}.safetensors"
                p = self.params
                if not target.is_file():
                    drift_prior(self.reasoning, self.target, target, dtype=p.dtype, map=p.map,
                                allow_missing=p.allow_missing)
                if p.out is not None:
                    import shutil

                    out = Path(p.out)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    tmp = out.with_name(out.name + ".partial")
                    shutil.copyfile(target, tmp)
                    tmp.replace(out)
                self._path = target
            return self._path
