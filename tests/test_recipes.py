"""Every recipe in recipes/ runs as written, through the real `surgery` command, in a copy of
the repository's tracked fixtures and recipes (what a fresh clone has): the commands its header
comment says to run first, then `surgery plan`, then the `surgery apply` line of its header.
Each output loads with the transformers Auto class of its architecture and runs a forward pass
with finite logits; the plan's tensor, byte and shard counts are what the run wrote."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from surgery_cli.main import human_bytes
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from surgery import load
from surgery.recipe import parse_recipe
from tests.conftest import ROOT, surgery

RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The tracked files under fixtures/ and recipes/, as a fresh clone has them."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "fixtures", "recipes"], cwd=ROOT,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs a git checkout to know which files are tracked ({e})")
    for rel in listed.decode().split("\0"):
        if rel:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tmp_path / rel)
    return tmp_path


def header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def prep_commands(text: str) -> list[list[str]]:
    """The commands a header lists on their own indented lines (`#   surgery ...`)."""
    return [shlex.split(m.group(1), comments=True) for line in header(text)
            if (m := re.match(r"#\s{2,}surgery\s+(.*)", line))]


def apply_command(name: str, text: str) -> list[str]:
    found = [m.group(1) for line in header(text)
             if (m := re.search(rf"surgery (apply recipes/{re.escape(name)}\b.*)$", line))]
    assert len(found) == 1, f"{name}: the header must say once how to run it"
    return shlex.split(found[0], comments=True)


def load_model(path: Path) -> PreTrainedModel:
    """With the Auto class whose mapping gives the config's architecture for its model type."""
    config = json.loads((path / "config.json").read_text())
    arch, kind = config["architectures"][0], config["model_type"]
    autos = [(AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
             (AutoModelForSequenceClassification, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)]
    (cls,) = [auto for auto, names in autos if names.get(kind) == arch]
    return cls.from_pretrained(path).eval()


def written(path: Path) -> tuple[int, int, int]:
    """Tensors, tensor bytes and shards of an output directory."""
    shards = sorted(path.glob("*.safetensors"))
    tensors = size = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                tensors, size = tensors + 1, size + t.numel() * t.element_size()
    return tensors, size, len(shards)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load(a), load(b)
    return set(wa.names) == set(wb.names) and all(torch.equal(wa[n], wb[n]) for n in wa.names)


# What some recipes promise beyond running: layer counts, a card section.
LAYERS = {"llama-drop-2-3": 4, "gpt2-first-2": 2, "llama-math-code-stack": 8}
CARD = {"hft-chat": "HFT half-reset selection", "greedy-soup": "## Greedy soup",
        "lt-sft-math": "## LT-SFT"}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_as_written(clone: Path, name: str) -> None:
    text = (clone / "recipes" / name).read_text()
    for command in prep_commands(text):
        res = surgery(*command, cwd=clone)
        assert res.returncode == 0, f"{shlex.join(command)}: {res.stderr}"
    planned = surgery("plan", f"recipes/{name}", cwd=clone)
    assert planned.returncode == 0, planned.stderr
    command = apply_command(name, text)
    res = surgery(*command, cwd=clone)
    assert res.returncode == 0, res.stderr

    _, doc, _ = parse_recipe(text, name)
    inputs = [clone / doc.input_spec(n).path for n in doc.inputs]
    for out in doc.outputs():
        path = clone / out.path
        assert f"wrote {path} (" in res.stdout
        tensors, size, shards = written(path)
        line = next(x for x in planned.stdout.splitlines() if x.startswith(f"output {out.path} "))
        assert f": {tensors} tensors, {human_bytes(size)} in {shards} shard(s)" in line, line
        assert not any(same_weights(path, i) for i in inputs), f"{out.path} is an input's copy"
        model = load_model(path)
        ids = AutoTokenizer.from_pretrained(path)("12+7=19", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        want = model.config.num_labels if logits.dim() == 2 else model.config.vocab_size
        assert logits.shape[-1] == want and torch.isfinite(logits).all(), out.path
        if path.name in LAYERS:
            assert model.config.num_hidden_layers == LAYERS[path.name]
        if path.name in CARD:
            assert CARD[path.name] in (path / "README.md").read_text()
    if "--plot" in command:
        png = clone / command[command.index("--plot") + 1]
        assert f"plot: {png.relative_to(clone)}" in res.stdout
        assert Image.open(png).format == "PNG" and png.stat().st_size > 10_000


def test_quickstart_reruns_with_force(clone: Path) -> None:
    """README's first command: a second run with --force replaces the first run's outputs."""
    for _ in range(2):
        res = surgery("apply", "recipes/quickstart.yaml", "--force", cwd=clone)
        assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (clone / "out").iterdir()) == ["quickstart-skills",
                                                                  "quickstart-soup"]


def test_plot_needs_a_greedy_soup(clone: Path) -> None:
    res = surgery("apply", "recipes/ties.yaml", "--plot", "out/t.png", cwd=clone)
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: --plot draws a greedy-soup trajectory, but no output "
                                  "of recipes/ties.yaml comes from a greedy_soup step")
    assert not (clone / "out").exists()
