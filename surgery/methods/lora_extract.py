"""LoRA extraction: a fine-tune's task vector τ = θ_ft − θ_base as a PEFT LoRA adapter, by a
truncated SVD per linear layer (as ``mergekit-extract-lora``).

For each linear layer, τ = U S Vᵀ (float32, thin SVD); with r' = min(r, out, in) the adapter
holds A = √S_r' V_r'ᵀ (r' × in) and B = U_r' √S_r' (out × r'), so B A is the best rank-r'
approximation of τ (Eckart–Young) and the layer's relative Frobenius error is
‖τ − B A‖ / ‖τ‖ = √(Σ_{i>r'} s_i²) / √(Σ s_i²). With ``distribute_scale=False`` A = S V ᵀ and
B = U, as mergekit's ``--no-distribute-scale``. ``lora_alpha`` equals each layer's rank, so
PEFT's scale α/r is 1 and ``PeftModel.from_pretrained(base, ADAPTER)`` computes base + B A.

Differences from mergekit 0.1.5, each deliberate: GPT-2's ``Conv1D`` layers (weights stored
in × out) are decomposed (``fan_in_fan_out: true``) where mergekit saves them at full rank;
changed biases of decomposed layers go into ``lora_B.bias`` (``lora_bias: true``) instead of
being dropped or saved whole; embeddings, norms and the head are kept at full rank only when
asked (``keep_full``), and every changed tensor the adapter does not carry is reported rather
than left out in silence; ``target_modules`` lists full module names, so no other module of
the same short name is caught. The A and B of a layer equal mergekit's (same SVD).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from surgery.engine.run import parse_dtype, provenance_record
from surgery.engine.stream import StreamOptions, resolve_device, stream_tensors
from surgery.errors import ShapeMismatchError, UsageError
from surgery.expr import Weights
from surgery.expr.weights import weights_label
from surgery.methods.soup import Params
from surgery.names import TensorKind, tensor_kind
from surgery.writer import PlannedTensor, ShardWriter

LORA_EXTRACT_REF = "LoRA (arXiv 2106.09685), extracted by truncated SVD as mergekit-extract-lora"
FULL_KINDS = ("embedding", "norm", "head", "bias", "other")
PREFIX = "base_model.model."


@dataclass
class LayerReport:
    module: str
    rank: int
    relative_error: float
    norm: float


@dataclass
class ExtractEvent:
    """Reported after each layer: ``done`` of ``total`` layers."""

    done: int
    total: int
    module: str


@dataclass
class LoraExtraction:
    path: Path
    layers: list[LayerReport]
    full_modules: list[str]
    uncaptured: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((r.relative_error for r in self.layers), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(r.relative_error for r in self.layers) / max(1, len(self.layers))


def low_rank(tau: torch.Tensor, rank: int, distribute_scale: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative Frobenius error) of the rank-``rank`` truncation of ``tau`` (out × in,
    float32)."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    r = min(rank, s.shape[0])
    if distribute_scale:
        root = torch.sqrt(s[:r])
        a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    else:
        a, b = s[:r, None] * vh[:r], u[:, :r].clone()
    total = float(torch.sum(s.double() ** 2))
    rest = float(torch.sum(s[r:].double() ** 2))
    return a, b, math.sqrt(rest / total) if total > 0 else 0.0


def _meta_modules(config: dict, where: str
                  ) -> tuple[dict[str, torch.nn.Module], tuple[str, str] | None]:
    """The linear, embedding and norm modules transformers builds for this config (on the
    meta device), and (head, input embedding) when the head shares the embedding's weight."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None or "model_type" not in config:
        raise UsageError(f"{where}: config.json names no transformers architecture "
                         f"({archs or 'none'}); cannot find its linear layers")
    built = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = cls(built)
    named = {id(m): n for n, m in model.named_modules()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = None
    if head is not None and embed is not None and head.weight is embed.weight:
        tied = (named[id(head)], named[id(embed)])
    modules = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear | Conv1D | torch.nn.Embedding)
               or tensor_kind(n + ".weight") == TensorKind.NORM}
    return modules, tied


def _task_type(config: dict) -> str | None:
    arch = (config.get("architectures") or [""])[0]
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if arch.endswith(suffix):
            return task
    return None


def _compile(patterns: Sequence[str] | None, what: str) -> list[Any]:
    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise UsageError(f"{what}: {p!r} is not a valid regex ({e})") from None
    return out


