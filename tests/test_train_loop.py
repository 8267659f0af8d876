"""The fine-tune step against a plain PyTorch loop, and its trainable sets, gradient
transforms, accumulation, schedules and HFT training, on the committed tiny fixtures."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery import hft_reset, hft_selection, load
from surgery.methods.hft import module_of
from surgery.train import GradientMask, GradientTransform, TrainConfig, finetune
from surgery.train.data import epoch_order
from surgery.train.loop import Trainer, _Interrupt, lr_at
from surgery.train.model import resolve_source
from surgery.train.state import Progress
from tests.conftest import FIXTURES

BASE = FIXTURES / "tiny-llama" / "base"
MATH = FIXTURES / "data" / "math.jsonl"


class Grab(GradientTransform):
    """Keeps a copy of every gradient it sees (of the last update)."""

    name = "grab"

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def attach(self, params: dict[str, torch.nn.Parameter]) -> list[str]:
        return list(params)

    def __call__(self, name: str, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        self.grads[name] = grad.clone()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _plain_batch(tok, rows: list[dict], order: list[int]) -> dict[str, torch.Tensor]:
    seqs, labels = [], []
    for i in order:
        prompt = tok(rows[i]["prompt"])["input_ids"]
        completion = tok(rows[i]["completion"], add_special_tokens=False)["input_ids"] + \
            [tok.eos_token_id]
        seqs.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(map(len, seqs))
    return {"input_ids": torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s))
                                            for s in seqs]),
            "labels": torch.tensor([la + [-100] * (width - len(la)) for la in labels])}


def plain_backward(lr: float, examples: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The tiny Llama and a plain AdamW after backward of the SFT loss on the first
    ``examples`` of the first epoch's order, as the fine-tune step's first update sees them."""
    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).train()
    rows = [json.loads(line) for line in MATH.read_text().splitlines()]
    batch = _plain_batch(tok, rows, epoch_order(len(rows), 0, 0)[:examples])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    return model, opt


def test_one_update_equals_a_plain_pytorch_loop_bit_for_bit(tmp_path: Path) -> None:
    grab = Grab()
    finetune(BASE, MATH, out=tmp_path / "ours", steps=1, lr=1e-3, batch_size=4, hooks=[grab])
    ours = _weights(tmp_path / "ours")

    model, opt = plain_backward(lr=1e-3, examples=4)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grab.grads[name]), name
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ours[name]), name


def test_loss_falls_and_the_same_run_gives_the_same_bytes(tmp_path: Path) -> None:
    losses: list[float] = []
    a = finetune(BASE, MATH, out=tmp_path / "a", steps=30, lr=3e-3, batch_size=8,
                 progress=lambda e: losses.append(e.loss))
    assert a.steps == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    finetune(BASE, MATH, out=tmp_path / "b", steps=30, lr=3e-3, batch_size=8)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()
    training = json.loads((tmp_path / "a" / "provenance.json").read_text())["training"]
    assert training["data"]["sha256"] == hashlib.sha256(MATH.read_bytes()).hexdigest()
    assert training["loss_first"] == losses[0] and training["loss_last"] == losses[-1]
    assert training["settings"]["lr"] == 3e-3 and training["steps"] == 30
    card = (tmp_path / "a" / "README.md").read_text()
    assert "## Fine-tuning" in card and "for 30 updates" in card


def test_prompt_positions_get_no_gradient(tmp_path: Path) -> None:
    """The gradient reaching the logits is exactly zero at every prompt (and pad) position
    and non-zero at completion positions."""
    config = TrainConfig(steps=1, batch_size=4, lr=1e-3)
    trainer = Trainer(resolve_source(BASE), MATH, config)
    seen: list[torch.Tensor] = []

    def keep_logit_grads(_m: object, _i: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: seen.append(g.clone()))

    trainer.model.lm_head.register_forward_hook(keep_logit_grads)
    trainer.run(Progress(), None, None, _Interrupt())
    grad = seen[0].abs().sum(-1)  # batch x positions
    batch_rows = epoch_order(len(trainer.data.examples), 0, 0)[:4]
    for row, i in enumerate(batch_rows):
        ex = trainer.data.examples[i]
        # Position j predicts token j + 1: it is scored when token j + 1 is a completion token.
        scored = [j for j in range(len(ex.labels) - 1) if ex.labels[j + 1] != -100]
        assert scored and all(grad[row, j] > 0 for j in scored)
        others = [j for j in range(grad.shape[1]) if j not in scored]
        assert all(grad[row, j] == 0 for j in others), (row, others)


