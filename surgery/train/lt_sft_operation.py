"""The recipe step ``op: lt_sft``: LT-SFT of a base on a JSONL file (both phases cached by
content, as finetune steps are), yielding θ0 + φ; with ``delta: PATH`` the sparse delta φ is
also written to PATH. Planning checks everything LT-SFT checks before training (density, the
phase-1 model's architecture and shapes, the settings, the data) and reads no weights."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from surgery.checkpoint.hashing import cache_dir
from surgery.errors import UsageError
from surgery.expr import EvalContext, Node, TensorSpec, Weights
from surgery.methods.registry import Operation, Resolve
from surgery.methods.sparse import (
    DEFAULT_DENSITY,
    DEFAULT_MASKABLE,
    SparseApplyNode,
    SparseDelta,
    SparseDeltaFile,
)
from surgery.train.config import TrainConfig
from surgery.train.lt_sft import LT_SFT_REF, LtSftResult, lt_sft_key, plan_lt_sft, run_lt_sft
from surgery.train.operations import FinetuneNode

LT_SFT_KEYS = {"base", "data", "density", "phase1", "l1", "maskable", "delta"}


class LtSftParams(TrainConfig):
    base: str
    data: str = Field(description="JSONL file (prompt+completion or text)")
    density: float = Field(DEFAULT_DENSITY, description="fraction K/N of maskable entries")
    phase1: str | None = Field(None, description="an existing fine-tune of base (no phase 1)")
    l1: float = Field(0.0, description="strength of the L1 pull toward the base in phase 2")
    maskable: list[str] = Field(default_factory=lambda: list(DEFAULT_MASKABLE))
    delta: str | None = Field(None, description="also write the sparse delta to this file")


class LtSftNode(FinetuneNode):
    """θ0 + φ of an LT-SFT run, trained (or found in the cache) on first use."""

    op = "lt_sft"
    reference = LT_SFT_REF

    def __init__(self, base: Weights, phase1: Weights | None, params: LtSftParams) -> None:
        settings = params.model_dump(include=params.model_fields_set - LT_SFT_KEYS)
        self.lt_plan = plan_lt_sft(base, params.data, density=params.density, phase1=phase1,
                                   l1=params.l1, maskable=params.maskable, **settings)
        super().__init__(base, params.data, self.lt_plan.config)
        self.base = base
        self.inputs = (base.node,) if phase1 is None else (base.node, phase1.node)
        self.delta_path = params.delta
        self._result: LtSftResult | None = None
        self._apply: SparseApplyNode | None = None
        self._lt_lock = threading.Lock()

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = lt_sft_key(self.lt_plan)
        return self._key

    @property
    def folder(self) -> Path:
        return cache_dir() / "lt_sft" / self.key

    @property
    def result(self) -> LtSftResult:
        with self._lt_lock:
            if self._result is None:
                result = run_lt_sft(self.lt_plan, out=self.folder / "delta.safetensors",
                                    progress=self.on_event, folder=self.folder)
                if self.delta_path:
                    _copy_delta(self.folder / "delta.safetensors", Path(self.delta_path))
                self._apply = SparseApplyNode(self.base.node, [result.delta], 1.0, "lt_sft")
                self._result = result
            return self._result

    @property
    def delta(self) -> SparseDelta:
        return self.result.delta

    def params(self) -> dict[str, Any]:
        p = self.lt_plan
        return {"settings": p.config.model_dump(mode="json", exclude_unset=True),
                "data": Path(p.data).name, "density": p.density, "k": p.k, "l1": p.l1,
                "maskable": p.maskable, "phase1": None if p.phase1 is None else "given",
                "delta": self.delta_path, "cache_key": self.key}

    def card_sections(self) -> dict[str, str]:
        t = self.delta.training or {}
        p1, p2 = t.get("phase1", {}), t.get("phase2", {})
        lines = [f"LT-SFT (composable sparse fine-tuning, arXiv 2110.07560) of "
                 f"`{t['base']['path']}` on `{t['data']['path']}` (sha256 "
                 f"`{t['data']['sha256'][:16]}...`): K = {t['k']:,} of "
                 f"{t['maskable_params']:,} maskable entries (density {t['density']:g}).", "",
                 "- phase 1: " + (f"{p1['steps']} updates of a full fine-tune, loss "
                                  f"{p1['loss_first']:.4f} to {p1['loss_last']:.4f}"
                                  if p1.get("model") == "trained" else
                                  f"the given fine-tune `{p1.get('model')}`"),
                 f"- phase 2: {p2['steps']} updates on the mask from θ0, loss "
                 f"{p2['loss_first']:.4f} to {p2['loss_last']:.4f}, L1 λ {p2['l1']:g}"]
        if self.delta_path:
            lines.append(f"- the delta: `{self.delta_path}`")
        return {"LT-SFT": "\n".join(lines)}

    def provenance_records(self) -> dict[str, Any]:
        return {"lt_sft": {**(self.delta.training or {}), "cache": str(self.folder),
                           "delta": self.delta_path}}

    def config(self) -> dict:
        return self.base.node.config()

    def _list_names(self) -> list[str]:
        return self.base.node.names()

    def spec(self, name: str) -> TensorSpec:
        return self.base.node.spec(name)

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        return [(self.inputs[0], name)]

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        self.result  # noqa: B018  (trains first if needed)
        assert self._apply is not None
        return self._apply.compute(name, ctx)


def _copy_delta(source: Path, target: Path) -> None:
    """Write the delta to ``target``, replacing only a file that is itself a sparse delta."""
    if target.is_dir():
        raise UsageError(f"delta: {target} is a directory; give a .safetensors file path")
    if target.exists():
        try:
            SparseDeltaFile(target)
        except UsageError:
            raise UsageError(f"delta: {target} exists and is not a sparse delta; not "
                             "replacing it") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


def _build_lt_sft(p: LtSftParams, get: Resolve) -> Weights:
    return Weights(LtSftNode(get(p.base), get(p.phase1) if p.phase1 else None, p))


LT_SFT_OPERATIONS: dict[str, Operation] = {
    "lt_sft": Operation("lt_sft", "LT-SFT: full fine-tune, keep the K most changed entries, "
                        "retrain only them from the base; yields base + sparse delta",
                        LT_SFT_REF, LtSftParams, ("base", "phase1"), _build_lt_sft),
}
