"""Each objective against its formula computed by hand, and sorted fine-tuning against the
sum of explicitly built sub-models' losses."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery import keep_first_layers, load
from surgery.train import TrainConfig
from surgery.train.data import Batch
from surgery.train.loop import Trainer
from surgery.train.model import resolve_source
from surgery.train.objectives import Asft, Dft, MaskedThought, Sft, Sorted, exits, targets
from tests.conftest import FIXTURES

IGNORE = -100


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a given tensor (a parameter, so gradients reach it)."""

    def __init__(self, logits: list[list[list[float]]]) -> None:
        super().__init__()
        self.z = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.z)


# One sequence of 3 tokens [prompt, c1, c2]; positions 0 and 1 predict c1 = 2 and c2 = 0.
Z = [[[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [9.0, 9.0, 9.0]]]
ZREF = [[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]
BATCH = Batch(torch.tensor([[5, 2, 0]]), torch.ones(1, 3, dtype=torch.long),
              torch.tensor([[IGNORE, 2, 0]]), [0], 0)


def softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


P = [softmax(Z[0][0]), softmax(Z[0][1])]
Q = [softmax(ZREF[0][0]), softmax(ZREF[0][1])]
PT = [P[0][2], P[1][0]]  # probability of each target


def test_counts_targets_from_the_shifted_labels() -> None:
    assert targets(BATCH, "lm") == 2


def test_sft_is_the_summed_token_cross_entropy() -> None:
    got = Sft().loss_sum(FixedLogits(Z), BATCH, "lm", None).detach()
    assert float(got) == pytest.approx(-math.log(PT[0]) - math.log(PT[1]), rel=1e-6)


def test_dft_weights_each_token_by_its_stopped_probability() -> None:
    model = FixedLogits(Z)
    got = Dft().loss_sum(model, BATCH, "lm", None)
    assert float(got) == pytest.approx(-PT[0] * math.log(PT[0]) - PT[1] * math.log(PT[1]),
                                       rel=1e-6)
    got.backward()
    # d/dz of −sg(p)·log p is −p·(onehot − softmax): the CE gradient scaled by p.
    for pos, target in ((0, 2), (1, 0)):
        want = [-PT[pos] * ((k == target) - P[pos][k]) for k in range(3)]
        assert model.z.grad[0, pos].tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert model.z.grad[0, 2].abs().sum() == 0  # the last position predicts nothing


@pytest.mark.parametrize("direction", ["reference_to_model", "model_to_reference"])
def test_asft_adds_a_kl_anchor_in_the_chosen_direction(direction: str) -> None:
    got = Asft(0.3, direction).loss_sum(FixedLogits(Z), BATCH, "lm", FixedLogits(ZREF))
    dft = -PT[0] * math.log(PT[0]) - PT[1] * math.log(PT[1])
    if direction == "reference_to_model":  # KL(Q‖P), the reference code's F.kl_div
        kl = sum(q * math.log(q / p) for t in range(2) for p, q in zip(P[t], Q[t], strict=True))
    else:
        kl = sum(p * math.log(p / q) for t in range(2) for p, q in zip(P[t], Q[t], strict=True))
    assert float(got) == pytest.approx(dft + 0.3 * kl, rel=1e-6)


def test_masked_thought_masks_completion_inputs_only_and_keeps_targets() -> None:
    width = 400
    labels = torch.tensor([[IGNORE] * 100 + list(range(3, 303))[:300]])
    ids = torch.arange(width).unsqueeze(0) + 10
    batch = Batch(ids, torch.ones_like(ids), labels, [7], 2)
    obj = MaskedThought(0.25, mask_id=1)
    out = obj.prepare(batch, seed=5)
    assert torch.equal(out.labels, labels) and torch.equal(batch.input_ids, ids)
    assert torch.equal(out.input_ids[0, :100], ids[0, :100])  # the prompt is never masked
    masked = out.input_ids[0, 100:] == 1
    assert torch.equal(out.input_ids[0, 100:][~masked], ids[0, 100:][~masked])
    assert 0.15 < float(masked.float().mean()) < 0.35  # p = 0.25 over 300 draws
    again = obj.prepare(batch, seed=5)
    assert torch.equal(again.input_ids, out.input_ids)  # seeded per (seed, example, epoch)
    other_epoch = obj.prepare(Batch(ids, torch.ones_like(ids), labels, [7], 3), seed=5)
    assert not torch.equal(other_epoch.input_ids, out.input_ids)
    assert torch.equal(MaskedThought(0.0, 1).prepare(batch, 5).input_ids, ids)


def test_sorted_exits_default_to_quarters() -> None:
    assert exits(6, None) == [2, 4, 6]
    assert exits(30, None) == [8, 16, 24, 30]
    assert exits(4, 3) == [3, 4]


def test_sorted_equals_the_sum_of_extracted_sub_models_losses(tmp_path: Path) -> None:
    base = FIXTURES / "tiny-llama" / "base"
    data = FIXTURES / "data" / "math.jsonl"
    trainer = Trainer(resolve_source(base), data, TrainConfig(steps=1, objective="sorted"))
    from surgery.train.data import make_batch

    batch = make_batch(trainer.data, list(range(6)), 0, trainer.pad_id)
    model = trainer.model.eval()
    with torch.no_grad():
        got = float(Sorted().loss_sum(model, batch, "lm", None))
        want = 0.0
        for e in (2, 4, 6):
            keep_first_layers(load(base), e).save(tmp_path / f"first{e}")
            sub = AutoModelForCausalLM.from_pretrained(tmp_path / f"first{e}",
                                                       dtype=torch.float32).eval()
            want += float(Sft().loss_sum(sub, batch, "lm", None))
    assert got == pytest.approx(want, rel=1e-5)
