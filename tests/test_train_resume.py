"""Interrupted training resumes from ``OUT.partial`` and ends with the bytes of an
uninterrupted run: Ctrl-C in the library, SIGKILL of the CLI, and a NaN loss that stops the
run and keeps the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgery.train import TrainEvent, TrainingDiverged, finetune
from tests.conftest import FIXTURES

LLAMA = FIXTURES / "tiny-llama" / "base"
BERT = FIXTURES / "tiny-bert" / "base"
MATH = FIXTURES / "data" / "math.jsonl"
SENTIMENT = FIXTURES / "data" / "sentiment.jsonl"


def _stop_at(step: int):
    def callback(e: TrainEvent) -> None:
        if e.step == step and not e.eval:
            raise KeyboardInterrupt
    return callback


@pytest.mark.parametrize(("model", "data", "settings"), [
    (LLAMA, MATH, {"objective": "masked_thought", "schedule": "cosine", "warmup": 2}),
    # BERT's dropout draws from the torch RNG: its state must be restored too.
    (BERT, SENTIMENT, {"weight_decay": 0.01, "grad_accum": 2}),
])
def test_ctrl_c_then_rerun_equals_an_uninterrupted_run(tmp_path: Path, model: Path,
                                                       data: Path, settings: dict) -> None:
    args = {"steps": 8, "lr": 1e-3, "batch_size": 4, **settings}
    whole = finetune(model, data, out=tmp_path / "whole", **args)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, data, out=tmp_path / "cut", progress=_stop_at(3), **args)
    assert not (tmp_path / "cut").exists()
    assert (tmp_path / "cut.partial" / ".scratch" / "latest.json").is_file()
    resumed = finetune(model, data, out=tmp_path / "cut", **args)
    assert resumed.resumed_from == 3 and whole.resumed_from == 0
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert not (tmp_path / "cut" / ".scratch").exists()
    assert not (tmp_path / "cut.partial").exists()


def test_changed_settings_do_not_resume_from_another_runs_state(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        finetune(LLAMA, MATH, out=tmp_path / "o", steps=6, lr=1e-3, progress=_stop_at(2))
    res = finetune(LLAMA, MATH, out=tmp_path / "o", steps=6, lr=2e-3)
    assert res.resumed_from == 0


def _train_cmd(steps: int) -> list[str]:
    return [str(Path(sys.executable).with_name("surgery")), "train", str(LLAMA), "--data",
            str(MATH), "--out", "out", "--steps", str(steps), "--lr", "1e-3",
            "--batch-size", "4", "--checkpoint-every", "2", "-q"]


def _latest_step(cache: Path) -> int:
    """The update of the newest saved state under ``cache``, 0 if none (yet)."""
    for latest in cache.glob("finetune/*.partial/.scratch/latest.json"):
        try:
            return int(json.loads(latest.read_text())["folder"].split("-")[1])
        except (OSError, ValueError, KeyError):
            return 0  # being replaced right now
    return 0


def test_sigkill_then_rerun_resumes_and_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """`surgery train` killed after a checkpoint: the rerun resumes from it. If the run ends
    before the kill lands (a fast machine, or a slow poll), the attempt is repeated with more
    updates, so the test holds whatever the load. Both runs write `out` in a folder of their
    own (the output path is part of the recipe, and so of the shards' metadata)."""
    for steps in (40, 160, 640, 2560):
        run, ref = tmp_path / f"run{steps}", tmp_path / f"ref{steps}"
        run.mkdir()
        ref.mkdir()
        env = {**os.environ, "WEIGHT_SURGERY_CACHE": str(run / "cache")}
        proc = subprocess.Popen(_train_cmd(steps), cwd=run, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and _latest_step(run / "cache") < 2 \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if not killed:
            assert proc.returncode == 0, "training failed before it could be killed"
            continue  # finished first: try again with a longer run
        assert not (run / "out").exists()
        saved = _latest_step(run / "cache")
        assert 2 <= saved < steps
        rerun = subprocess.run(_train_cmd(steps), cwd=run, env=env, capture_output=True,
                               text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        record = json.loads((run / "out" / "provenance.json").read_text())["training"]
        assert record["resumed_from_update"] >= saved
        reference = subprocess.run(
            _train_cmd(steps), cwd=ref, capture_output=True, text=True, timeout=600,
            env={**os.environ, "WEIGHT_SURGERY_CACHE": str(ref / "cache")})
        assert reference.returncode == 0, reference.stderr
        assert (run / "out" / "model.safetensors").read_bytes() == \
            (ref / "out" / "model.safetensors").read_bytes()
        return
    pytest.fail("every attempt finished before it could be killed")


def test_nan_loss_stops_naming_the_update_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match=r"update 2: the loss is nan; stopped before "
                       r"applying it \(the checkpoint of update 1 is kept in .*o\.partial\)"):
        finetune(LLAMA, MATH, out=tmp_path / "o", steps=10, lr=1e30, clip=None, batch_size=4,
                 checkpoint_every=1)
    assert not (tmp_path / "o").exists()
    assert json.loads((tmp_path / "o.partial" / ".scratch" / "latest.json").read_text()) == \
        {"folder": "step-00000001"}
