"""What every row shares: the profile (how many examples and steps), the data, the models,
and cached work. A fine-tune, a saved merge or a score is computed once per content key and
reused by every row (and by the next run of the benchmark): keys hash what the result depends
on (model directories' ``provenance.json`` or weight files' sizes and times, data hashes,
settings)."""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.fidelity import data as fdata
from bench.fidelity.data import digest
from bench.fidelity.models import Models


@dataclass(frozen=True)
class Profile:
    """Sizes of one run. ``steps`` is the budget of a full fine-tune (optimiser updates of
    ``batch_size`` examples); rows that compare training methods give each the same."""

    name: str
    train: int
    validation: int
    test: int
    control: int
    calibration: int
    steps: int
    batch_size: int
    lr: float  # full fine-tunes of the causal LM
    adapter_lr: float  # LoRA / CorDA adapters
    classifier_lr: float
    seeds: int
    max_length: int = 64


# Sized to the targets on 2 CPU cores: SmolLM2-135M takes about 1.2 s per update of 8 short
# examples plus about 12 s to load and write a model; the benchmark makes about 19 trainings
# per seed and about 125 scores (the searches' candidates included). The full profile takes
# 100 min with 2 seeds; a third would take it to about 150 min, past its 2-hour budget. The
# quick one took 13.9 min from an empty cache (its budget: 15).
PROFILES = {
    "full": Profile("full", train=1024, validation=96, test=128, control=64,
                    calibration=128, steps=64, batch_size=8, lr=1e-4, adapter_lr=1e-3,
                    classifier_lr=1e-4, seeds=2),
    "quick": Profile("quick", train=192, validation=32, test=32, control=24, calibration=32,
                     steps=8, batch_size=8, lr=1e-4, adapter_lr=1e-3, classifier_lr=1e-4,
                     seeds=1),
}
# The fixtures' tiny random models learn only at a larger step size, and in at least 12 updates
# (with fewer, a task fine-tune may answer no test question, and normalised scores divide by 0).
FIXTURE_LR = {"lr": 3e-3, "adapter_lr": 1e-2, "classifier_lr": 3e-3}
FIXTURE_MIN_STEPS = 12


def identity(path: Path) -> Any:
    """What a cache key records of a model directory or data file."""
    path = Path(path)
    if path.is_file():
        return [str(path), hashlib.sha256(path.read_bytes()).hexdigest()]
    prov = path / "provenance.json"
    if prov.is_file():
        return [str(path), hashlib.sha256(prov.read_bytes()).hexdigest()]
    return [str(path), sorted((f.name, f.stat().st_size) for f in path.glob("*.safetensors"))]


@dataclass
class Spread:
    """A figure over seeds: mean and half the range."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def half_range(self) -> float:
        return (max(self.values) - min(self.values)) / 2

    def fmt(self, digits: int = 3) -> str:
        if len(self.values) == 1:
            return f"{self.values[0]:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_range:.{digits}f}"


def verdict(diffs: Sequence[float], strict: bool = True) -> str:
    """A claim "A beats B" holds beyond the spread when A − B is above 0 on every seed (at or
    above 0 for a claim "A ≥ B"). With one seed there is no spread to hold beyond."""
    ok = all(d > 0 for d in diffs) if strict else all(d >= 0 for d in diffs)
    if not ok:
        return "not reproduced at this scale"
    return "reproduced" if len(diffs) > 1 else "reproduced (1 seed, no spread)"


def compare(a: Sequence[float], b: Sequence[float], strict: bool = True,
            higher_is_better: bool = True) -> str:
    """The verdict on "a beats b" (``strict``) or "a ≥ b" from paired per-seed figures."""
    sign = 1.0 if higher_is_better else -1.0
    return verdict([sign * (x - y) for x, y in zip(a, b, strict=True)], strict)


def gain_ratio(score: float, base: float, tuned: float) -> float:
    """How much of the fine-tune's gain over the base ``score`` keeps (nan without a gain)."""
    return (score - base) / (tuned - base) if tuned != base else float("nan")


