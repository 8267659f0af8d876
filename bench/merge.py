"""Merge benchmark: this toolkit against mergekit and the I/O floor, on synthetic Llama-shaped
checkpoints (a base and three fine-tunes, bf16), each contender in its own process.

    python -m bench.merge                      # 1B, all methods, writes bench/RESULTS.md
    python -m bench.merge --size 0.5B,1B,2B    # how time and memory grow with model size
    python -m bench.merge --tiny --out /tmp/r.md
    python -m bench.merge --device cuda        # on a GPU (both tools), bench/RESULTS-cuda.md
    python -m bench.merge --ray                # Ray executor, 1 and 2 workers: RESULTS-ray.md

Before every measured process the page cache is emptied (``sync`` and ``drop_caches`` when
permitted, else ``posix_fadvise(DONTNEED)`` on the inputs), so every contender starts cold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.checkpoint import open_checkpoint
from surgery.checkpoint.hashing import cached_sha256, file_sha256
from surgery.methods.registry import OPERATIONS
from surgery.writer import PlannedTensor, ShardWriter, plan_shards, shard_names, write_index

HERE = Path(__file__).resolve().parent
SHARD_BYTES = 2 * 10**9
FINETUNES = ("ft1", "ft2", "ft3")


@dataclass(frozen=True)
class Shape:
    """Llama geometry: width, MLP width, blocks, vocabulary, key/value width."""

    hidden: int
    inter: int
    layers: int
    vocab: int
    kv: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.inter, self.kv
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        return [*out, ("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def params(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": self.hidden, "intermediate_size": self.inter,
                "num_hidden_layers": self.layers, "num_attention_heads": self.hidden // 64,
                "num_key_value_heads": self.kv // 64, "head_dim": 64, "vocab_size": self.vocab,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


# Same widths at every size (Llama-3.2-1B-like), so the largest tensor is the same and only the
# depth grows: peak memory should not move with the size.
SIZES = {
    "tiny": Shape(hidden=128, inter=512, layers=2, vocab=1024, kv=64),
    "0.5B": Shape(hidden=2048, inter=8192, layers=7, vocab=32000, kv=512),
    "1B": Shape(hidden=2048, inter=8192, layers=16, vocab=32000, kv=512),
    "2B": Shape(hidden=2048, inter=8192, layers=32, vocab=32000, kv=512),
}

# How each method is written for both tools. Ours: one recipe step; mergekit: its config.
METHODS: dict[str, tuple[str, dict]] = {
    "linear": ("{op: linear, models: [ft1, ft2, ft3]}",
               {"merge_method": "linear", "parameters": {"normalize": True},
                "models": [{"model": m, "parameters": {"weight": 1.0}} for m in FINETUNES]}),
    "task_arithmetic": (
        "{op: task_arithmetic, base: base, models: [ft1, ft2, ft3]}",
        {"merge_method": "task_arithmetic", "base_model": "base",
         "parameters": {"normalize": False},
         "models": [{"model": m, "parameters": {"weight": 1.0}} for m in FINETUNES]}),
    "ties": ("{op: ties, base: base, models: [ft1, ft2, ft3], density: 0.2}",
             {"merge_method": "ties", "base_model": "base",
              "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.2}}
                         for m in FINETUNES]}),
    "dare_ties": ("{op: dare_ties, base: base, models: [ft1, ft2, ft3], density: 0.2}",
                  {"merge_method": "dare_ties", "base_model": "base",
                   "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.2}}
                              for m in FINETUNES]}),
    "della": ("{op: della, base: base, models: [ft1, ft2, ft3], density: 0.4, epsilon: 0.1}",
              {"merge_method": "della", "base_model": "base",
               "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.4,
                                                      "epsilon": 0.1}} for m in FINETUNES]}),
    "breadcrumbs": (
        "{op: breadcrumbs, base: base, models: [ft1, ft2, ft3], density: 0.9, gamma: 0.01}",
        {"merge_method": "breadcrumbs", "base_model": "base",
         "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.01}}
                    for m in FINETUNES]}),
    "model_stock": ("{op: model_stock, base: base, models: [ft1, ft2, ft3]}",
                    {"merge_method": "model_stock", "base_model": "base",
                     "models": [{"model": m} for m in FINETUNES]}),
}
SAME_SEMANTICS = ("linear", "task_arithmetic", "ties")
SAME_SEMANTICS += ("breadcrumbs", "model_stock")  # della draws differ: statistics only


def _generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + sum(ord(c) * 31**k for k, c in enumerate(name)) % 2**40)
    return g


def build_models(shape: Shape, root: Path) -> dict[str, Path]:
    """Base and fine-tunes under ``root`` (kept between runs): base ~ N(0, 0.02²) (norms around
    1), each fine-tune = base + N(0, 0.002²), written tensor by tensor."""
    dirs = {n: root / n for n in ("base", *FINETUNES)}
    done = root / "complete.json"
    spec = json.dumps(shape.__dict__, sort_keys=True)
    if done.is_file() and done.read_text() == spec:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    planned = [PlannedTensor(n, s, torch.bfloat16) for n, s in shape.tensors()]
    shards = plan_shards(planned, SHARD_BYTES)
    fnames = shard_names(len(shards))
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(shape.config(), indent=2))
        if len(shards) > 1:
            write_index(d / "model.safetensors.index.json", zip(fnames, shards, strict=True))
    for fname, shard in zip(fnames, shards, strict=True):
        writers = {n: ShardWriter(d / fname, shard, {"format": "pt"}) for n, d in dirs.items()}
        for t in shard:
            g = _generator(0, t.name)
            base = torch.randn(t.shape, generator=g).mul_(0.02)
            if len(t.shape) == 1:
                base.add_(1.0)
            writers["base"].add(t.name, base.to(torch.bfloat16))
            for k, ft in enumerate(FINETUNES, start=1):
                noise = torch.randn(t.shape, generator=_generator(k, t.name)).mul_(0.002)
                writers[ft].add(t.name, noise.add_(base).to(torch.bfloat16))
                del noise
        for w in writers.values():
            w.finish()
    done.write_text(spec)
    return dirs


def drop_caches(files: list[Path]) -> str:
    """Empty the page cache; say how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "sync + drop_caches=3 before each process (all contenders start cold)"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "sync + posix_fadvise(DONTNEED) on every input before each process (cold inputs)"


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    peak_rss: int
    ok: bool = True
    note: str = ""


