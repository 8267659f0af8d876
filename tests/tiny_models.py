"""Tiny transformers checkpoints of the three fixture families, built in the test's tmp dir:
a base and fine-tunes that are the base plus seeded noise (real save_pretrained output)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)


def _llama() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _gpt2() -> PreTrainedModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4,
                                      n_positions=64))


def _bert() -> PreTrainedModel:
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=64, num_labels=3))


FAMILIES = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def make_family(root: Path, family: str, tasks: int = 2, scale: float = 0.02) -> list[Path]:
    """Write base/ and task1/..taskN/ under ``root``; returns [base, task1, ...]."""
    torch.manual_seed(0)
    model = FAMILIES[family]()
    paths = [root / "base"]
    model.save_pretrained(paths[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(1, tasks + 1):
        g = torch.Generator().manual_seed(i)
        tuned = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point()
                 else v for k, v in state.items()}
        model.load_state_dict(tuned)
        paths.append(root / f"task{i}")
        model.save_pretrained(paths[-1])
    return paths