def test_gradient_accumulation_equals_one_large_batch(tmp_path: Path) -> None:
    big, small = Grab(), Grab()
    finetune(BASE, MATH, out=tmp_path / "big", steps=1, batch_size=8, lr=1e-3, hooks=[big])
    finetune(BASE, MATH, out=tmp_path / "acc", steps=1, batch_size=4, grad_accum=2, lr=1e-3,
             hooks=[small])
    for name, g in big.grads.items():
        torch.testing.assert_close(small.grads[name], g, rtol=1e-5, atol=1e-7)


def test_trainable_patterns_freeze_the_rest_bit_for_bit(tmp_path: Path) -> None:
    res = finetune(BASE, MATH, out=tmp_path / "o", steps=3, lr=1e-2, batch_size=4,
                   trainable=["mlp", "*q_proj*"])
    before, after = _weights(BASE), _weights(tmp_path / "o")
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("mlp" in n or "q_proj" in n for n in moved)
    assert all(any(k in n for k in ("up_proj", "down_proj", "gate_proj", "q_proj"))
               for n in moved)
    assert res.frozen_params > 0
    assert res.trainable_params == sum(before[n].numel() for n in before
                                       if "mlp" in n or "q_proj" in n)


def test_hft_training_moves_exactly_the_complement_of_the_selection(tmp_path: Path) -> None:
    finetune(BASE, MATH, out=tmp_path / "hft", steps=3, lr=1e-2, batch_size=8,
             trainable="hft", seed=3)
    before, after = _weights(BASE), _weights(tmp_path / "hft")
    frozen = {m for mods in hft_selection(list(before), 3).values() for m in mods}
    for name in before:
        if module_of(name) in frozen:
            assert torch.equal(before[name], after[name]), name
        else:
            assert not torch.equal(before[name], after[name]), name
    # The two forms of HFT agree: resetting the same selection of the trained model is a no-op.
    reset = hft_reset(load(BASE), load(tmp_path / "hft"), seed=3)
    for name in before:
        assert torch.equal(reset[name], after[name]), name


def test_gradient_mask_moves_only_masked_entries(tmp_path: Path) -> None:
    before = _weights(BASE)
    name = "model.layers.1.mlp.up_proj.weight"
    mask = torch.zeros_like(before[name], dtype=torch.bool)
    mask[3, :5] = True
    res = finetune(BASE, MATH, out=tmp_path / "m", steps=3, lr=1e-2, batch_size=4,
                   trainable=[name], hooks=[GradientMask({name: mask})])
    after = _weights(tmp_path / "m")
    assert torch.equal(after[name][~mask], before[name][~mask])
    assert not torch.equal(after[name][mask], before[name][mask])
    assert res.transforms == {"gradient mask": 1}
    with pytest.raises(Exception, match="name no trainable parameter"):
        finetune(BASE, MATH, out=tmp_path / "m2", steps=1, trainable=["mlp"],
                 hooks=[GradientMask({"model.nope.weight": mask})])


@pytest.mark.parametrize(("schedule", "expect"), [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 2 / 3, 1 / 3]),
    ("cosine", [0.0, 0.5, 1.0, 0.75, 0.25]),
])
def test_learning_rate_schedules(schedule: str, expect: list[float]) -> None:
    config = TrainConfig(steps=5, lr=1.0, warmup=2, schedule=schedule)
    got = [lr_at(config, s, 5) for s in range(5)]
    assert got == pytest.approx(expect), got
    assert lr_at(TrainConfig(steps=4, lr=2.0, schedule="cosine"), 2, 4) == \
        pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_classifier_learns_string_labels_and_keeps_the_map(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "data" / "sentiment.jsonl")
            .read_text().splitlines()]
    data = tmp_path / "named.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "label": ["neg", "pos"][r["label"]]})
                            + "\n" for r in rows))
    from surgery.evaluate import evaluate

    start = evaluate(FIXTURES / "tiny-bert" / "base", FIXTURES / "data" / "sentiment.jsonl",
                     "accuracy", device="cpu").value
    finetune(FIXTURES / "tiny-bert" / "base", data, out=tmp_path / "clf", steps=60, lr=1e-3,
             batch_size=8)
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["label2id"] == {"neg": 0, "pos": 1}
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    end = evaluate(tmp_path / "clf", data, "accuracy", device="cpu").value
    assert end >= 0.9 and end > start, (start, end)
