"""Push, pull by revision and remote header reads against a real HTTP Hub on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import constants
from surgery_cli.main import main

from surgery import linear, load
from surgery.checkpoint import RemoteCheckpoint, open_checkpoint
from surgery.errors import HubError, OutputExistsError
from surgery.hub import push_folder
from surgery.recipe import build_recipe, plan_recipe, run_recipe
from tests.conftest import small_tensors, write_checkpoint
from tests.hubserver import HubServer, HubState

TOKEN = "hf_test_secret_Zq81xY"
Q = "model.layers.0.self_attn.q_proj.weight"


def _point_at(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubState]:
    state = HubState(tmp_path / "server", TOKEN)
    with HubServer(state) as server:
        _point_at(monkeypatch, server.url, tmp_path / "hf")
        yield state


def _output(tmp_path: Path, name: str = "merged") -> Path:
    a = load(write_checkpoint(tmp_path / "a", small_tensors(0),
                              {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}))
    b = load(write_checkpoint(tmp_path / "b", small_tensors(1)))
    return linear([a, b]).save(tmp_path / name, shard_size=200, hash_inputs=False).path


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}


def test_push_then_pull_by_revision(hub: HubState, tmp_path: Path) -> None:
    out = _output(tmp_path)
    assert (out / "model.safetensors.index.json").is_file()  # several shards, LFS uploads
    res = CliRunner().invoke(main, ["push", str(out), "tester/merged", "--revision", "exp"])
    assert res.exit_code == 0, res.output
    assert hub.files("tester/merged", "exp") == _local_files(out)
    assert hub.files("tester/merged", "main") == {}  # only the branch got the commit
    repo = hub.repos["tester/merged"]
    commit = repo.branches["exp"]
    assert commit in res.output

    hub.log.clear()
    ck = open_checkpoint("tester/merged@exp")
    assert isinstance(ck, RemoteCheckpoint) and ck.revision == commit
    weight_gets = [r for r in hub.log if r.startswith("GET") and r.split()[1].endswith(
        ".safetensors")]
    assert weight_gets and all(" bytes=" in r for r in weight_gets)  # headers only
    assert len(ck.missing()) == len(ck.files) > 1
    expected = linear([load(tmp_path / "a"), load(tmp_path / "b")])[Q]
    assert torch.equal(ck.read(Q), expected)
    assert len(ck.missing()) == len(ck.files) - 1  # only the shard holding Q was downloaded
    assert ck.known_sha256()[ck.info(Q).file] == repo.commits[commit][ck.info(Q).file.name]


def test_recipe_from_hub_inputs_plans_pins_and_pushes(hub: HubState, tmp_path: Path) -> None:
    for i, name in enumerate(("base", "math")):
        folder = write_checkpoint(tmp_path / name, small_tensors(i),
                                  {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2})
        push_folder(folder, f"tester/{name}")
    math_commit = hub.repos["tester/math"].branches["main"]
    text = f"""
inputs:
  base: tester/base
  math: tester/math@{math_commit}
steps:
  merged: {{op: task_arithmetic, base: base, models: [math], lambda: 0.5}}
output:
  from: merged
  path: {tmp_path / "out"}
  push_to_hub: {{repo: tester/result, private: true}}
"""
    recipe_path = tmp_path / "half-math.yaml"
    recipe_path.write_text(text)
    hub.log.clear()
    recipe = build_recipe(text, str(recipe_path))
    assert not [r for r in hub.log if r.startswith("GET") and r.endswith(".safetensors")]
    report = plan_recipe(recipe)
    assert report.pins == {"base": hub.repos["tester/base"].branches["main"], "math": math_commit}
    sizes = [len(hub.files(f"tester/{n}")["model.safetensors"]) for n in ("base", "math")]
    assert report.outputs[0].download_bytes == sum(sizes)
    assert report.outputs[0].push_to == "tester/result@main"

    pushed = []
    run_recipe(recipe, on_push=pushed.append)
    assert plan_recipe(recipe).outputs[0].download_bytes == 0  # now in the cache
    out = tmp_path / "out"
    expected = (load(tmp_path / "base") + 0.5 * (load(tmp_path / "math") - load(tmp_path / "base")))
    assert torch.equal(load(out)[Q], expected[Q])
    assert hub.files("tester/result") == _local_files(out)
    assert hub.repos["tester/result"].private
    head = hub.repos["tester/result"].branches["main"]
    assert pushed[0].commit == head and pushed[0].url.endswith(head)
    assert hub.messages[head] == "Upload out made by weight-surgery from recipe half-math.yaml"

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["tester/base", "tester/math"]
    assert front["base_model_relation"] == "merge"
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-generation"
    assert "task_arithmetic" in front["tags"] and "merge" in front["tags"]
    assert f"`tester/math@{math_commit}` at commit `{math_commit}`" in card
    assert "arXiv 2212.04089" in card
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["recipe_name"] == "half-math.yaml"
    lfs_oid = hub.repos["tester/base"].commits[report.pins["base"]]["model.safetensors"]
    assert provenance["inputs"][0]["files"][0]["sha256"] == lfs_oid


def test_rejected_commit_leaves_remote_unchanged(hub: HubState, tmp_path: Path) -> None:
    out = _output(tmp_path)
    push_folder(out, "tester/merged")
    before = hub.files("tester/merged")
    (out / "README.md").write_text("changed\n")
    hub.reject_commits = "storage quota exceeded for tester"
    with pytest.raises(HubError, match="storage quota exceeded for tester") as err:
        push_folder(out, "tester/merged")
    assert "HTTP 422" in str(err.value)
    assert hub.files("tester/merged") == before


def test_token_is_never_printed_or_written(hub: HubState, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    out = _output(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["push", str(out), "tester/merged", "--private"])
    assert res.exit_code == 0, res.output
    res2 = runner.invoke(main, ["inspect", "tester/merged"])
    assert res2.exit_code == 0, res2.output
    hub.reject_commits = "nope"
    res3 = runner.invoke(main, ["push", str(out), "tester/merged"])
    assert res3.exit_code == 2 and "nope" in res3.output
    assert TOKEN not in res.output + res2.output + res3.output + caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]


def test_incomplete_outputs_are_refused(hub: HubState, tmp_path: Path) -> None:
    out = _output(tmp_path)
    partial = tmp_path / "x.partial"
    partial.mkdir()
    with pytest.raises(OutputExistsError, match="unfinished run"):
        push_folder(partial, "tester/x")
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(OutputExistsError, match=f"lists shard '{shard.name}', which is missing"):
        push_folder(out, "tester/x")
    assert "tester/x" not in hub.repos


def test_unreachable_hub_names_repo_and_how_to_predownload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _point_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hf")
    with pytest.raises(HubError, match=r"Hub repo org/model@v1: cannot be reached .*"
                                       r"`hf download org/model --revision v1`"):
        open_checkpoint("org/model@v1")


def test_offline_uses_a_complete_cached_copy(hub: HubState, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import snapshot_download

    out = _output(tmp_path)
    push_folder(out, "tester/cached")
    snapshot_download("tester/cached")  # what `hf download tester/cached` does
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    _point_at(monkeypatch, f"http://127.0.0.1:{dead}", tmp_path / "hf")  # same cache, no server
    ck = open_checkpoint("tester/cached")
    assert ck.revision == hub.repos["tester/cached"].branches["main"]
    expected = linear([load(tmp_path / "a"), load(tmp_path / "b")])[Q]
    assert torch.equal(ck.read(Q), expected)
    with pytest.raises(HubError, match="tester/never-pulled: cannot be reached"):
        open_checkpoint("tester/never-pulled")
