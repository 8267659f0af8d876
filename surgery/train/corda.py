"""CorDA: context-oriented decomposition adaptation (arXiv 2406.05223).

For each chosen linear layer W (``out×in``) the inputs X of the calibration examples give the
covariance C = mean over examples of X̂ᵀX̂, X̂ = X / |max X|; damped, C' = C + d·mean(diag C)·I,
d = 0.01 doubled until ‖C'C'⁻¹ − I‖_F < 0.05; the SVD W C' = U S Vᵀ with V ← (Vᵀ C'⁻¹)ᵀ orients
W by its context. The adapter takes r components: the smallest (``kpa``, knowledge-preserved:
what the data uses least is retrained) or the largest (``ipa``, instruction-previewed); with
scaling s = alpha/r, B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ and the frozen residual
W_res = W − s·B A, so residual plus adapter is the original model before training.

Numerically this is PEFT's ``preprocess_corda`` + ``init_lora_weights="corda"`` (the oracle of
the tests), with these choices:

- each example's X̂ᵀX̂ is computed in float32, as PEFT does, and summed over the examples in
  float64 (PEFT sums in float32; ``accumulate: float32`` gives PEFT's sums, and then PEFT's A,
  B and W_res, bit for bit). The sum's rounding is what grows with the number of examples;
  float64 products as well would double the covariance time on a CPU. The mean is, like
  PEFT, cast to float32 for the damped inverse and the SVD, so the damping criterion picks
  the same d. From the same covariance our A, B and W_res are PEFT's bit for bit; between
  float64 and float32 sums the ``kpa`` factors differ by a few 1e-3 relative on the tiny
  test models (``ipa``: about 2e-4): the smallest components of W C' are the most sensitive
  to C;
- as PEFT, each example's activations are divided by ``|max X|``, the absolute value of the
  signed maximum (not the largest magnitude), and the mean is over forward passes (examples),
  not tokens; we run one example per pass without padding, so pad tokens never enter C;
- layers that read the same input tensor (q/k/v, gate/up) share one covariance: the same
  matrices PEFT builds per layer, computed and held once;
- PEFT doubles d forever when C' never inverts well; we stop at d = 2^30·0.01 with an error
  naming the layer (its inputs carry no signal: all zero, or not finite);
- ``kpa`` keeps PEFT's order: the r smallest components, largest of them first.
The residual keeps each weight's stored dtype (PEFT: the dtype the model was loaded in).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from surgery.data import read_records
from surgery.errors import DataError, ShapeMismatchError, UsageError
from surgery.expr import Weights
from surgery.methods.soup import Params
from surgery.train.adapter import LoraAdapter, LoraDeltaNode, LoraLayer

CORDA_REF = "CorDA, context-oriented decomposition adaptation (arXiv 2406.05223)"
CordaMode = Literal["kpa", "ipa"]
MAX_DAMP = 0.01 * 2 ** 30

# progress(stage, done, total): stage "calibrating" (examples) or "decomposing" (layers).
CordaProgress = Callable[[str, int, int], None]


class CordaSettings(Params):
    """The settings of one CorDA decomposition (``surgery corda``, ``op: corda`` and
    ``adapter: {corda: ...}`` of ``op: finetune``)."""

    data: str = Field(description="calibration JSONL (text, prompt+completion or text+label)")
    rank: int = Field(ge=1, description="adapter rank r")
    mode: CordaMode = Field("kpa", description="kpa: r smallest components; ipa: r largest")
    targets: list[str] | None = Field(
        None, description="module names or name suffixes (default: every linear layer of "
        "the blocks)")
    alpha: float | None = Field(None, gt=0, description="lora_alpha (default: rank, scaling 1)")
    max_length: int = Field(512, ge=1, description="tokens per calibration example")
    samples: int | None = Field(None, ge=1, description="first N examples (default: all)")
    covariance: str | None = Field(
        None, description="safetensors file of the covariances: read when it exists, else "
        "written, so other ranks and modes skip the calibration")
    accumulate: Literal["float64", "float32"] = Field(
        "float64", description="dtype of the covariance sums (float32: PEFT's, bit for bit)")
    device: str = "auto"


class AdapterSpec(Params):
    """``adapter: {corda: {...}}`` of ``op: finetune``: make the adapter with CorDA first."""

    corda: CordaSettings


@dataclass
class LayerReport:
    module: str
    shape: tuple[int, int]
    damp: float


@dataclass
class CordaResult:
    adapter: LoraAdapter
    mode: CordaMode
    examples: int
    tokens: int
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        damps = sorted({layer.damp for layer in self.layers})
        return {"method": "corda", "mode": self.mode, "r": self.adapter.r,
                "alpha": self.adapter.alpha, "layers": len(self.layers),
                "examples": self.examples, "tokens": self.tokens, "damping": damps}


def _is_target(name: str, targets: Sequence[str] | None) -> bool:
    if targets is None:
        return bool(re.search(r"\.\d+\.", name))  # a layer inside a numbered block
    return any(name == t or name.endswith("." + t) for t in targets)


def select_layers(model: torch.nn.Module, targets: Sequence[str] | None
                  ) -> list[tuple[str, torch.nn.Module, bool]]:
    """(name, module, is_conv1d) of the nn.Linear and Conv1D layers CorDA decomposes: those
    whose name is a target or ends with ``.target`` (PEFT's rule), by default every one inside
    a numbered block. The output head is never one. A target matching nothing is an error."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, mod in model.named_modules():
        if mod is head or not isinstance(mod, torch.nn.Linear | Conv1D):
            continue
        if _is_target(name, targets):
            found.append((name, mod, isinstance(mod, Conv1D)))
    for t in targets or ():
        if not any(n == t or n.endswith("." + t) for n, _, _ in found):
            raise UsageError(f"corda: target {t!r} matches no linear layer of the model")
    if not found:
        raise UsageError("corda: the model has no linear layers in numbered blocks; name "
                         "them with targets")
    return found


def _dims(mod: torch.nn.Module, conv1d: bool) -> tuple[int, int]:
    out, inp = mod.weight.shape
    return (int(inp), int(out)) if conv1d else (int(out), int(inp))


class CovarianceHooks:
    """Forward hooks accumulating Σ X̂ᵀX̂ per layer input: each example's product in float32
    (as PEFT computes it), the sum over examples in ``dtype`` (float64: where rounding
    accumulates); consecutive layers given the same input tensor (q/k/v, gate/up) share one
    sum, found on the first pass. float64 sums keep the upper triangle only (see
    :func:`unpack`): n(n+1)/2 values, the bytes of PEFT's full float32 matrix."""

    def __init__(self, layers: Sequence[tuple[str, torch.nn.Module, bool]],
                 dtype: torch.dtype = torch.float64) -> None:
        self.layers = list(layers)
        self.dtype = dtype
        self.group: dict[str, str] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.passes: dict[str, int] = {}
        self.first = True
        self.line = 0
        self._last: tuple[Any, str] | None = None
        self._handles: list[Any] = []
        self.packed = dtype == torch.float64
        self._upper: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _upper_index(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, device)
        if key not in self._upper:
            rows, cols = torch.triu_indices(n, n, device=device)
            self._upper[key] = rows * n + cols
        return self._upper[key]

    def __enter__(self) -> CovarianceHooks:
        for name, mod, _ in self.layers:
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def end_pass(self) -> None:
        self.first = False
        self._last = None

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(mod: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0]
            shared = self._last is not None and self._last[0] is x
            if self.first:
                if shared:
                    assert self._last is not None
                    self.group[name] = self._last[1]
                else:
                    self.group[name] = name
            g = self.group[name]
            if shared and self._last is not None and self._last[1] == g:
                self._last = (x, g)
                return
            if g != name:
                raise UsageError(f"corda: layer {name!r} shared its input with "
                                 f"{g!r} on the first example but not on line {self.line}")
            flat = x.detach().reshape(-1, x.shape[-1])
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
            peak = flat.max().abs()
            if not torch.isfinite(peak) or peak == 0:
                why = "is not finite" if not torch.isfinite(peak) else \
                    "has maximum 0, so X / |max X| is undefined"
                raise DataError(f"corda: layer {name!r}: the input of the example on line "
                                f"{self.line} {why}")
            flat = flat / peak
            product = flat.T @ flat  # one example's X̂ᵀX̂ (float32, as PEFT), summed in dtype
            if self.packed:
                n = flat.shape[1]
                product = product.reshape(-1).index_select(0, self._upper_index(n, flat.device))
            if g not in self.sums:
                self.sums[g] = torch.zeros(product.shape, dtype=self.dtype, device=flat.device)
                self.passes[g] = 0
            self.sums[g] += product
            self.passes[g] += 1
            self._last = (x, g)

        return hook


def damped_inverse(cov: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(C', C'⁻¹, d): C' = C + d·mean(diag C)·I with d doubled from 0.01 until
    ‖C'C'⁻¹ − I‖_F < 0.05, in float32 with PEFT's operations; an error naming ``name`` past
    ``MAX_DAMP``."""
    n = cov.size(0)
    eye = torch.eye(n, device=cov.device)
    damp = 0.01
    while damp <= MAX_DAMP:
        compensate = torch.diag(torch.ones(n, device=cov.device) * torch.mean(torch.diag(cov))
                                * damp)
        fixed = cov + compensate
        try:
            inv = torch.linalg.inv(fixed)
        except RuntimeError:  # exactly singular: damp more
            damp *= 2
            continue
        err = torch.dist(fixed @ inv, eye).item()
        if err < 0.05:
            return fixed, inv, damp
        damp *= 2
    raise UsageError(f"corda: layer {name!r}: the covariance of its inputs stays singular "
                     f"after damping up to {MAX_DAMP:g}·mean(diag); the calibration data gives "
                     "this layer no signal")


def decompose(weight: torch.Tensor, cov: torch.Tensor, rank: int, mode: CordaMode,
              scaling: float, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, d) of one layer: ``weight`` ``out×in`` (float32), ``cov`` its mean input
    covariance ``in×in`` (float32), as PEFT's ``collect_eigens_for_layer``,
    ``crop_corda_eigens`` and ``corda_init`` compute them."""
    out_dim, in_dim = weight.shape
    if rank > min(out_dim, in_dim):
        raise UsageError(f"corda: rank {rank} exceeds min(out, in) = {min(out_dim, in_dim)} "
                         f"of layer {name!r} ({out_dim}×{in_dim})")
    if tuple(cov.shape) != (in_dim, in_dim):
        raise ShapeMismatchError(f"corda: layer {name!r} takes {in_dim} inputs, its "
                                 f"covariance is {list(cov.shape)}")
    fixed, inv, damp = damped_inverse(cov, name)
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    v = (vh @ inv).transpose(0, 1)
    keep = slice(None, rank) if mode == "ipa" else slice(-rank, None)
    u, s, v = u[:, keep], s[keep].clone(), v[:, keep]
    s /= scaling
    a = v.t().mul(s.sqrt().view(-1, 1)).contiguous()
    b = u.mul(s.sqrt()).contiguous()
    return a, b, damp


def _examples(tokenizer: Any, data: str | Path, max_length: int, samples: int | None
              ) -> list[tuple[int, list[int]]]:
    records = read_records(data)
    if samples is not None:
        records = records[:samples]
    out = []
    for r in records:  # an example of no text adds nothing (not a lone BOS token)
        if not tokenizer(r.full_text, add_special_tokens=False)["input_ids"]:
            continue
        ids = tokenizer(r.full_text, add_special_tokens=True)["input_ids"][:max_length]
        out.append((r.line, ids))
    if not out:
        raise DataError(f"{data}: the calibration data yields no tokens")
    return out


def check_ranks(layers: Sequence[tuple[str, torch.nn.Module, bool]], rank: int) -> None:
    for name, mod, conv in layers:
        out, inp = _dims(mod, conv)
        if rank > min(out, inp):
            raise UsageError(f"corda: rank {rank} exceeds min(out, in) = {min(out, inp)} of "
                             f"layer {name!r} ({out}×{inp})")


def unpack(m: torch.Tensor) -> torch.Tensor:
    """A covariance as an ``n×n`` matrix: ``m`` itself, or, for the upper triangle packed row
    by row into n(n+1)/2 values, the symmetric matrix it holds."""
    if m.dim() == 2:
        return m
    n = int((math.isqrt(8 * m.numel() + 1) - 1) // 2)
    rows, cols = torch.triu_indices(n, n, device=m.device)
    full = torch.empty(n, n, dtype=m.dtype, device=m.device)
    full[rows, cols] = m
    full[cols, rows] = m
    return full


@dataclass
class Covariances:
    """Mean input covariances: ``layer -> group``, ``group -> matrix`` (layers reading the
    same input share a group), with the examples and tokens they came from."""

    groups: dict[str, str]
    matrices: dict[str, torch.Tensor]
    examples: int
    tokens: int
    source: str = ""  # what they were computed from (data hash and settings), for reuse

    def of(self, layer: str) -> torch.Tensor:
        g = self.groups.get(layer)
        if g is None or g not in self.matrices:
            raise ShapeMismatchError(f"corda: no covariance for layer {layer!r} (calibration "
                                     "data that never reaches it, or a covariance file of "
                                     "another model)")
        return unpack(self.matrices[g])

    def save(self, path: str | Path) -> Path:
        """A safetensors file (one matrix per group, the layer map in its metadata)."""
        from safetensors.torch import save_file

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        save_file({g: m.contiguous().cpu() for g, m in self.matrices.items()}, str(partial),
                  metadata={"format": "pt", "corda_layers": json.dumps(self.groups),
                            "examples": str(self.examples), "tokens": str(self.tokens),
                            "source": self.source})
        partial.replace(target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> Covariances:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                matrices = {k: f.get_tensor(k) for k in f.keys()}
            groups = json.loads(meta["corda_layers"])
            return cls(groups, matrices, int(meta["examples"]), int(meta["tokens"]),
                       meta.get("source", ""))
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"{path}: not a CorDA covariance file ({e})") from None


@torch.no_grad()
def collect_covariances(model: torch.nn.Module, tokenizer: Any, data: str | Path,
                        layers: Sequence[tuple[str, torch.nn.Module, bool]], *,
                        max_length: int = 512, samples: int | None = None,
                        progress: CordaProgress | None = None,
                        dtype: torch.dtype = torch.float64) -> Covariances:
    """The mean covariance of each layer's inputs over the calibration JSONL ``data``, one
    example per forward pass, accumulated in ``dtype`` (float64; float32 reproduces PEFT's
    sums bit for bit)."""
    examples = _examples(tokenizer, data, max_length, samples)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hooks = CovarianceHooks(layers, dtype)
    try:
        with hooks:
            for i, (line, ids) in enumerate(examples):
                hooks.line = line
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                hooks.end_pass()
                if progress:
                    progress("calibrating", i + 1, len(examples))
    finally:
        model.train(was_training)
    for g in list(hooks.sums):
        if not torch.isfinite(hooks.sums[g]).all():
            raise DataError(f"corda: layer {g!r}: the covariance of its inputs is not "
                            f"finite (inputs of {data} overflow)")
        hooks.sums[g] /= hooks.passes[g]
    return Covariances(hooks.group, hooks.sums, len(examples),
                       sum(len(ids) for _, ids in examples))


@torch.no_grad()
def corda_decompose(model: torch.nn.Module, tokenizer: Any, data: str | Path | None, rank: int,
                    mode: CordaMode = "kpa", *, targets: Sequence[str] | None = None,
                    alpha: float | None = None, max_length: int = 512,
                    samples: int | None = None, progress: CordaProgress | None = None,
                    base_model: str | None = None, covariances: Covariances | None = None,
                    dtype: torch.dtype = torch.float64) -> CordaResult:
    """CorDA's adapter for the transformers ``model`` (in float32, on the device to use) from
    the calibration JSONL ``data`` (or given ``covariances``): covariances by forward hooks,
    then one layer at a time (a covariance freed once its last layer is done): damped
    inverse, SVD, A and B."""
    if mode not in ("kpa", "ipa"):
        raise UsageError(f"corda: mode {mode!r} is not kpa or ipa")
    started = time.perf_counter()
    layers = select_layers(model, targets)
    check_ranks(layers, rank)
    own = covariances is None
    if covariances is None:
        if data is None:
            raise UsageError("corda: give calibration data or covariances")
        covariances = collect_covariances(model, tokenizer, data, layers, max_length=max_length,
                                          samples=samples, progress=progress, dtype=dtype)
    lora_alpha = float(alpha if alpha is not None else rank)
    scaling = lora_alpha / rank
    last_use = {covariances.groups.get(name): name for name, _, _ in layers}
    result_layers: dict[str, LoraLayer] = {}
    reports = []
    for i, (name, mod, conv) in enumerate(layers):
        cov = covariances.of(name).to(mod.weight.device, torch.float32)
        w = mod.weight.data.float()
        if conv:
            w = w.T
        a, b, damp = decompose(w, cov, rank, mode, scaling, name)
        result_layers[name] = LoraLayer(name, a.cpu(), b.cpu(), scaling,
                                        "conv1d" if conv else "linear")
        reports.append(LayerReport(name, (int(w.shape[0]), int(w.shape[1])), damp))
        g = covariances.groups[name]
        if last_use[g] == name and own:
            del covariances.matrices[g]  # computed here and done with
        if progress:
            progress("decomposing", i + 1, len(layers))
    adapter = LoraAdapter(result_layers, rank, lora_alpha, base_model=base_model)
    return CordaResult(adapter, mode, covariances.examples, covariances.tokens, reports,
                       time.perf_counter() - started)


def residual(model: Weights, result: CordaResult | LoraAdapter) -> Weights:
    """The frozen residual W_res = W − s·B A of the checkpoint ``model`` (lazy; streams)."""
    adapter = result.adapter if isinstance(result, CordaResult) else result
    params = {"mode": result.mode} if isinstance(result, CordaResult) else {}
    node = LoraDeltaNode(model, adapter, -1, "corda_residual", params)
    node.reference = CORDA_REF
    return Weights(node)


@dataclass
class CordaOutput:
    adapter: Path
    residual: Path
    result: CordaResult


def _load_model(model: str | Path | Weights, device: str) -> tuple[Any, Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from surgery.engine import resolve_device
    from surgery.train.model import resolve_source

    hf_logging.disable_progress_bar()
    source = resolve_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.directory))
        lm = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UsageError(f"{source.label}: cannot load as a transformers model for CorDA "
                         f"({str(e).splitlines()[0]})") from None
    return Weights(source.node), lm.to(resolve_device(device)), tokenizer, source.label


def calibration_source(s: CordaSettings, model: Weights) -> str:
    """What a covariance depends on: the model's bytes, the data's, and how it is read."""
    from surgery.train.data import file_sha256
    from surgery.train.model import content_key

    return json.dumps({"model": content_key(model.node), "data_sha256": file_sha256(s.data),
                       "max_length": s.max_length, "samples": s.samples,
                       "accumulate": s.accumulate}, sort_keys=True)


def corda(model: str | Path | Weights, settings: CordaSettings | None = None, *,
          progress: CordaProgress | None = None, **kwargs: Any
          ) -> tuple[CordaResult, Weights]:
    """CorDA's adapter of ``model`` and its residual (a lazy expression), from settings
    (:class:`CordaSettings` fields: ``data``, ``rank``, ``mode``, ``targets``, ...)."""
    s = settings or CordaSettings(**kwargs)
    weights, lm, tokenizer, label = _load_model(model, s.device)
    covariances = None
    source = calibration_source(s, weights)
    if s.covariance and Path(s.covariance).is_file():
        covariances = Covariances.load(s.covariance)
        if covariances.source != source:
            raise UsageError(f"{s.covariance}: made from another model, other calibration "
                             "data or settings (max_length, samples, accumulate); delete it "
                             "or name another file")
    elif s.covariance:
        layers = select_layers(lm, s.targets)
        check_ranks(layers, s.rank)
        covariances = collect_covariances(lm, tokenizer, s.data, layers,
                                          max_length=s.max_length, samples=s.samples,
                                          progress=progress, dtype=getattr(torch, s.accumulate))
        covariances.source = source
        covariances.save(s.covariance)
    result = corda_decompose(lm, tokenizer, s.data, s.rank, s.mode, targets=s.targets,
                             alpha=s.alpha, max_length=s.max_length, samples=s.samples,
                             progress=progress, base_model=label, covariances=covariances,
                             dtype=getattr(torch, s.accumulate))
    del lm
    return result, residual(weights, result)


def write_corda(model: str | Path | Weights, out: str | Path, settings: CordaSettings | None = None,
                *, force: bool = False, progress: CordaProgress | None = None,
                write_progress: Any = None, **kwargs: Any) -> CordaOutput:
    """``surgery corda``: ``out/adapter`` (a PEFT LoRA adapter) and ``out/residual`` (the
    residual model, through the streaming writer with config and tokenizer), such that
    ``PeftModel.from_pretrained(residual, out/adapter)`` computes the original model."""
    from surgery.engine import save

    s = settings or CordaSettings(**kwargs)
    root = Path(out)
    if root.exists() and not force and any(root.iterdir()):
        raise UsageError(f"{root}: exists and is not empty; pass --force to replace it")
    result, res = corda(model, s, progress=progress)
    result.adapter.base_model = str(root / "residual")
    adapter_path = result.adapter.save(root / "adapter", force=force)
    summary = {**result.summary(), "data": Path(s.data).name,
               "layer_damping": {r.module: r.damp for r in result.layers}}
    (root / "corda.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    saved = save(res.node, root / "residual", force=force, device="cpu", progress=write_progress,
                 extra_provenance={"corda": result.summary()})
    return CordaOutput(adapter_path, saved.path, result)


def prepare_adapter(model: str | Path | Weights, spec: str | AdapterSpec,
                    progress: CordaProgress | None = None
                    ) -> tuple[Weights, LoraAdapter, dict[str, Any]]:
    """What adapter training starts from: (the model the adapter sits on, the adapter, a
    record for provenance). ``spec`` is a PEFT adapter directory for ``model`` (or a
    ``surgery corda`` output: its ``adapter/``), or CorDA settings, which decompose ``model``
    into the residual and the adapter first."""
    from surgery.checkpoint import open_checkpoint
    from surgery.expr import LoadNode
    from surgery.train.adapter import adapter_dir, bind, load_adapter, weights_label

    if isinstance(spec, AdapterSpec):
        result, res = corda(model, spec.corda, progress=progress)
        return res, result.adapter, {**result.summary(), "data": Path(spec.corda.data).name}
    own = Path(spec) / "residual"
    where = model.node.checkpoint.root if isinstance(model, Weights) and \
        isinstance(model.node, LoadNode) else None if isinstance(model, Weights) else Path(model)
    if (own / "config.json").is_file() and where is not None and \
            Path(where).resolve() != own.resolve():
        raise UsageError(f"adapter {spec}: a surgery corda output, whose adapter belongs on "
                         f"{own}, not {model} (on the original model it would count the "
                         "adapted part twice)")
    w = model if isinstance(model, Weights) else Weights(LoadNode(open_checkpoint(str(model))))
    label = weights_label(w)
    adapter = bind(load_adapter(spec), w, label)
    return w, adapter, {"method": "lora", "adapter": str(adapter_dir(spec)), "r": adapter.r,
                        "alpha": adapter.alpha, "layers": len(adapter.layers)}


def adapter_fingerprint(spec: str | AdapterSpec) -> list[str]:
    """The bytes an adapter setting depends on, for cache keys: the adapter's files, or the
    calibration data (and covariance file) of a CorDA one."""
    from surgery.train.adapter import CONFIG_FILE, WEIGHTS_FILE, adapter_dir
    from surgery.train.data import file_sha256

    if isinstance(spec, AdapterSpec):
        files = [spec.corda.data, *([spec.corda.covariance] if spec.corda.covariance and
                                    Path(spec.corda.covariance).is_file() else [])]
        return [file_sha256(f) for f in files]
    root = adapter_dir(spec)
    return [file_sha256(root / CONFIG_FILE), file_sha256(root / WEIGHTS_FILE)]


def adapter_parameters(model: torch.nn.Module, spec: str | AdapterSpec) -> int:
    """How many parameters an adapter setting trains on ``model`` (may be on the meta
    device): r·(in + out) per CorDA layer, or the adapter file's A and B."""
    from surgery.train.adapter import load_adapter

    if isinstance(spec, AdapterSpec):
        rank = spec.corda.rank
        return sum(rank * sum(_dims(mod, conv)) for _, mod, conv in
                   select_layers(model, spec.corda.targets))
    return sum(layer.A.numel() + layer.B.numel() for layer in load_adapter(spec).layers.values())
