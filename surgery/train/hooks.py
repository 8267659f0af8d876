"""The extension points of the fine-tune step that are not objectives: which parameters
train (a *trainable set*) and what happens to their gradients between backward and the
optimiser step (*gradient transforms*). Each is checked when the run starts to attach to at
least one parameter; one that attaches to nothing is an error naming it, never skipped."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from surgery.errors import UsageError
from surgery.methods.hft import hft_selection, module_of
from surgery.methods.schedule import NameMatcher


class TrainableSet:
    """Parameters that train, by rules of :mod:`surgery.names`: exact tensor names, kinds
    (``attention``, ``mlp``, ``norm``, ``embedding``, ``head``, ``bias``, ``other``), globs
    (``*q_proj*``) or ``re:<regex>``; or ``hft``: every parameter except the modules that
    :func:`surgery.methods.hft.hft_selection` resets (arXiv 2404.18466), so HFT training moves
    exactly what the post-hoc half-reset keeps. ``None`` trains everything."""

    def __init__(self, rules: str | Sequence[str] | None = None, hft_seed: int = 0) -> None:
        self.hft = rules == "hft"
        self.rules = [] if rules is None or self.hft else \
            ([rules] if isinstance(rules, str) else list(rules))
        self.hft_seed = hft_seed

    def describe(self) -> str | list[str]:
        return f"hft (seed {self.hft_seed})" if self.hft else (self.rules or "all")

    def select(self, names: Sequence[str]) -> list[str]:
        """The names of ``names`` that train, in order; errors if a rule matches nothing."""
        if self.hft:
            frozen = {m for mods in hft_selection(list(names), self.hft_seed).values()
                      for m in mods}
            if not frozen:
                raise UsageError("trainable: hft found no attention, MLP or norm modules in "
                                 "blocks to freeze")
            return [n for n in names if module_of(n) not in frozen]
        if not self.rules:
            return list(names)
        name_set = set(names)
        chosen: set[str] = set()
        for rule in self.rules:
            test = NameMatcher("trainable", rule, name_set).test
            hits = {n for n in names if test(n)}
            if not hits:
                raise UsageError(f"trainable: {rule!r} matches no parameter of the model")
            chosen |= hits
        return [n for n in names if n in chosen]


class GradientTransform(ABC):
    """Changes a parameter's gradient in place after backward, before clipping and the
    optimiser step (an LT-SFT mask, DRIFT's bias)."""

    name: str = "gradient transform"

    def bind(self, model: torch.nn.Module) -> None:  # noqa: B027  (optional)
        """Sees the whole model (frozen parameters too) before :meth:`attach`."""

    @abstractmethod
    def attach(self, params: Mapping[str, torch.nn.Parameter]) -> list[str]:
        """The names among the trainable ``params`` this transform acts on (set up here);
        the loop fails when there are none."""

    @abstractmethod
    def __call__(self, name: str, param: torch.nn.Parameter, grad: torch.Tensor) -> None: ...

    def params(self) -> dict[str, object]:
        return {}


class GradientMask(GradientTransform):
    """g ← g ⊙ m: only the entries a boolean mask holds move (phase 2 of LT-SFT, composable
    sparse fine-tuning, arXiv 2110.07560). With AdamW's decay off, an entry whose gradient is
    always zero never moves: its moments stay zero and so does its update."""

    name = "gradient mask"

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = dict(masks)
        self._device: dict[str, torch.Tensor] = {}

    def attach(self, params: Mapping[str, torch.nn.Parameter]) -> list[str]:
        unknown = sorted(set(self.masks) - set(params))
        if unknown:
            raise UsageError(f"gradient mask: {len(unknown)} mask(s) name no trainable "
                             f"parameter, e.g. {unknown[0]!r}")
        for name, mask in self.masks.items():
            if tuple(mask.shape) != tuple(params[name].shape):
                raise UsageError(f"gradient mask: mask of {name!r} has shape "
                                 f"{list(mask.shape)}, the parameter {list(params[name].shape)}")
            self._device[name] = mask.to(params[name].device, torch.bool)
        return sorted(self.masks)

    def __call__(self, name: str, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        mask = self._device[name]
        if mask.device != grad.device:  # attached on the CPU, before the model moved
            mask = self._device[name] = mask.to(grad.device)
        grad.mul_(mask)

    def params(self) -> dict[str, object]:
        return {"masked_tensors": len(self.masks),
                "entries": int(sum(int(m.sum()) for m in self.masks.values()))}
