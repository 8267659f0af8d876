"""Per-tensor parameter schedules: scalars, depth gradients, most-specific rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from surgery import Weights, load, ties
from surgery.errors import UsageError
from surgery.methods.schedule import Depth, Rule, Schedule, in_unit_interval, interpolate
from surgery.recipe import build_recipe
from tests.conftest import write_checkpoint

NAMES = {
    "model.embed_tokens.weight": (8, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.1.self_attn.q_proj.weight": (4, 4),
    "model.layers.2.self_attn.q_proj.weight": (4, 4),
    "model.layers.2.input_layernorm.weight": (4,),
    "model.norm.weight": (4,),
    "lm_head.weight": (8, 4),
}


@pytest.fixture
def weights(tmp_path: Path) -> Weights:
    tensors = {n: torch.zeros(s) for n, s in NAMES.items()}
    return load(write_checkpoint(tmp_path / "m", tensors, {"num_hidden_layers": 3}))


def _schedule(w: Weights, spec: Any, **kw: Any) -> Schedule:
    return Schedule("p", spec, w.node, Depth.of(w.node), **kw)


def test_interpolate() -> None:
    assert interpolate([0.0, 1.0], 0.25) == 0.25
    assert interpolate([0.0, 1.0, 0.0], 0.75) == 0.5
    assert interpolate([2.0], 0.3) == 2.0
    assert interpolate([1.0, 3.0], 1.0) == 3.0


def test_scalar_and_gradient(weights: Weights) -> None:
    assert _schedule(weights, 0.3)("lm_head.weight") == 0.3
    s = _schedule(weights, [0.0, 1.0])
    # blocks 0, 1, 2 of L = 3 sit at t = 0, 0.5, 1; non-block tensors at t = 0
    assert s("model.layers.0.mlp.up_proj.weight") == 0.0
    assert s("model.layers.1.self_attn.q_proj.weight") == 0.5
    assert s("model.layers.2.input_layernorm.weight") == 1.0
    assert s("model.embed_tokens.weight") == 0.0
    assert s("lm_head.weight") == 0.0
    three = _schedule(weights, [0.2, 0.8, 0.4])
    assert three("model.layers.1.self_attn.q_proj.weight") == 0.8


def test_most_specific_rule_wins_not_the_first(weights: Weights) -> None:
    rules = [
        Rule(match="attention", value=0.1),                      # a kind: least specific
        Rule(match="*layers.*", value=0.2),                      # glob, 7 literal characters
        Rule(match="*layers.2.self_attn*", value=0.3),           # glob, 18 literal characters
        Rule(match="re:layers\\.1\\.", value=[0.5, 0.9]),         # regex, 9 literals, gradient
        Rule(match="model.layers.0.mlp.up_proj.weight", value=0.4),  # exact name
        Rule(match="norm", value=0.6),
    ]
    s = _schedule(weights, rules, default=1.0)
    assert s("model.layers.2.self_attn.q_proj.weight") == 0.3
    assert s("model.layers.0.self_attn.q_proj.weight") == 0.2  # glob beats kind
    assert s("model.layers.0.mlp.up_proj.weight") == 0.4
    assert s("model.layers.1.self_attn.q_proj.weight") == pytest.approx(0.7)  # t = 0.5
    assert s("model.layers.2.input_layernorm.weight") == 0.2  # the glob beats the kind
    assert s("model.norm.weight") == 0.6
    assert s("lm_head.weight") == 1.0  # the default


def test_rule_errors(weights: Weights) -> None:
    with pytest.raises(UsageError, match=r"^p: rule '\*mlp\.gate\*' matches no tensor$"):
        _schedule(weights, [Rule(match="*mlp.gate*", value=0.1)], default=1.0)
    with pytest.raises(UsageError, match=r"rule 'q_proj' matches no tensor \(globs match the "
                                         r"whole name: try '\*q_proj\*'\)"):
        _schedule(weights, [Rule(match="q_proj", value=0.1)], default=1.0)
    with pytest.raises(UsageError, match=r"no rule matches tensor 'lm_head.weight'"):
        _schedule(weights, [Rule(match="attention", value=0.1)])
    with pytest.raises(UsageError, match=r"rules '\*q_proj\.\*' and '\*layers\.\*' match tensor"):
        _schedule(weights, [Rule(match="*q_proj.*", value=0.1),
                            Rule(match="*layers.*", value=0.2)], default=1.0)
    with pytest.raises(UsageError, match=r"^p \(rule 'norm'\) 1.5 is outside \(0, 1\]$"):
        _schedule(weights, [Rule(match="norm", value=[0.5, 1.5])], default=0.5,
                  check=in_unit_interval)
    with pytest.raises(UsageError, match=r"^p 0.0 is outside"):
        _schedule(weights, [0.5, 0.0], check=in_unit_interval)


def test_layer_pattern_override(tmp_path: Path) -> None:
    tensors = {"enc.stage3.w": torch.zeros(2), "enc.stage0.w": torch.zeros(2),
               "head.w": torch.zeros(2)}
    w = load(write_checkpoint(tmp_path / "m", tensors, {"model_type": "x"}))
    depth = Depth.of(w.node, r"stage(\d+)\.")
    assert depth.num_layers == 4
    s = Schedule("p", [0.0, 0.9], w.node, depth)
    assert s("enc.stage3.w") == 0.9 and s("enc.stage0.w") == 0.0 and s("head.w") == 0.0
    with pytest.raises(UsageError, match="layer_pattern 'stage' needs a group"):
        Depth.of(w.node, "stage")
    bad = load(write_checkpoint(tmp_path / "b", {"model.layers.5.w": torch.zeros(1)},
                                {"num_hidden_layers": 2}))
    with pytest.raises(UsageError, match=r"'model.layers.5.w' is in block 5 but the model has 2"):
        Depth.of(bad.node)


def test_ties_with_scheduled_density_in_a_recipe(tmp_path: Path) -> None:
    base = {n: torch.zeros(s) for n, s in NAMES.items()}
    g = torch.Generator().manual_seed(0)
    tuned = {n: torch.randn(s, generator=g) for n, s in NAMES.items()}
    pb = write_checkpoint(tmp_path / "base", base, {"num_hidden_layers": 3})
    pf = write_checkpoint(tmp_path / "ft", tuned, {"num_hidden_layers": 3})
    text = (f"inputs: {{base: {pb}, ft: {pf}}}\n"
            "steps:\n"
            "  merged:\n"
            "    op: ties\n    base: base\n    models: [ft]\n"
            "    density:\n"
            "      - {match: attention, value: [0.25, 0.75]}\n"
            "      - {match: '*', value: 1.0}\n"
            f"output: {{from: merged, path: {tmp_path / 'out'}}}\n")
    merged = build_recipe(text).values["merged"]
    nonzero = {n: int((merged[n] != 0).sum()) for n in NAMES}
    assert nonzero["model.layers.0.self_attn.q_proj.weight"] == 4  # ⌊0.25·16⌋
    assert nonzero["model.layers.1.self_attn.q_proj.weight"] == 8  # ⌊0.5·16⌋
    assert nonzero["model.layers.2.self_attn.q_proj.weight"] == 12
    assert nonzero["lm_head.weight"] == 32
    direct = ties(load(pb), [load(pf)], density=[Rule(match="attention", value=[0.25, 0.75]),
                                                 Rule(match="*", value=1.0)])
    assert all(torch.equal(direct[n], merged[n]) for n in NAMES)
    missing = text.replace("match: attention", "match: '*mlp.gate*'")
    with pytest.raises(UsageError, match=r"steps.merged: ties: density: rule '\*mlp.gate\*' "
                                          "matches no tensor"):
        build_recipe(missing)