def measure(cmd: list[str], inputs: list[Path], log: Path, hashes: Path | None = None,
            repeat: int = 1, cold_hashes: bool = False, output: Path | None = None) -> Run:
    """Run ``cmd`` cold ``repeat`` times, each in its own process; the run of median wall
    time (wall time, CPU time and peak RSS from wait4). ``hashes``: the input-hash cache
    directory the process uses, emptied before each run with ``cold_hashes``. ``output``:
    removed before each run, untimed, so that no run pays for deleting the last one's."""
    runs = []
    for _ in range(repeat):
        if output is not None:
            shutil.rmtree(output, ignore_errors=True)
        if hashes is not None and cold_hashes:
            shutil.rmtree(hashes, ignore_errors=True)
        runs.append(_measure_once(cmd, inputs, log, hashes))
        if not runs[-1].ok:
            return runs[-1]
    return sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]


def _measure_once(cmd: list[str], inputs: list[Path], log: Path, hashes: Path | None) -> Run:
    drop_caches(inputs)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    if hashes is not None:
        env["WEIGHT_SURGERY_CACHE"] = str(hashes)
    done = subprocess.run([sys.executable, "-m", "bench.spawn", str(log), *cmd], env=env,
                          check=True, capture_output=True, text=True)
    got = json.loads(done.stdout)
    run = Run(got["wall_s"], got["cpu_s"], got["peak_rss"])
    if got["exit"] != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        run.ok, run.note = False, f"exit {got['exit']}: {tail[0][:120]}"
    return run