@dataclass
class Row:
    key: str
    title: str
    claim: str
    arxiv: str
    verdicts: list[tuple[str, str]]  # (sub-claim, verdict)
    summary: str  # the deciding figures, one line
    table: str  # markdown
    protocol: str
    plots: list[str] = field(default_factory=list)
    # Training methods' (label, target-task test score, control perplexity), first seed:
    # the report plots every row's points in one figure (target score against forgetting).
    points: list[tuple[str, float, float]] = field(default_factory=list)
    seconds: float = 0.0
    compute: float = 0.0


class Lab:
    def __init__(self, profile: Profile, models: Models, tasks: Sequence[str],
                 classify: str, device: str, out_dir: Path, fixtures: bool) -> None:
        if fixtures:
            profile = replace(profile, steps=max(profile.steps, FIXTURE_MIN_STEPS))
        self.p = profile
        self.models = models
        self.device = device
        self.fixtures = fixtures
        self.out_dir = out_dir
        self.cache = fdata.cache_dir() / ("fixtures" if fixtures else "real") / profile.name
        self.cache.mkdir(parents=True, exist_ok=True)
        counts = {"train": profile.train, "validation": profile.validation, "test": profile.test}
        self.tasks = [fdata.task(m, counts) for m in tasks]
        self.classify = fdata.task(classify, {"train": 4 * profile.train,
                                              "validation": 2 * profile.validation,
                                              "test": 2 * profile.test})
        self.control, self.calibration = fdata.control(profile.control, profile.calibration)
        self.seeds = list(range(profile.seeds))
        self.text_length = 120 if fixtures else 256  # tokens of control text scored
        self.lr = FIXTURE_LR["lr"] if fixtures else profile.lr
        self.adapter_lr = FIXTURE_LR["adapter_lr"] if fixtures else profile.adapter_lr
        self.classifier_lr = FIXTURE_LR["classifier_lr"] if fixtures else profile.classifier_lr
        self._scores_path = self.cache / "scores.json"
        # key -> [score, seconds it took]
        self._scores: dict[str, list[float]] = (json.loads(self._scores_path.read_text())
                                                if self._scores_path.is_file() else {})
        self.t0 = time.perf_counter()
        # Seconds of every result this run used, each counted once, cached ones at what they
        # cost when made: what a run from an empty cache would take (on the machine and load
        # of then).
        self.compute = 0.0
        self._counted: set[str] = set()

    # ---- logging --------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    # ---- cached results -------------------------------------------------------------------

    def _cached_dir(self, kind: str, key_obj: Any, make: Callable[[Path], None]) -> Path:
        out = self.cache / kind / f"{key_obj[0]}-{digest(key_obj)}"
        done = out / "done"
        if done.is_file():
            self._count(str(out), float(done.read_text() or 0))
            return out
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        make(out)
        seconds = time.perf_counter() - t
        done.write_text(f"{seconds:.3f}")
        self._count(str(out), seconds)
        self.log(f"{kind} {out.name}: {seconds:.1f}s")
        return out

    def train(self, name: str, start: Path, data: Path, **settings: Any) -> Path:
        """``finetune(start, data, **settings)``, cached. Defaults: the profile's step budget,
        batch size, learning rate (constant), max_length, and seed 0."""
        from surgery.train import finetune

        s = {"steps": self.p.steps, "batch_size": self.p.batch_size, "lr": self.lr,
             "max_length": self.p.max_length, "seed": 0, "device": self.device, **settings}

        def make(out: Path) -> None:
            finetune(str(start), str(data), out=out, force=True, **s)

        return self._cached_dir("runs", [name, identity(start), identity(data), s], make)

    def save(self, name: str, weights: Any, key: Any) -> Path:
        """Write a lazy ``Weights`` expression, cached under ``key`` (what it depends on)."""
        return self._cached_dir("merges", [name, key],
                                lambda out: weights.save(out, force=True, device="cpu"))

    def made(self, name: str, key: Any, make: Callable[[Path], None]) -> Path:
        """Any other cached output directory (``make(out)`` writes it)."""
        return self._cached_dir("made", [name, key], make)

    def _evaluate(self, model: Path, data: Path, metric: str) -> list[float]:
        """[score, seconds it took]."""
        from surgery.evaluate import evaluate

        t = time.perf_counter()
        r = evaluate(model, data, metric, batch_size=16, device=self.device,
                     max_length=self.text_length if metric == "perplexity"
                     else self.p.max_length)
        seconds = time.perf_counter() - t
        self.log(f"{metric} of {Path(model).name} on {Path(data).parent.name}/"
                 f"{Path(data).name}: {r.value:.4f} ({seconds:.1f}s)")
        return [r.value, seconds]

    def _count(self, key: str, seconds: float) -> None:
        if key not in self._counted:  # a result shared by several rows costs once
            self._counted.add(key)
            self.compute += seconds

    def _cached_score(self, key: str) -> float:
        value, seconds = self._scores[key]
        self._count(key, seconds)
        return value

    def _score(self, model: Path, data: Path, metric: str) -> float:
        key = digest([identity(model), identity(data), metric])
        if key not in self._scores:
            self._scores[key] = self._evaluate(model, data, metric)
            self._scores_path.write_text(json.dumps(self._scores, indent=0))
        return self._cached_score(key)

    def scores_of(self, name: str, weights: Any, key: Any,
                  wanted: Sequence[tuple[fdata.Task | None, str]]) -> list[float]:
        """Exact match (or, for task None, control perplexity) of a lazy ``Weights`` on each
        (task, split) of ``wanted``: written to a scratch directory only if a score is not
        cached under ``key`` yet, and deleted after (a search writes many candidates). A
        plain ``load(DIR)`` is scored from ``DIR`` itself, under its own identity."""
        from surgery.expr.node import LoadNode

        node = weights.node
        if isinstance(node, LoadNode) and Path(node.checkpoint.source).is_dir():
            model = Path(node.checkpoint.source)
            return [self.score(model, task, split) if task is not None
                    else self.control_ppl(model) for task, split in wanted]
        keys = [digest(["weights", name, key, t.module if t else "control", split])
                for t, split in wanted]
        if any(k not in self._scores for k in keys):
            tmp = self.cache / "scratch" / f"{name}-{digest(key)}"
            shutil.rmtree(tmp, ignore_errors=True)
            start = time.perf_counter()
            weights.save(tmp, force=True, device="cpu", hash_inputs=False)
            write = (time.perf_counter() - start) / len(keys)  # shared by the scores
            try:
                for k, (task, split) in zip(keys, wanted, strict=True):
                    if k not in self._scores:
                        value, seconds = (
                            self._evaluate(tmp, task.path(split), "exact_match")
                            if task is not None
                            else self._evaluate(tmp, self.control, "perplexity"))
                        self._scores[k] = [value, seconds + write]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._scores_path.write_text(json.dumps(self._scores, indent=0))
        return [self._cached_score(k) for k in keys]

    def score(self, model: Path, task: fdata.Task, split: str = "test") -> float:
        """Exact match of the greedy answer on a task split."""
        return self._score(model, task.path(split), "exact_match")

    def task_ppl(self, model: Path, task: fdata.Task, split: str = "test") -> float:
        """Perplexity of the reference answers (completion tokens only)."""
        return self._score(model, task.path(split), "perplexity")

    def control_ppl(self, model: Path) -> float:
        return self._score(model, self.control, "perplexity")

    def accuracy(self, model: Path, split: str = "test") -> float:
        return self._score(model, self.classify.labelled[split], "accuracy")

    # ---- shared fine-tunes ----------------------------------------------------------------

    def finetuned(self, task: fdata.Task, seed: int, **settings: Any) -> Path:
        """The plain SFT of the causal LM on ``task`` (the row-shared fine-tune)."""
        return self.train(f"sft-{task.module}", self.models.lm, task.path("train"),
                          seed=seed, **settings)

    def classifier_finetuned(self, seed: int) -> Path:
        return self.train("clf", self.models.classifier, self.classify.labelled["train"],
                          seed=seed, lr=self.classifier_lr, batch_size=16)
