"""Recipes through the real `surgery` command: runs, plans, and one-line errors with exit 2."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, small_tensors, surgery, write_checkpoint

GOOD = """\
seed: 3
inputs:
  base: m0
  a: m1
  b: {path: m2}
steps:
  soup: {op: linear, models: [a, b], weights: [1, 3]}
  ta:
    op: task_arithmetic
    base: base
    models: [a, b]
    lambda: 0.5
output:
  - {from: soup, path: out/soup}
  - {from: ta, path: out/ta, dtype: bfloat16, shard_size: 200B}
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for i in range(3):
        write_checkpoint(tmp_path / f"m{i}", small_tensors(i))
    return tmp_path


def test_apply_and_plan(workdir: Path) -> None:
    (workdir / "r.yaml").write_text(GOOD)
    plan = surgery("plan", "r.yaml", cwd=workdir)
    assert plan.returncode == 0, plan.stderr
    assert "soup: linear(models=['a', 'b'], weights=[1.0, 3.0], normalize=True)" in plan.stdout
    assert "estimated peak memory" in plan.stdout
    assert not (workdir / "out").exists()
    run = surgery("apply", "r.yaml", "-q", "--profile", cwd=workdir)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "computing" in run.stdout
    from surgery import load

    soup, ta = load(workdir / "out/soup"), load(workdir / "out/ta")
    t0, t1, t2 = (small_tensors(i) for i in range(3))
    name = "model.layers.0.mlp.up_proj.weight"
    # float32 compute; the fused multiply-add of the accumulation may differ by one ulp
    torch.testing.assert_close(soup[name], (t1[name] * 1 + t2[name] * 3) / 4, rtol=0, atol=1e-6)
    want = t0[name] + 0.5 * ((t1[name] - t0[name]) + (t2[name] - t0[name]))
    assert ta.spec(name).dtype == torch.bfloat16
    torch.testing.assert_close(ta[name], want, rtol=2**-8, atol=0)
    assert (workdir / "out/ta/recipe.yaml").read_text() == GOOD
    assert len(list((workdir / "out/ta").glob("model-*.safetensors"))) > 1