def extract_lora(finetuned: Weights, base: Weights, out: str | Path, *, rank: int,
                 keep_full: Sequence[str] = (), include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, distribute_scale: bool = True,
                 dtype: str | torch.dtype | None = None, force: bool = False,
                 device: str = "cpu",
                 progress: Callable[[ExtractEvent], None] | None = None) -> LoraExtraction:
    """Write ``finetuned`` − ``base`` as a PEFT LoRA adapter directory ``out``
    (``adapter_config.json``, ``adapter_model.safetensors``, ``extraction.json`` with each
    layer's rank and relative error, and a card). ``keep_full`` names tensor kinds
    (embedding, norm, head, ...) whose modules go into ``modules_to_save`` at full rank;
    ``include``/``exclude`` are regexes over module names restricting the decomposed
    layers. Checked from headers before a weight is read; ``out`` appears only when
    complete. ``dtype``: of A and B (default: the fine-tune's)."""
    if rank < 1:
        raise UsageError(f"rank: {rank} must be at least 1")
    for kind in keep_full:
        if kind not in FULL_KINDS and kind not in ("attention", "mlp"):
            raise UsageError(f"keep_full: unknown kind {kind!r} (kinds: "
                             f"{', '.join(FULL_KINDS)})")
    tau = finetuned - base  # checks names and shapes from the headers
    config = finetuned.config
    where = weights_label(finetuned)
    modules, tied = _meta_modules(config, where)
    names = set(finetuned.names)
    incl, excl = _compile(include, "include"), _compile(exclude, "exclude")
    from transformers.pytorch_utils import Conv1D

    targets: list[tuple[str, bool]] = []  # (module, is Conv1D)
    full: list[str] = []
    for mod_name, module in modules.items():
        weight = mod_name + ".weight"
        if weight not in names:
            continue  # tied to another module (a tied head), or named otherwise
        kind = tensor_kind(weight).value
        if kind in keep_full:
            full.append(mod_name)
            continue
        linear = isinstance(module, torch.nn.Linear | Conv1D)
        if not linear or kind not in ("attention", "mlp", "other"):
            continue
        if incl and not any(r.search(mod_name) for r in incl):
            continue
        if any(r.search(mod_name) for r in excl):
            continue
        targets.append((mod_name, isinstance(module, Conv1D)))
    for pattern in [*(include or []), *(exclude or [])]:
        if not any(re.search(pattern, m) for m in modules):
            raise UsageError(f"include/exclude: {pattern!r} matches no module of {where}")
    if not targets:
        raise UsageError(f"{where}: no linear layer to decompose (check include/exclude)")
    conv = {c for _, c in targets}
    if len(conv) > 1:
        raise UsageError(f"{where}: the chosen layers mix Linear and Conv1D modules, which one "
                         "PEFT adapter cannot hold (fan_in_fan_out); exclude one kind")
    fan_in_fan_out = conv == {True}
    biases = [m + ".bias" for m, _ in targets if m + ".bias" in names]
    full_tensors = [n for m in full for n in (m + ".weight", m + ".bias") if n in names]
    # A head tied to a kept embedding is saved too, with the embedding's values: PEFT copies
    # each module it keeps whole, which unties the pair (and knows the names of only some).
    aliases: dict[str, str] = {}
    if tied is not None and tied[1] in full and tied[0] not in full:
        full.append(tied[0])
        aliases[PREFIX + tied[0] + ".weight"] = tied[1] + ".weight"
    out_dtype = parse_dtype(dtype)

    def shape(module: str) -> tuple[int, int]:
        s = finetuned.spec(module + ".weight").shape
        return (s[1], s[0]) if fan_in_fan_out else (s[0], s[1])  # (out, in)

    ranks = {m: min(rank, *shape(m)) for m, _ in targets}
    planned: list[PlannedTensor] = []
    order: list[str] = []  # the tensors of tau to stream, in the adapter file's order
    for m, _ in targets:
        o, i = shape(m)
        dt = out_dtype or finetuned.spec(m + ".weight").dtype
        planned += [PlannedTensor(f"{PREFIX}{m}.lora_A.weight", (ranks[m], i), dt),
                    PlannedTensor(f"{PREFIX}{m}.lora_B.weight", (o, ranks[m]), dt)]
        order.append(m + ".weight")
        if biases:
            planned.append(PlannedTensor(f"{PREFIX}{m}.lora_B.bias", (o,), dt))
            if m + ".bias" in names:
                order.append(m + ".bias")
    planned += [PlannedTensor(PREFIX + n, finetuned.spec(n).shape, finetuned.spec(n).dtype)
                for n in full_tensors]
    planned += [PlannedTensor(k, finetuned.spec(n).shape, finetuned.spec(n).dtype)
                for k, n in aliases.items()]

    final = Path(out)
    inputs = {os.path.realpath(ck.root) for ck in tau.node.checkpoints()}
    if os.path.realpath(final) in inputs:
        raise UsageError(f"{final} is an input")
    if final.exists() and not force:
        raise UsageError(f"{final} exists (use --force to replace it)")
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    dev = resolve_device(device)
    opts = StreamOptions(device=dev, seed=0)
    reports: list[LayerReport] = []
    writer = ShardWriter(partial / "adapter_model.safetensors", planned, {"format": "pt"})
    stream = stream_tensors(tau.node, order, opts, lambda _: torch.float32)
    try:
        for name, t in stream:
            module, leaf = name.rsplit(".", 1)
            dt = out_dtype or finetuned.spec(name).dtype
            if leaf == "bias":
                writer.add(f"{PREFIX}{module}.lora_B.bias", t.to(dt))
                continue
            mat = t.T if fan_in_fan_out else t
            a, b, err = low_rank(mat.to(dev), rank, distribute_scale)
            writer.add(f"{PREFIX}{module}.lora_A.weight", a.to("cpu", dt).contiguous())
            writer.add(f"{PREFIX}{module}.lora_B.weight", b.to("cpu", dt).contiguous())
            if biases and module + ".bias" not in names:  # unchanged by construction: zero
                writer.add(f"{PREFIX}{module}.lora_B.bias", torch.zeros(mat.shape[0], dtype=dt))
            reports.append(LayerReport(module, ranks[module], err, float(torch.linalg.norm(t))))
            if progress:
                progress(ExtractEvent(len(reports), len(targets), module))
        stream.close()
        if full_tensors:
            stream = stream_tensors(finetuned.node, full_tensors, opts,
                                    lambda n: finetuned.spec(n).dtype)
            for name, t in stream:
                writer.add(PREFIX + name, t)
        for key, name in aliases.items():
            stream = stream_tensors(finetuned.node, [name], opts,
                                    lambda n: finetuned.spec(n).dtype)
            for _, t in stream:
                writer.add(key, t)
        writer.finish()
    except BaseException:
        writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        stream.close()
    captured = set(order) | set(full_tensors)
    uncaptured = [n for n, t in stream_tensors(
        tau.node, [n for n in tau.names if n not in captured and
                   finetuned.spec(n).dtype.is_floating_point], opts, lambda _: torch.float32)
        if bool(t.any())]
    provenance = provenance_record(tau.node, 0, out_dtype, None, dev)
    top = max(ranks.values())
    pattern = {m: r for m, r in ranks.items() if r != top}
    adapter_config = {
        "peft_type": "LORA", "task_type": _task_type(config),
        "base_model_name_or_path": weights_label(base), "r": top, "lora_alpha": top,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": [m for m, _ in targets],
        "modules_to_save": full or None, "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0, "bias": "none", "lora_bias": bool(biases), "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True}
    (partial / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    record = {"rank": rank, "distribute_scale": distribute_scale, "keep_full": list(keep_full),
              "include": list(include or []), "exclude": list(exclude or []),
              "layers": [asdict(r) for r in reports], "full_modules": full,
              "uncaptured": uncaptured, "provenance": provenance}
    (partial / "extraction.json").write_text(json.dumps(record, indent=2) + "\n")
    (partial / "README.md").write_text(_card(where, weights_label(base), reports, full, uncaptured,
                                             rank))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return LoraExtraction(final, reports, full, uncaptured)


def _card(model: str, base: str, reports: list[LayerReport], full: list[str],
          uncaptured: list[str], rank: int) -> str:
    worst = max(reports, key=lambda r: r.relative_error)
    mean = sum(r.relative_error for r in reports) / len(reports)
    lines = ["---", "library_name: peft", f"base_model: {base}", "tags: [lora, weight-surgery]",
             "---", "", f"# LoRA adapter extracted from `{model}`", "",
             f"Task vector `{model}` − `{base}` as a rank-{rank} LoRA adapter (truncated SVD "
             f"per linear layer, {len(reports)} layers), made with weight-surgery.", "",
             f"- relative Frobenius error ‖τ − BA‖/‖τ‖: mean {mean:.4f}, worst "
             f"{worst.relative_error:.4f} (`{worst.module}`)",
             f"- modules kept at full rank: {len(full)}"]
    if uncaptured:
        lines.append(f"- changed tensors the adapter does not carry: {len(uncaptured)} "
                     f"(e.g. `{uncaptured[0]}`)")
    return "\n".join(lines) + "\n"


class ExtractLoraParams(Params):
    model: str = Field(description="the fine-tune")
    base: str
    rank: int = Field(ge=1)
    out: str = Field(description="adapter directory")
    keep_full: list[str] = Field(default_factory=list, description="kinds kept at full rank")
    include: list[str] | None = Field(None, description="regexes of modules to decompose")
    exclude: list[str] | None = Field(None, description="regexes of modules to leave out")
    distribute_scale: bool = True
    dtype: str | None = None


class ExtractedAdapter:
    """What ``op: extract_lora`` makes: the adapter directory ``out``, written when the recipe
    runs."""

    kind = "adapter"

    def __init__(self, model: Weights, base: Weights, params: ExtractLoraParams) -> None:
        if set(model.names) != set(base.names):
            raise ShapeMismatchError("extract_lora: the fine-tune and the base hold different "
                                     "tensors")
        self.model, self.base, self.params = model, base, params
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            p = self.params
            self._path = extract_lora(self.model, self.base, p.out, rank=p.rank,
                                      keep_full=p.keep_full, include=p.include,
                                      exclude=p.exclude, distribute_scale=p.distribute_scale,
                                      dtype=p.dtype, force=True).path
        return self._path
