"""Tiny real transformers models with a real (locally trained) tokenizer, written to disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WORDS = ("the cat sat on the mat while a dog ran past the red door and two birds sang "
         "one plus one is two three plus four is seven five minus two is three").split()


def corpus(count: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=g))
            for n in torch.randint(6, 14, (count,), generator=g)]


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def tiny_llama(path: Path, seed: int = 0, layers: int = 6, noise: float = 0.0,
               base: Path | None = None) -> Path:
    """A LlamaForCausalLM; with ``base``, a copy of it plus Gaussian ``noise``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer()
    if base is not None:
        model = LlamaForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_llama(path: Path, texts: list[str], steps: int = 40, seed: int = 0) -> Path:
    """A tiny llama fitted for a few Adam steps on ``texts``: a real 'fine-tune'."""
    from transformers import LlamaForCausalLM

    tiny_llama(path, seed=seed)
    tok = tokenizer()
    model = LlamaForCausalLM.from_pretrained(path)
    batch = tok(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.save_pretrained(path)
    return path
