"""LiNeS: per-depth factors on the three fixture families, and the multi-task alpha."""

from __future__ import annotations

import pytest
import torch

from surgery import Weights, lines, load, task_arithmetic, ties
from surgery.errors import UsageError
from surgery.names import layer_index
from tests.conftest import fixture_dir

# family: (block count, one fine-tune)
FAMILIES = {"tiny-llama": (6, "math"), "tiny-gpt2": (4, "math"), "tiny-bert": (4, "sentiment")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_task_factors_by_depth(family: str) -> None:
    layers, tuned = FAMILIES[family]
    base, task = load(fixture_dir(family, "base")), load(fixture_dir(family, tuned))
    c = 0.25
    out = lines(base, task, c=c)
    depths = set()
    for name in base.names:
        theta0, theta1 = base[name], task[name]
        if not theta0.is_floating_point():
            continue
        block = layer_index(name)
        factor = c if block is None else c + (1 - c) * block / (layers - 1)
        depths.add(block)
        assert torch.equal(out[name], theta0 + (theta1 - theta0) * factor), name
    assert depths == {None, *range(layers)}  # every block and some non-block seen


def test_alpha_beta_form_and_layer_pattern() -> None:
    base, task = load(fixture_dir("tiny-gpt2", "base")), load(fixture_dir("tiny-gpt2", "code"))
    name = "transformer.h.2.mlp.c_fc.weight"
    tau = task[name] - base[name]
    out = lines(base, task, alpha=0.5, beta=0.3)
    assert torch.equal(out[name], base[name] + tau * (0.5 + 0.3 * 2 / 3))
    assert torch.equal(out["transformer.wte.weight"],
                       base["transformer.wte.weight"] + (task["transformer.wte.weight"]
                                                         - base["transformer.wte.weight"]) * 0.5)
    # an override that sees only the MLP tensors as blocks: attention becomes non-block
    custom = lines(base, task, alpha=0.5, beta=0.3, layer_pattern=r"h\.(\d+)\.mlp\.")
    attn = "transformer.h.3.attn.c_attn.weight"
    assert torch.equal(custom[attn], base[attn] + (task[attn] - base[attn]) * 0.5)
    assert torch.equal(custom[name], out[name])


def _l1_alpha(base: Weights, merged: Weights, tasks: list[Weights]) -> float:
    num = den = 0.0
    for n in base.names:
        if not base[n].is_floating_point():
            continue
        theta0 = base[n].double()
        num += float(sum(t[n].double() - theta0 for t in tasks).abs().sum())
        den += float((merged[n].double() - theta0).abs().sum())
    return num / den / len(tasks)


def test_multi_task_alpha() -> None:
    base = load(fixture_dir("tiny-llama", "base"))
    tasks = [load(fixture_dir("tiny-llama", n)) for n in ("math", "code", "chat")]
    beta = 0.4
    name = "model.layers.3.mlp.up_proj.weight"

    summed = task_arithmetic(base, tasks)
    out = lines(base, summed, beta=beta, tasks=tasks)
    tau = summed[name] - base[name]
    got = out[name]  # runs the reduction pass
    alpha = out.node.alpha.value
    assert alpha == pytest.approx(1 / 3, rel=1e-6)  # Σ τ_t is the merged vector
    assert torch.equal(got, base[name] + tau * (alpha + beta * 3 / 5))

    merged = ties(base, tasks, density=0.2)
    scaled = lines(base, merged, beta=beta, tasks=tasks)
    scaled[name]
    assert scaled.node.alpha.value == pytest.approx(_l1_alpha(base, merged, tasks), rel=1e-9)
    assert scaled.node.alpha.value > 1 / 3  # trimming shrinks the merged vector's L1 norm


def test_lines_argument_errors() -> None:
    base, task = load(fixture_dir("tiny-bert", "base")), load(fixture_dir("tiny-bert", "topic"))
    with pytest.raises(UsageError, match="give c alone"):
        lines(base, task, alpha=0.1, c=0.5)
    with pytest.raises(UsageError, match="beta is required with tasks"):
        lines(base, task, tasks=[task])
    with pytest.raises(UsageError, match="give alpha and beta"):
        lines(base, task, alpha=0.3)
    with pytest.raises(UsageError, match=r"layer_pattern 'x\(' is not a valid regex"):
        lines(base, task, c=0.5, layer_pattern="x(")
