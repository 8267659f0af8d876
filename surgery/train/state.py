"""Resumable training state, kept in the output's ``OUT.partial/.scratch/``: the trainable
parameters, the optimiser's moments, the RNG states, the update count and data position, and
the loss history so far. Tensors go into safetensors and the rest into JSON: nothing is
pickled. Each save is a new folder, made current by an atomic rename of ``latest.json``."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"


@dataclass
class Progress:
    """Where a run is: updates done, examples consumed (across epochs), the history."""

    step: int = 0
    consumed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_state(folder: Path, params: dict[str, torch.nn.Parameter],
               optimizer: torch.optim.Optimizer, progress: Progress) -> None:
    tensors: dict[str, torch.Tensor] = {f"param/{n}": p.detach().cpu().contiguous()
                                        for n, p in params.items()}
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"opt/{index}/{key}"] = value.detach().cpu().contiguous()
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    name = f"step-{progress.step:08d}"
    target = folder / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    save_file(tensors, str(target / "state.safetensors"))
    doc = {"step": progress.step, "consumed": progress.consumed, "history": progress.history,
           "param_groups": opt["param_groups"]}
    (target / "state.json").write_text(json.dumps(doc))
    tmp = folder / (LATEST + ".tmp")
    tmp.write_text(json.dumps({"folder": name}))
    os.replace(tmp, folder / LATEST)
    for old in folder.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path, params: dict[str, torch.nn.Parameter],
               optimizer: torch.optim.Optimizer) -> Progress | None:
    """Restore the last saved state into ``params`` and ``optimizer``; None if there is none
    (or it is unreadable, as after a kill mid-save: the run then starts over)."""
    try:
        name = json.loads((folder / LATEST).read_text())["folder"]
        doc = json.loads((folder / name / "state.json").read_text())
        tensors = load_file(str(folder / name / "state.safetensors"))
    except (OSError, ValueError, KeyError):
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, slot = key.split("/", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")),
                                       key=lambda k: int(k.rsplit("/", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return Progress(doc["step"], doc["consumed"], doc["history"])