def test_inspect(workdir: Path) -> None:
    res = surgery("inspect", "m0", cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert "blocks: 2 (pattern model.layers.N.)" in res.stdout
    assert "block 0" in res.stdout and "non-block" in res.stdout


BAD_RECIPES = [
    (GOOD.replace("seed: 3", "sead: 3"), "r.yaml:1:1: sead: unknown key; did you mean 'seed'?"),
    (GOOD.replace("op: linear", "op: lienar"),
     "r.yaml:7:10: steps.soup.op: unknown operation 'lienar'; did you mean 'linear'?"),
    (GOOD.replace("lambda: 0.5", "lamda: 0.5"),
     "r.yaml:12:5: steps.ta.lamda: unknown key; did you mean 'lambda'?"),
    (GOOD.replace("lambda: 0.5", "lambda: lots"),
     "r.yaml:12:5: steps.ta.lambda: expected a number, a list of numbers (a depth gradient) "
     "or a list of {match, value} rules (got 'lots')"),
    (GOOD.replace("lambda: 0.5", "lambda: [{match: norm, valeu: 2}]"),
     "r.yaml:12:28: steps.ta.lambda.0.valeu: unknown key; did you mean 'value'?"),
    (GOOD.replace("lambda: 0.5", "lambda: [0.5, x]"),
     "r.yaml:12:19: steps.ta.lambda.1: Input should be a valid number"),
    (GOOD.replace("models: [a, b]\n", "modles: [a, b]\n"),
     "r.yaml:11:5: steps.ta.modles: unknown key; did you mean 'models'?"),
    (GOOD.replace("path: out/soup", "paht: out/soup"),
     "r.yaml:14:18: output.0.paht: unknown key; did you mean 'path'?"),
    (GOOD.replace("a: m1", "a: m9"), "r.yaml:4:3: inputs.a: m9: no such file or directory"),
    (GOOD.replace("models: [a, b]\n", "models: [a, c]\n"),
     "r.yaml:11:17: steps.ta.models.1: no input or step named 'c'"),
    (GOOD.replace("from: soup", "from: sopu"),
     "output.0.from: no input or step named 'sopu'; did you mean 'soup'?"),
    (GOOD.replace("dtype: bfloat16", "dtype: bfloat17"), "output.1.dtype: dtype 'bfloat17'"),
    (GOOD.replace("[a, b], weights", "[a, soup2], weights").replace(
        "  ta:\n", "  soup2: {op: linear, models: [soup]}\n  ta:\n"), "cycle"),
    ("inputs: [1\n", "r.yaml:2:1: invalid YAML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_RECIPES)
def test_bad_recipes_fail_with_location_and_exit_2(workdir: Path, text: str,
                                                   message: str) -> None:
    (workdir / "r.yaml").write_text(text)
    res = surgery("apply", "r.yaml", cwd=workdir)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (workdir / "out").exists()


def test_shape_mismatch_names_step_and_tensor(workdir: Path) -> None:
    other = small_tensors(5)
    other["model.norm.weight"] = torch.zeros(7)
    write_checkpoint(workdir / "m1", other)
    (workdir / "r.yaml").write_text(GOOD)
    res = surgery("apply", "r.yaml", cwd=workdir)
    assert res.returncode == 2
    assert "steps.soup: linear: tensor 'model.norm.weight' has shape [4] in model 2" in res.stderr
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "overlap", "past_end"])
def test_damaged_input_file(workdir: Path, damage: str) -> None:
    path = workdir / "m2" / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if damage == "truncate":
        path.write_bytes(data[:-3])
        needle = "run past the end"
    else:
        names = [k for k in header if k != "__metadata__"]
        if damage == "overlap":
            header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
            header[names[1]]["shape"] = header[names[0]]["shape"]
            header[names[1]]["dtype"] = header[names[0]]["dtype"]
            needle = "overlap"
        else:
            a, b = header[names[0]]["data_offsets"]
            header[names[0]]["data_offsets"] = [a + 10**9, b + 10**9]
            needle = "run past the end"
        body = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])
    (workdir / "r.yaml").write_text(GOOD)
    res = surgery("apply", "r.yaml", cwd=workdir)
    assert res.returncode == 2
    assert "inputs.b:" in res.stderr and str(Path("m2") / "model.safetensors") in res.stderr
    assert needle in res.stderr
    assert not (workdir / "out").exists()


def test_existing_output_exit_2_untouched(workdir: Path) -> None:
    (workdir / "r.yaml").write_text(GOOD)
    assert surgery("apply", "r.yaml", "-q", cwd=workdir).returncode == 0
    before = (workdir / "out/soup/model.safetensors").read_bytes()
    res = surgery("apply", "r.yaml", cwd=workdir)
    assert res.returncode == 2 and "already exists; pass --force" in res.stderr
    assert (workdir / "out/soup/model.safetensors").read_bytes() == before
    assert surgery("apply", "r.yaml", "-q", "--force", cwd=workdir).returncode == 0


def test_missing_recipe_file(workdir: Path) -> None:
    res = surgery("apply", "nope.yaml", cwd=workdir)
    assert res.returncode == 2 and "nope.yaml: cannot read recipe" in res.stderr


def test_cli_runs_from_the_installed_script(workdir: Path) -> None:
    exe = Path(sys.executable).with_name("surgery")
    if not exe.exists():
        pytest.fail(f"console script {exe} not installed; pip install -e . first")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "apply" in res.stdout


MIXED = """\
inputs: {base: fixtures/tiny-llama/base, llama: fixtures/tiny-llama/math,
         gpt2: fixtures/tiny-gpt2/math}
steps: {merged: {op: ties, base: base, models: [llama, gpt2], density: 0.5}}
output: {from: merged, path: OUT}
"""

