"""The benchmark's data, all generated or read offline and cached:

- task splits from DeepMind's ``mathematics_dataset`` generator (pip ``mathematics-dataset``),
  written as prompt+completion JSONL (``Question: ...\\nAnswer:`` / `` answer``) and, for the
  questions answered True or False, as text+label JSONL for classifiers;
- control text for forgetting: fortunes of Debian's ``fortunes`` package, a fixed held-out
  sample scored by perplexity, and a disjoint sample for calibration (CorDA's
  knowledge-preserving covariance).

The generator needs ``sympy==1.5.1`` (newer releases break its import) while PyTorch needs a
current sympy, so it runs in a subprocess whose ``PYTHONPATH`` is a private install
(``pip install --target``): ``$MATHEMATICS_DATASET_SITE``, by default
``~/.cache/weight-surgery/mathematics-dataset``, made on first use or by
``python -m bench.fidelity.data --install``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint import hashing

GENERATOR = ["mathematics-dataset==1.0.1", "sympy==1.5.1"]
FORTUNES = Path("/usr/share/games/fortunes")
# Generated with one seed per (module, split); every split's questions are disjoint from
# the earlier splits' (train, then validation, then test).
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}

_GENERATE = r"""
import json, random, sys
import numpy as np
from mathematics_dataset.modules import modules
from mathematics_dataset import generate_settings as gs

module, level, counts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
def entropy(r, lo=level / 3, hi=(level + 1) / 3):
    return (r[0] + lo * (r[1] - r[0]), r[0] + hi * (r[1] - r[0]))
def flat(d, prefix=None, out=None):
    out = {} if out is None else out
    for k, v in d.items():
        name = prefix + "__" + k if prefix else k
        flat(v, name, out) if isinstance(v, dict) else out.__setitem__(name, v)
    return out
found = flat(modules.train(entropy))
if module not in found:
    sys.exit("unknown module " + module + "; known: " + ", ".join(sorted(found)))
seen, out = set(), {}
for split, (seed, n) in counts.items():
    random.seed(seed); np.random.seed(seed)
    rows, tries = [], 0
    while len(rows) < n and tries < 50 * n:
        tries += 1
        p = found[module]()
        q, a = str(p.question), str(p.answer)
        if len(q) > gs.MAX_QUESTION_LENGTH or len(a) > gs.MAX_ANSWER_LENGTH or q in seen:
            continue
        seen.add(q)
        rows.append([q, a])
    out[split] = rows
print(json.dumps(out))
"""


def digest(obj: object) -> str:
    """A short content key of a JSON-able object (the cache's folder names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()
                          ).hexdigest()[:12]


def cache_dir() -> Path:
    return hashing.cache_dir() / "fidelity"


def generator_path() -> Path:
    """The private install of the generator (made on first use). A tool, not a result: it
    does not move with ``$WEIGHT_SURGERY_CACHE``."""
    env = os.environ.get("MATHEMATICS_DATASET_SITE")
    site = Path(env) if env else Path.home() / ".cache" / "weight-surgery" / "mathematics-dataset"
    if not (site / "mathematics_dataset").is_dir():
        print(f"installing {' '.join(GENERATOR)} into {site} (it needs its own sympy)",
              file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                               "--disable-pip-version-check", "--target", str(site),
                               *GENERATOR], capture_output=True, text=True)
        if not (site / "mathematics_dataset").is_dir():
            raise SystemExit(f"pip could not install {' '.join(GENERATOR)} into {site}:\n"
                             + done.stderr[-2000:])
    return site


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def prompt_of(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Task:
    """One generated module: its split files (prompt+completion) and, where the module has
    True/False questions, their text+label files."""

    module: str
    files: dict[str, Path]
    labelled: dict[str, Path]

    def path(self, split: str) -> Path:
        return self.files[split]


def task(module: str, counts: dict[str, int], level: int = 0) -> Task:
    """Generate (or reuse) ``counts[split]`` questions of ``module`` per split at difficulty
    ``level`` (0 easy, 1 medium, 2 hard: the generator's train-easy/medium/hard entropy)."""
    key = digest([module, level, counts, SPLIT_SEEDS])
    where = cache_dir() / "data" / f"{module}-{key}"
    files = {s: where / f"{s}.jsonl" for s in counts}
    labelled = {s: where / f"{s}.labels.jsonl" for s in counts}
    if not all(f.is_file() for f in [*files.values(), *labelled.values()]):
        where.mkdir(parents=True, exist_ok=True)
        arg = json.dumps({s: [SPLIT_SEEDS[s], n] for s, n in counts.items()})
        env = {**os.environ, "PYTHONPATH": str(generator_path())}
        done = subprocess.run([sys.executable, "-c", _GENERATE, module, str(level), arg],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"mathematics_dataset, module {module}: "
                             f"{done.stderr.strip().splitlines()[-1]}")
        for split, rows in json.loads(done.stdout).items():
            _write(files[split], [{"prompt": prompt_of(q), "completion": " " + a}
                                  for q, a in rows])
            _write(labelled[split], [{"text": q, "label": int(a == "True")}
                                     for q, a in rows if a in ("True", "False")])
    return Task(module, files, labelled)


def fortunes(min_chars: int = 80, max_chars: int = 400) -> list[str]:
    """Every prose fortune of the English data files (not the offensive ones), whitespace
    collapsed; entries with tabs, very short or long ones, and ones with few letters (art,
    tables, code) are left out."""
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES}: not found; install Debian's fortunes package "
                         "(apt-get install fortunes) for the control text")
    out = []
    for f in sorted(FORTUNES.iterdir()):
        if f.suffix or f.is_dir() or f.name in ("art", "ascii-art"):
            continue
        for entry in f.read_text(errors="replace").split("\n%\n"):
            if "\t" in entry:
                continue
            text = " ".join(entry.split())
            letters = sum(c.isalpha() or c.isspace() for c in text)
            if min_chars <= len(text) <= max_chars and letters >= 0.9 * len(text):
                out.append(text)
    return out


def control(n_eval: int, n_calibration: int) -> tuple[Path, Path]:
    """Held-out control text (perplexity) and a disjoint calibration sample, as text JSONL,
    drawn with a fixed seed."""
    texts = fortunes()
    random.Random(0).shuffle(texts)
    if len(texts) < n_eval + n_calibration:
        raise SystemExit(f"{FORTUNES}: only {len(texts)} usable fortunes")
    where = cache_dir() / "data"
    where.mkdir(parents=True, exist_ok=True)
    ev = where / f"control-{n_eval}.jsonl"
    cal = where / f"calibration-{n_calibration}.jsonl"
    _write(ev, [{"text": t} for t in texts[:n_eval]])
    _write(cal, [{"text": t} for t in texts[-n_calibration:]])
    return ev, cal


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        raise SystemExit("usage: python -m bench.fidelity.data --install")
    print(generator_path())