def compare(ours: Path, theirs: Path) -> str:
    """Element-wise agreement of two model directories, tensor by tensor."""
    a, b = open_checkpoint(str(ours)), open_checkpoint(str(theirs))
    if set(a.names) != set(b.names):
        return f"tensor names differ ({len(set(a.names) ^ set(b.names))} not in both)"
    total = equal = 0
    worst = 0.0
    for name in a.names:
        x, y = a.read(name), b.read(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        total += x.numel()
        equal += int((x.view(torch.int16) == y.view(torch.int16)).sum()) \
            if x.dtype == torch.bfloat16 else int((x == y).sum())
        diff = (x.float() - y.float()).abs()
        rel = diff / y.float().abs().clamp_min(1e-30)
        worst = max(worst, float(rel.max()))
    a.close()
    b.close()
    return (f"{equal}/{total} elements bit-identical ({100 * equal / total:.4f}%), "
            f"max relative difference {worst:.2e}")


@dataclass
class SizeResult:
    size: str
    params: int
    input_bytes: int
    output_bytes: int
    # (models read, "buffered" or "direct") -> the I/O floor's run
    floors: dict[tuple[str, str], Run] = field(default_factory=dict)
    runs: dict[tuple[str, str], Run] = field(default_factory=dict)
    agreement: dict[str, str] = field(default_factory=dict)

    def floor(self, method: str) -> Run | None:
        """The faster of the buffered and direct floors of the models ``method`` reads."""
        key = _floor_key(method.split(",")[0])
        runs = [r for (k, _), r in self.floors.items() if k == key and r.ok]
        return min(runs, key=lambda r: r.wall_s) if runs else None


def _floor_key(method: str) -> str:
    """The models a method reads, as the floor's key."""
    return ",".join(FINETUNES if method == "linear" else ("base", *FINETUNES))


def bench_size(size: str, methods: list[str], mergekit: bool, work: Path,
               cache: Path, repeat: int = 1, device: str = "cpu") -> SizeResult:
    shape = SIZES[size]
    dirs = build_models(shape, cache / size)
    files = sorted(p for d in dirs.values() for p in d.glob("*.safetensors"))
    ours_inputs = {n: str(d) for n, d in dirs.items()}
    in_bytes = sum(p.stat().st_size for p in files)
    out_bytes = shape.params() * 2
    result = SizeResult(size, shape.params(), in_bytes, out_bytes)
    # The floor of each method reads the models it reads (linear: the fine-tunes alone).
    for key in dict.fromkeys(_floor_key(m) for m in methods):
        inputs = sorted(p for n in key.split(",") for p in dirs[n].glob("*.safetensors"))
        for mode in ("buffered", "direct"):
            floor_dir = work / "floor"
            result.floors[(key, mode)] = measure(
                [sys.executable, "-m", "bench.iofloor", mode, str(floor_dir), str(out_bytes),
                 str(SHARD_BYTES), *map(str, inputs)], inputs, work / "floor.log",
                repeat=repeat, output=floor_dir)
            shutil.rmtree(floor_dir, ignore_errors=True)
    warm = cache / "hashes"
    os.environ["WEIGHT_SURGERY_CACHE"] = str(warm)
    for f in files:  # our runs find the provenance hashes of their inputs cached ...
        cached_sha256(f)
    cold = work / "no-hashes"  # ... except one, which hashes them while it merges
    runs = [(m, m, warm) for m in methods]
    if "task_arithmetic" in methods:
        runs.append(("task_arithmetic", "task_arithmetic, cold input hashes", cold))
    digests: dict[str, dict[str, str]] = {}
    for method, label, hashes in runs:
        step, mk_config = METHODS[method]
        outs: dict[str, Path] = {}
        op = step.split(",")[0].removeprefix("{op: ")
        if op in OPERATIONS:
            out = work / f"ours-{method}"
            recipe = work / f"{method}.yaml"
            recipe.write_text(
                "inputs: " + json.dumps(ours_inputs) + f"\nsteps:\n  merged: {step}\n"
                f"output: {{from: merged, path: {out}, dtype: bfloat16, shard_size: 2GB, "
                f"device: {device}}}\n")
            result.runs[("ours", label)] = measure(
                [sys.executable, "-c", "from surgery_cli.main import run; run()", "apply",
                 str(recipe), "--force", "--quiet", "--profile"], files,
                work / f"ours-{method}.log", hashes, repeat, cold_hashes=hashes is cold,
                output=out)
            outs["ours"] = out
        if "ours" in outs and result.runs[("ours", label)].ok:
            digest = _digests(outs["ours"])
            if hashes is cold:
                same = digest == digests.get(method)
                result.agreement[label] = ("output byte-identical to the warm run's" if same
                                           else "output differs from the warm run's")
            digests[method] = digest
        if hashes is cold:
            shutil.rmtree(out, ignore_errors=True)
            continue
        if mergekit:
            out = work / f"mergekit-{method}"
            config = dict(mk_config, dtype="float32", out_dtype="bfloat16")
            config["models"] = [dict(m, model=ours_inputs[m["model"]]) for m in config["models"]]
            if "base_model" in config:
                config["base_model"] = ours_inputs[config["base_model"]]
            mk_yaml = work / f"{method}-mergekit.yaml"
            mk_yaml.write_text(json.dumps(config, indent=1))
            result.runs[("mergekit", method)] = measure(
                [sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()",
                 str(mk_yaml), str(out), "--lazy-unpickle", "--out-shard-size", "1B",
                 "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                 "--random-seed", "0", *(["--cuda"] if device == "cuda" else [])], files,
                work / f"mergekit-{method}.log", output=out)
            outs["mergekit"] = out
        if method in SAME_SEMANTICS and len(outs) == 2 and all(
                result.runs[(k, method)].ok for k in outs):
            result.agreement[method] = compare(outs["ours"], outs["mergekit"]) + (
                "; mergekit keeps the entries tied at the trim threshold in the order of an "
                "unstable torch.argsort, ours by lowest flat index"
                if method in ("ties", "breadcrumbs") else "")
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return result


def _digests(model: Path) -> dict[str, str]:
    """SHA-256 of each file of a model directory."""
    return {f.name: file_sha256(f) for f in sorted(model.iterdir()) if f.is_file()}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _cell(run: Run | None) -> str:
    if run is None:
        return "n/a"
    if not run.ok:
        return f"failed ({run.note})"
    return f"{run.wall_s:.1f} s / {run.cpu_s:.1f} s / {_gb(run.peak_rss)}"


def render(results: list[SizeResult], command: str, cache_note: str, repeat: int,
           device: str = "cpu") -> str:
    repeat_note = (f"; the floor and our runs: the run of median wall time of {repeat}, "
                   "mergekit: one run" if repeat > 1 else "; one run each")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    lines = [
        "# Merge benchmark" + (" on a GPU" if device == "cuda" else ""), "",
        f"Regenerate: `{command}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {_gb(mem)} RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"mergekit {_version('mergekit')}"
        + (f"; GPU: {torch.cuda.get_device_name()}." if device == "cuda" else "."), "",
        "Inputs: synthetic Llama-shaped checkpoints in bf16 (hidden 2048, MLP 8192, vocabulary "
        "32000, untied head; the size sets the depth), a base and three fine-tunes (base + "
        "N(0, 0.002²) noise), in 2 GB shards. Output: bf16, float32 compute, 2 GB shards "
        "(mergekit: `--out-shard-size 1B` parameters, `dtype: float32`, `out_dtype: bfloat16`, "
        f"`--lazy-unpickle`, {'`--cuda`' if device == 'cuda' else 'CPU'}; ours: `device: "
        f"{device}`). Linear averages the three fine-tunes; task arithmetic, TIES "
        "and DARE-TIES add their three task vectors to the base (weights 1, density 0.2).", "",
        f"Page cache: {cache_note}. I/O floor: one process reads every input file the "
        "method reads once (linear: the three fine-tunes; the others: the base too), in 16 MB "
        "reads, and then writes the output's byte count in 2 GB shards, each fsync'd (as the "
        "engine does; mergekit does not fsync); once through the page cache (buffered) and "
        "once around it (O_DIRECT), and the faster of the two is the floor. The engine reads "
        "and writes large tensors around the cache too (surgery/checkpoint/directio.py).", "",
        "Each cell: wall time / CPU time (user+sys) / peak resident memory of the process "
        f"(`wait4` rusage){repeat_note}. Our runs record the SHA-256 of every input file in "
        "provenance, cached by path, size and mtime: every row but one finds them cached "
        "(warm); the row marked \"cold input hashes\" hashes all inputs during the merge, on "
        "a thread of its own; it checks that its output is byte-identical to the warm run's.", "",
    ]
    methods = list(dict.fromkeys(m for r in results for _, m in r.runs))
    for r in results:
        lines += [f"## {r.size}: {r.params / 1e9:.2f}B parameters, inputs {_gb(r.input_bytes)}, "
                  f"output {_gb(r.output_bytes)}", "",
                  "| I/O floor of | buffered | direct |", "|---|---|---|"]
        for key in dict.fromkeys(k for k, _ in r.floors):
            lines.append(f"| {key.replace(',', ', ')} | {_cell(r.floors.get((key, 'buffered')))}"
                         f" | {_cell(r.floors.get((key, 'direct')))} |")
        lines += ["", "| method | ours | mergekit | ours / mergekit (wall) | ours / floor (wall) |",
                  "|---|---|---|---|---|"]
        for m in methods:
            ours, theirs = r.runs.get(("ours", m)), r.runs.get(("mergekit", m))
            ratio = f"{ours.wall_s / theirs.wall_s:.3f} ({theirs.wall_s / ours.wall_s:.1f}x " \
                "faster)" if ours and theirs and ours.ok and theirs.ok else "n/a"
            base = r.floor(m)
            floor = f"{ours.wall_s / base.wall_s:.2f}" if ours and ours.ok and base else "n/a"
            lines.append(f"| {m} | {_cell(ours)} | {_cell(theirs)} | {ratio} | {floor} |")
        lines.append("")
        if r.size != "tiny":  # startup dominates the tiny size: no target applies
            lines += _targets(r, methods)
        for m, text in r.agreement.items():
            what = "ours" if "cold" in m else "ours vs mergekit (bf16 outputs)"
            lines.append(f"- {m}, {what}: {text}")
        lines.append("")
    lines += ["", "## On a cluster", "", "`python -m bench.merge --ray` measures the Ray executor "
              "against one process and estimates a 405B merge on N nodes (bytes per node, time "
              "at 2 GB/s per node): see `bench/RESULTS-ray.md`."]
    return "\n".join(lines)


# DESIGN.md's targets: (most wall time / the I/O floor's, least speed-up over mergekit).
TARGETS = {"linear": (1.5, 4.0), "task_arithmetic": (1.5, 4.0), "ties": (None, 10.0),
           "dare_ties": (None, 10.0)}
TARGETS.update({"della": (None, 10.0), "breadcrumbs": (None, 10.0),
                "model_stock": (1.5, 4.0)})
MEMORY_TARGET = 1.5e9  # bytes of peak resident memory, at 1B (and constant in model size)


def _targets(r: SizeResult, methods: list[str]) -> list[str]:
    """One line per method: each target, its figure here, met or missed."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = ["Targets (DESIGN.md):", ""]
    for m in methods:
        ours, theirs = r.runs.get(("ours", m)), r.runs.get(("mergekit", m))
        if m not in TARGETS or not ours or not ours.ok:
            continue
        most_floor, least_speedup = TARGETS[m]
        parts = []
        base = r.floor(m)
        if most_floor is not None and base is not None:
            ratio = ours.wall_s / base.wall_s
            parts.append(f"{ratio:.2f}x the I/O floor (at most {most_floor}x: "
                         f"{verdict(ratio <= most_floor)})")
        if theirs and theirs.ok:
            speedup = theirs.wall_s / ours.wall_s
            parts.append(f"{speedup:.1f}x faster than mergekit (at least {least_speedup:.0f}x: "
                         f"{verdict(speedup >= least_speedup)})")
        parts.append(f"peak {_gb(ours.peak_rss)} (under {MEMORY_TARGET / 1e9} GB: "
                     f"{verdict(ours.peak_rss < MEMORY_TARGET)})")
        lines.append(f"- {m}: " + "; ".join(parts))
    return [*lines, ""]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1B", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--tiny", action="store_true", help="the few-MB size (same as --size tiny)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both tools compute (cuda: mergekit with --cuda)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/RESULTS.md, or bench/RESULTS-cuda.md on cuda")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the floor and ours this many times and report the median "
                             "(mergekit runs once)")
    parser.add_argument("--keep-cache", action="store_true",
                        help="keep the inputs of every size (default: only 1B and tiny stay)")
    parser.add_argument("--ray", action="store_true",
                        help="the Ray executor against the single process (first of --methods,"
                             " default ties; first of --size), bench/RESULTS-ray.md")
    parser.add_argument("--ray-workers", default="1,2", help="with --ray: worker counts")
    args = parser.parse_args(argv)
    if args.ray:
        return _main_ray(args, argv)
    sizes = ["tiny"] if args.tiny else [s.strip() for s in args.size.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    out_path = args.out or HERE / ("RESULTS-cuda.md" if args.device == "cuda" else "RESULTS.md")
    for name, known in (("size", SIZES), ("method", METHODS)):
        bad = [v for v in (sizes if name == "size" else methods) if v not in known]
        if bad:
            parser.error(f"unknown {name} {bad[0]!r} (one of {', '.join(known)})")
    work = args.cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache_note = drop_caches([])
    results = []
    try:
        for size in sizes:
            results.append(bench_size(size, methods, not args.no_mergekit, work, args.cache,
                                      args.repeat, args.device))
            if size not in ("1B", "tiny") and not args.keep_cache:
                shutil.rmtree(args.cache / size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python -m bench.merge " + " ".join(sys.argv[1:] if argv is None else argv)
    out_path.write_text(render(results, command.strip(), cache_note, args.repeat, args.device)
                        + "\n")
    print(out_path.read_text())


def _main_ray(args: argparse.Namespace, argv: list[str] | None) -> None:
    from bench.ray_merge import bench_ray, render

    size = "tiny" if args.tiny else args.size.split(",")[0].strip()
    method = "ties" if args.methods == ",".join(METHODS) else args.methods.split(",")[0]
    work = args.cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        rows = bench_ray(size, method, [int(n) for n in args.ray_workers.split(",")], work,
                         args.cache, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python -m bench.merge " + " ".join(sys.argv[1:] if argv is None else argv)
    out_path = args.out or HERE / "RESULTS-ray.md"
    out_path.write_text(render(rows, size, method, command.strip(), args.repeat) + "\n")
    print(out_path.read_text())


if __name__ == "__main__":
    main()