BAD_COMMANDS = [
    (["apply", "recipes"], "Invalid value for 'RECIPE': File 'recipes' is a directory. "
                           "(see 'surgery apply --help')"),
    (["nosuch"], "No such command 'nosuch'. (see 'surgery --help')"),
    (["eval", "fixtures/tiny-llama/base"], "Missing option '--data'."),
    (["eval", "nope", "--data", "fixtures/data/math.jsonl"], "nope: no such file or directory"),
    (["eval", "fixtures/tiny-llama/base", "--data", "fixtures/data/sentiment.jsonl", "--metric",
      "accuracy"], "fixtures/tiny-llama/base: metric accuracy needs a sequence classifier, but "
                   "the checkpoint is LlamaForCausalLM"),
    (["prune", "fixtures/tiny-bert/base", "--blocks", "1", "--data",
      "fixtures/data/general.jsonl", "--out", "OUT"],
     "needs a causal language model, but the checkpoint is BertForSequenceClassification"),
    (["inspect", "fixtures/tiny-llama"], "no model.safetensors or model.safetensors.index.json"),
    (["diff", "fixtures/tiny-llama/base", "fixtures/tiny-gpt2/base"],
     "tensor 'lm_head.weight' is in only one of"),
    (["sparse", "extract", "fixtures/tiny-llama/base", "fixtures/tiny-gpt2/math", "OUT"],
     "lacks tensor"),
    (["apply", "MIXED"], "steps.merged: ties: model 3 (fixtures/tiny-gpt2/math) lacks tensor "
                         "'lm_head.weight' that model 1 (fixtures/tiny-llama/base) has"),
]


@pytest.mark.parametrize(("args", "message"), BAD_COMMANDS)
def test_bad_commands_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    """Wrong paths, wrong model kinds and llama-vs-gpt2 merges, run from the repository root;
    nothing is written."""
    (tmp_path / "mixed.yaml").write_text(MIXED.replace("OUT", str(tmp_path / "out")))
    args = [{"OUT": str(tmp_path / "out"), "MIXED": str(tmp_path / "mixed.yaml")}.get(a, a)
            for a in args]
    res = surgery(*args, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def _shards_done(marker: Path) -> int:
    """Shards the partial-output marker lists as finished; 0 while it is missing (not yet
    made, or gone because the run just committed)."""
    try:
        return len(json.loads(marker.read_text() or "{}").get("shards", {}))
    except (OSError, ValueError):
        return 0


def test_ctrl_c_keeps_old_output_and_rerun_resumes(tmp_path: Path) -> None:
    """SIGINT to `surgery apply --force` mid-run: exit 130 with one line, the previous output
    untouched, finished shards kept; the rerun reuses them and equals the first output. A run
    that ends before the signal lands is repeated on larger models, so the test holds
    whatever the machine's load."""
    exe = str(Path(sys.executable).with_name("surgery"))
    for blocks in (32, 128, 512):
        work = tmp_path / f"blocks{blocks}"
        g = torch.Generator().manual_seed(0)
        for i in range(2):
            write_checkpoint(work / f"m{i}", {f"model.layers.{j}.mlp.up_proj.weight":
                                              torch.randn(512, 512, generator=g)
                                              for j in range(blocks)},
                             {"num_hidden_layers": blocks})
        (work / "r.yaml").write_text("inputs: {a: m0, b: m1}\n"
                                     "steps: {s: {op: linear, models: [a, b]}}\n"
                                     "output: {from: s, path: out, shard_size: 1MB}\n")
        assert surgery("apply", "-q", "r.yaml", cwd=work).returncode == 0
        before = {p.name: p.read_bytes() for p in (work / "out").iterdir()}
        proc = subprocess.Popen([exe, "apply", "-q", "--force", "r.yaml"], cwd=work,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        marker = work / "out.partial" / ".weight-surgery-partial.json"
        while proc.poll() is None and _shards_done(marker) < 2:
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            continue  # it finished before the signal: again, with more to do
        assert proc.returncode == 130, err
        assert err.splitlines() == ["interrupted; rerun the same command to resume"]
        assert {p.name: p.read_bytes() for p in (work / "out").iterdir()} == before
        done = json.loads(marker.read_text())["shards"]
        assert 2 <= len(done) < blocks
        res = surgery("apply", "-q", "--force", "r.yaml", cwd=work)
        assert res.returncode == 0 and f"{len(done)} reused from an interrupted run" in res.stdout
        assert {p.name: p.read_bytes() for p in (work / "out").iterdir()} == before
        return
    pytest.fail("every run finished before it could be interrupted")
    done = json.loads(marker.read_text())["shards"]
    assert 2 <= len(done) < 32
    res = surgery("apply", "-q", "--force", "r.yaml", cwd=tmp_path)
    assert res.returncode == 0 and f"{len(done)} reused from an interrupted run" in res.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
