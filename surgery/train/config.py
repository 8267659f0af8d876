"""The settings of one fine-tune run: one pydantic model shared by the Python API
(``finetune(**settings)``), the recipe step ``op: finetune`` and ``surgery train``, so each
front door checks the same names, types and bounds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from surgery.methods.soup import Params
from surgery.train.corda import AdapterSpec

ObjectiveName = Literal["sft", "dft", "asft", "masked_thought", "sorted"]

# Options that belong to one objective: setting one for another objective is an error.
OBJECTIVE_OPTIONS = {"asft_lambda": "asft", "asft_kl": "asft", "mask_prob": "masked_thought",
                     "mask_token": "masked_thought", "exit_every": "sorted"}


class DriftSettings(Params):
    """``drift:`` of a fine-tune (arXiv 2510.15050): the prior file or ``drift_prior`` step,
    the mode of the bias and its strength α (:mod:`surgery.train.drift`)."""

    prior: str = Field(description="prior file (.safetensors) or a drift_prior step")
    mode: Literal["adaptive_cosine", "gradnorm", "absolute"] = "adaptive_cosine"
    alpha: float = Field(1.0, ge=0, description="strength of the bias")


class TrainConfig(Params):
    """Hyperparameters of the fine-tune step. ``steps`` counts optimiser updates; each takes
    ``batch_size * grad_accum`` examples. ``epochs`` instead gives as many updates as pass
    over the data that many times (the last update may be short of examples)."""

    steps: int | None = Field(None, ge=1, description="optimiser updates")
    epochs: float | None = Field(None, gt=0, description="passes over the data (or steps)")
    lr: float = Field(2e-5, gt=0, description="peak learning rate (AdamW)")
    batch_size: int = Field(8, ge=1, description="examples per forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimiser update")
    max_length: int = Field(512, ge=2, description="tokens per example; longer are truncated")
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup: int = Field(0, ge=0, description="updates of linear warm-up from 0")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay (not on norms and biases)")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    clip: float | None = Field(1.0, gt=0, description="max gradient norm (None: no clipping)")
    seed: int = Field(0, description="default: the recipe seed")
    device: str = "auto"
    objective: ObjectiveName = "sft"
    asft_lambda: float = Field(0.05, ge=0, description="asft: weight of the KL anchor")
    asft_kl: Literal["reference_to_model", "model_to_reference"] = Field(
        "reference_to_model", description="asft: KL(Q||P) as the reference code, or KL(P||Q)")
    mask_prob: float = Field(0.2, ge=0, lt=1, description="masked_thought: mask probability")
    mask_token: str | None = Field(None, description="masked_thought: token (default unk/pad)")
    exit_every: int | None = Field(None, ge=1, description="sorted: k of exits k, 2k, .., L")
    trainable: str | list[str] | None = Field(
        None, description="hft, or names/kinds/globs/re: patterns (default: every parameter)")
    hft_seed: int | None = Field(None, description="seed of the HFT selection (default: seed)")
    adapter: str | AdapterSpec | None = Field(
        None, description="train only a LoRA adapter's A and B: a PEFT adapter directory "
        "(on this model) or {corda: {data, rank, mode, ...}}; the result is the merged model")
    chat: bool = Field(False, description="wrap prompt+completion in the chat template")
    add_eos: bool = Field(True, description="end completions and texts with the EOS token")
    eval_data: str | None = Field(None, description="JSONL scored every eval_every updates")
    eval_every: int | None = Field(None, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="save resumable state")
    gradient_checkpointing: bool = False
    drift: DriftSettings | None = Field(None, description="DRIFT bias: {prior, mode, alpha}")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        for option, objective in OBJECTIVE_OPTIONS.items():
            if option in self.model_fields_set and self.objective != objective:
                raise ValueError(f"{option} applies to objective {objective}, not "
                                 f"{self.objective}")
        if self.adapter is not None and self.trainable is not None:
            raise ValueError("adapter trains its A and B only; drop trainable")
        if self.eval_every is not None and self.eval_data is None:
            raise ValueError("eval_every needs eval_data")
        if self.hft_seed is not None and self.trainable != "hft":
            raise ValueError("hft_seed applies to trainable: hft")
        return self

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum
