"""Recipe steps of adapters: ``op: corda`` (the residual model, its adapter written beside)
and ``op: merge_adapter`` (a PEFT LoRA adapter merged into a model).

``op: corda`` works at write time, like ``op: finetune``: the calibration and decomposition
run once into a content-addressed folder of the cache (the key hashes the input's bytes, the
expression, the settings and the calibration data), the adapter is copied to ``adapter_out``,
and the step's tensors (the residual) stream from that folder.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from surgery.checkpoint import Checkpoint, open_checkpoint
from surgery.checkpoint.hashing import cache_dir
from surgery.errors import UsageError
from surgery.expr import EvalContext, Node, TensorSpec, Weights
from surgery.methods.registry import Operation, Resolve
from surgery.methods.soup import Params
from surgery.train.adapter import LORA_REF, merge_adapter, meta_model, weights_label
from surgery.train.corda import (
    CORDA_REF,
    CordaSettings,
    check_ranks,
    select_layers,
    write_corda,
)
from surgery.train.data import file_sha256
from surgery.train.model import content_key


class CordaParams(CordaSettings):
    model: str
    adapter_out: str = Field(description="directory the PEFT adapter is written to")


class MergeAdapterParams(Params):
    model: str
    adapter: str = Field(description="PEFT LoRA adapter directory (or a surgery corda output)")


class CordaNode(Node):
    """The residual W − s·B A of ``op: corda``, decomposed (or found in the cache) on first
    use; its names and shapes are the input's, so planning reads no weights."""

    op = "corda"
    reference = CORDA_REF

    def __init__(self, source: Weights, settings: CordaSettings, adapter_out: str) -> None:
        super().__init__()
        self.source = source
        self.inputs = (source.node,)
        self.settings = settings
        self.adapter_out = Path(adapter_out)
        if not Path(settings.data).is_file():
            raise UsageError(f"{settings.data}: no such calibration file")
        self._check_targets()
        self._key: str | None = None
        self._checkpoint: Checkpoint | None = None
        self._lock = threading.Lock()

    def _check_targets(self) -> None:
        """Targets and rank against the model built on the meta device (no weights read)."""
        meta = meta_model(self.source.node.config(), weights_label(self.source))
        check_ranks(select_layers(meta, self.settings.targets), self.settings.rank)

    @property
    def key(self) -> str:
        if self._key is None:
            extra: list[Any] = [self.settings.model_dump(mode="json", exclude={"device"}),
                                file_sha256(self.settings.data)]
            self._key = content_key(self.source.node, extra)
        return self._key

    @property
    def folder(self) -> Path:
        return cache_dir() / "corda" / self.key

    @property
    def checkpoint(self) -> Checkpoint:
        with self._lock:
            if self._checkpoint is None:
                if not (self.folder / "residual" / "config.json").is_file():
                    write_corda(self.source, self.folder, self.settings, force=True)
                target = self.adapter_out
                if target.exists():
                    shutil.rmtree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(self.folder / "adapter", target)
                self._checkpoint = open_checkpoint(str(self.folder / "residual"))
            return self._checkpoint

    def params(self) -> dict[str, Any]:
        s = self.settings
        return {"rank": s.rank, "mode": s.mode, "data": Path(s.data).name,
                "adapter_out": str(self.adapter_out), "cache_key": self.key}

    def provenance_records(self) -> dict[str, Any]:
        self.checkpoint  # noqa: B018  (decomposes first if needed)
        return {"corda": json.loads((self.folder / "corda.json").read_text())}

    def _list_names(self) -> list[str]:
        return self.inputs[0].names()

    def spec(self, name: str) -> TensorSpec:
        return self.inputs[0].spec(name)

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        return []  # read from the residual checkpoint in compute, not from the input

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        return ctx.read(self.checkpoint, name)


def _build_corda(p: CordaParams, get: Resolve) -> Weights:
    settings = CordaSettings.model_validate(p.model_dump(exclude={"model", "adapter_out"},
                                                         exclude_unset=True))
    return Weights(CordaNode(get(p.model), settings, p.adapter_out))


def _build_merge_adapter(p: MergeAdapterParams, get: Resolve) -> Weights:
    return merge_adapter(get(p.model), p.adapter)


ADAPTER_OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("corda", "CorDA: the residual of a context-oriented decomposition; its "
                  "LoRA adapter goes to adapter_out", CORDA_REF, CordaParams, ("model",),
                  _build_corda),
        Operation("merge_adapter", "Merge a PEFT LoRA adapter into a model, W + (alpha/r)·BA",
                  LORA_REF, MergeAdapterParams, ("model",), _build_merge_adapter),
    )
}
