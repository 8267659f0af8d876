"""LoRA adapters as PEFT stores them (``adapter_config.json`` + ``adapter_model.safetensors``):
reading and writing them, streaming ``W ± scaling·B A`` into a checkpoint (``merge_adapter``,
and CorDA's residual), and attaching one to a transformers model so that only A and B train.

Conventions are PEFT's: for a layer of ``out`` outputs and ``in`` inputs, ``A`` is ``r×in`` and
``B`` is ``out×r``; the layer computes ``W x + scaling · B (A x)``, ``scaling = lora_alpha / r``
(``lora_alpha / √r`` with ``use_rslora``; ``rank_pattern`` and ``alpha_pattern`` match a module
name as PEFT's ``get_pattern_key`` does). GPT-2's ``Conv1D`` stores its weight as ``in×out``
(PEFT's ``fan_in_fan_out``), so its delta is added transposed; which layers are ``Conv1D`` is
read from the model transformers builds for the checkpoint's config (on the meta device), not
guessed from shapes (a square weight would be ambiguous). An embedding's LoRA
(``lora_embedding_A`` ``r×vocab``, ``lora_embedding_B`` ``dim×r``) adds ``(B A)ᵀ``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.errors import ShapeMismatchError, UsageError
from surgery.expr import EvalContext, Node, TensorSpec, Weights
from surgery.expr.weights import weights_label

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORA_REF = "LoRA (arXiv 2106.09685), PEFT adapter format"


@dataclass
class LoraLayer:
    """One adapted layer: ``module`` (its name in the transformers model), ``tensor`` (the
    checkpoint tensor it changes), A (``r×in``), B (``out×r``), its scaling, and how its
    weight is stored: ``linear`` (``out×in``), ``conv1d`` (``in×out``) or ``embedding``."""

    module: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    kind: str = "linear"
    bias: torch.Tensor | None = None  # PEFT's lora_bias (lora_B's bias), merged as b + s·bias

    @property
    def tensor(self) -> str:
        return f"{self.module}.weight"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """``scaling · B A`` in the layout of the stored weight, as PEFT's
        ``get_delta_weight`` computes it (``transpose(B @ A) * scaling``)."""
        d = self.B.float() @ self.A.float()
        if self.kind != "linear":
            d = d.T
        return d * self.scaling

    def weight_shape(self) -> tuple[int, int]:
        out, inp = int(self.B.shape[0]), int(self.A.shape[1])
        return (out, inp) if self.kind == "linear" else (inp, out)


@dataclass
class LoraAdapter:
    """A LoRA adapter: its layers by module name and the settings PEFT's config carries."""

    layers: dict[str, LoraLayer]
    r: int
    alpha: float
    use_rslora: bool = False
    base_model: str | None = None
    config_extra: dict[str, Any] = field(default_factory=dict)
    # Tensors of modules PEFT keeps whole (modules_to_save), by checkpoint name: merged, they
    # replace the model's.
    full: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the PEFT adapter directory ``path`` (through ``path.partial``, renamed when
        complete; an existing directory is replaced only with ``force``)."""
        final = Path(path)
        if final.exists() and not force:
            raise UsageError(f"{final}: exists; pass force to replace it")
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        fan_in_fan_out = any(layer.kind == "conv1d" for layer in self.layers.values())
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r,
               "lora_alpha": self.alpha, "lora_dropout": 0.0, "bias": "none",
               "target_modules": sorted(self.layers), "fan_in_fan_out": fan_in_fan_out,
               "use_rslora": self.use_rslora, "init_lora_weights": True,
               "base_model_name_or_path": self.base_model, "modules_to_save": None,
               "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
               **self.config_extra}
        (partial / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tensors = {}
        for name in sorted(self.layers):
            layer = self.layers[name]
            key = "lora_embedding_" if layer.kind == "embedding" else "lora_"
            suffix = "" if layer.kind == "embedding" else ".weight"
            tensors[f"{PEFT_PREFIX}{name}.{key}A{suffix}"] = layer.A.contiguous()
            tensors[f"{PEFT_PREFIX}{name}.{key}B{suffix}"] = layer.B.contiguous()
        save_file(tensors, str(partial / WEIGHTS_FILE), metadata={"format": "pt"})
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        return final


def adapter_dir(path: str | Path) -> Path:
    """The adapter directory of ``path``: itself, or its ``adapter/`` folder (a ``surgery
    corda`` output)."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    if (p / "adapter" / CONFIG_FILE).is_file():
        return p / "adapter"
    raise UsageError(f"{p}: not a PEFT adapter directory (no {CONFIG_FILE})")


def _pattern(patterns: dict[str, Any], module: str) -> Any:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return None


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (or a ``surgery corda`` output). Layer kinds are
    provisional (``linear``/``embedding``) until :func:`bind` checks them against a model."""
    root = adapter_dir(path)
    where = root / CONFIG_FILE
    try:
        cfg = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{where}: cannot read ({e})") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise UsageError(f"{where}: peft_type is {cfg.get('peft_type')!r}, not LORA")
    if cfg.get("use_dora"):
        raise UsageError(f"{where}: the adapter uses DoRA, which is not W + scaling·BA; "
                         "merge it with PEFT's merge_and_unload")
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise UsageError(f"{root}: no {WEIGHTS_FILE} (pickled adapter_model.bin is not read)")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    biases: dict[str, torch.Tensor] = {}
    full: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(embedding_)?([AB])"
                         r"(?:\.[^.]+)?(?:\.weight)?$")
    bias = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_B(?:\.[^.]+)?\.bias$")
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if (mb := bias.match(key)) is not None:  # lora_bias: added to the layer's bias
                biases[mb.group(1)] = f.get_tensor(key)
                continue
            m = pattern.match(key)
            if m is None:  # a module kept whole (modules_to_save): replaces the tensor
                full[key.removeprefix(PEFT_PREFIX)] = f.get_tensor(key)
                continue
            module, emb, which = m.group(1), m.group(2), m.group(3)
            pairs.setdefault(module, {})[which] = f.get_tensor(key)
            kinds[module] = "embedding" if emb else "linear"
    for module in biases:
        if module not in pairs:
            raise UsageError(f"{weights}: a LoRA bias for {module!r}, which has no A and B")
    layers = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UsageError(f"{weights}: module {module!r} has lora_{next(iter(ab))} "
                             "without its pair")
        a, b = ab["A"], ab["B"]
        rank = int(a.shape[0])
        if a.dim() != 2 or b.dim() != 2 or int(b.shape[1]) != rank:
            raise UsageError(f"{weights}: module {module!r}: A {list(a.shape)} and B "
                             f"{list(b.shape)} do not make a rank-r pair")
        a_alpha = _pattern(cfg.get("alpha_pattern") or {}, module)
        layer_alpha = float(a_alpha if a_alpha is not None else alpha)
        scaling = layer_alpha / math.sqrt(rank) if rslora else layer_alpha / rank
        layers[module] = LoraLayer(module, a, b, scaling, kinds[module], biases.get(module))
    if not layers:
        raise UsageError(f"{weights}: holds no LoRA matrices")
    return LoraAdapter(layers, r, alpha, rslora, cfg.get("base_model_name_or_path"),
                       full=full)


def meta_model(config: dict, where: str) -> torch.nn.Module:
    """The model transformers builds from ``config``, on the meta device (no memory)."""
    import transformers

    if "model_type" not in config:
        raise UsageError(f"{where}: config.json has no model_type; cannot tell its layers")
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
    try:
        built = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            return cls.from_config(built) if cls is transformers.AutoModelForCausalLM \
                else cls(built)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{where}: transformers cannot build this model "
                         f"({str(e).splitlines()[0]})") from None


def module_kinds(config: dict, where: str) -> dict[str, str]:
    """``linear``, ``conv1d`` or ``embedding`` for each such module of the model
    transformers builds from ``config``."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, mod in meta_model(config, where).named_modules():
        if isinstance(mod, Conv1D):
            out[name] = "conv1d"
        elif isinstance(mod, torch.nn.Linear):
            out[name] = "linear"
        elif isinstance(mod, torch.nn.Embedding):
            out[name] = "embedding"
    return out


def bind(adapter: LoraAdapter, model: Weights, label: str) -> LoraAdapter:
    """Check ``adapter`` against the checkpoint ``model`` and fix each layer's kind: every
    adapted module must exist, be a linear, Conv1D or embedding layer, and have the shape
    A and B imply."""
    names = set(model.node.names())
    kinds = module_kinds(model.node.config(), label)
    for layer in adapter.layers.values():
        kind = kinds.get(layer.module)
        if kind is None or layer.tensor not in names:
            raise ShapeMismatchError(f"adapter layer {layer.module!r}: {label} has no such "
                                     "linear, Conv1D or embedding layer (an adapter for "
                                     "another model?)")
        if (kind == "embedding") != (layer.kind == "embedding"):
            raise ShapeMismatchError(f"adapter layer {layer.module!r}: {label} holds a "
                                     f"{kind} layer there")
        layer.kind = kind
        have = tuple(model.node.spec(layer.tensor).shape)
        if kind == "embedding":
            want: tuple[int, ...] = (int(layer.A.shape[1]), int(layer.B.shape[0]))
        else:
            want = layer.weight_shape()
        if have != want:
            raise ShapeMismatchError(f"tensor {layer.tensor!r}: {label} holds shape "
                                     f"{list(have)}, the adapter's A and B make {list(want)}")
        if layer.bias is not None:
            b_name = f"{layer.module}.bias"
            out = (int(layer.B.shape[0]),)
            if b_name not in names or tuple(model.node.spec(b_name).shape) != out or \
                    tuple(layer.bias.shape) != out:
                raise ShapeMismatchError(f"adapter layer {layer.module!r}: its LoRA bias of "
                                         f"{list(layer.bias.shape)} has no bias of {label} "
                                         "to go to")
    tied = bool(model.node.config().get("tie_word_embeddings", True))
    for name, t in list(adapter.full.items()):
        if name not in names and tied and any(
                n != name and n in names and torch.equal(t, other)
                for n, other in adapter.full.items()):
            del adapter.full[name]  # a tied head saved with its embedding's values (PEFT)
            continue
        if name not in names:
            raise ShapeMismatchError(f"adapter tensor {name!r} (a module kept whole): {label} "
                                     "has no such tensor")
        if tuple(model.node.spec(name).shape) != tuple(t.shape):
            raise ShapeMismatchError(f"tensor {name!r}: {label} holds shape "
                                     f"{list(model.node.spec(name).shape)}, the adapter "
                                     f"{list(t.shape)}")
    return adapter


def adapter_digest(adapter: LoraAdapter) -> str:
    """sha256 of the adapter's matrices and scalings (part of cache keys and provenance)."""
    h = hashlib.sha256()
    for name in sorted(adapter.layers):
        layer = adapter.layers[name]
        h.update(f"{name}\0{layer.kind}\0{layer.scaling!r}\0".encode())
        for t in (layer.A, layer.B, *([layer.bias] if layer.bias is not None else [])):
            t = t.detach().to("cpu").contiguous()
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for name in sorted(adapter.full):
        t = adapter.full[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class LoraDeltaNode(Node):
    """``W + sign · scaling · B A`` for every adapted weight, the other tensors as they are.
    ``sign=+1`` merges (PEFT's order of operations: ``W + transpose(B @ A) * scaling``);
    ``sign=-1`` gives CorDA's residual as PEFT's ``corda_init`` computes it:
    ``W − transpose((scaling · B) @ A)``, in float32, cast back to the weight's dtype."""

    reference = LORA_REF

    def __init__(self, source: Weights, adapter: LoraAdapter, sign: int, op: str,
                 params: dict[str, Any] | None = None,
                 on_compute: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.inputs = (source.node,)
        self.adapter = adapter
        self.sign = sign
        self.op = op
        self._params = params or {}
        self.by_tensor = {layer.tensor: layer for layer in adapter.layers.values()}
        self.by_bias = {f"{layer.module}.bias": layer for layer in adapter.layers.values()
                        if layer.bias is not None}
        if sign < 0 and (self.by_bias or adapter.full):
            raise UsageError(f"{op}: an adapter with LoRA biases or whole modules has no "
                             "residual")
        self.on_compute = on_compute
        self.digest = adapter_digest(adapter)

    def params(self) -> dict[str, Any]:
        return {"r": self.adapter.r, "alpha": self.adapter.alpha,
                "layers": len(self.adapter.layers), "adapter_sha256": self.digest,
                **self._params}

    def _list_names(self) -> list[str]:
        return self.inputs[0].names()

    def spec(self, name: str) -> TensorSpec:
        return self.inputs[0].spec(name)

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        if name in self.adapter.full:
            return self.adapter.full[name].to(ctx.device, self.spec(name).dtype, copy=True)
        w = ctx.value(self.inputs[0], name)
        if name in self.by_bias:  # PEFT: bias + lora_B.bias * scaling
            layer = self.by_bias[name]
            assert layer.bias is not None
            return (w.to(torch.float32) + layer.bias.to(w.device, torch.float32)
                    * layer.scaling).to(w.dtype)
        layer = self.by_tensor.get(name)
        if layer is None:
            return w
        if self.on_compute is not None:
            self.on_compute()
        dtype = w.dtype
        w32 = w.to(torch.float32)
        if self.sign > 0:
            out = w32 + layer.delta().to(w32.device)
        else:
            a = layer.A.to(w32.device, torch.float32)
            b = layer.B.to(w32.device, torch.float32)
            d = layer.scaling * b @ a
            out = w32 - (d if layer.kind == "linear" else d.T)
        return out.to(dtype)


def merge_adapter(model: str | Path | Weights, adapter: str | Path | LoraAdapter) -> Weights:
    """``model`` with ``adapter`` merged in, W = W + scaling · B A, as a lazy expression
    (``.save(path)`` streams it): for adapters ``surgery`` writes (merge a trained CorDA
    adapter into its residual) and for any PEFT LoRA adapter."""
    from surgery.checkpoint import open_checkpoint
    from surgery.expr import LoadNode

    w = model if isinstance(model, Weights) else Weights(LoadNode(open_checkpoint(str(model))))
    label = weights_label(w)
    lora = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
    bind(lora, w, label)
    src = None if isinstance(adapter, LoraAdapter) else str(adapter_dir(adapter))
    return Weights(LoraDeltaNode(w, lora, +1, "merge_adapter",
                                 {"adapter": Path(src).name} if src else {}))


# -- training: A and B as parameters of a transformers model --------------------------------

class _LoraHook:
    """Adds ``scaling · B (A x)`` to a linear or Conv1D layer's output (PEFT's forward with
    dropout 0)."""

    def __init__(self, module: torch.nn.Module, scaling: float) -> None:
        self.module = module
        self.scaling = scaling

    def __call__(self, mod: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor
                 ) -> torch.Tensor:
        x = args[0].to(mod.lora_A.dtype)
        return out + torch.nn.functional.linear(
            torch.nn.functional.linear(x, mod.lora_A), mod.lora_B) * self.scaling


def attach(model: torch.nn.Module, adapter: LoraAdapter) -> list[str]:
    """Give each adapted layer of ``model`` parameters ``lora_A`` and ``lora_B`` (float32,
    from ``adapter``) and a forward hook that adds their product; returns the parameter
    names. Embedding adapters are merged, not trained, and are refused here."""
    if adapter.full or any(layer.bias is not None for layer in adapter.layers.values()):
        raise UsageError("adapter training takes A and B only; this adapter also holds LoRA "
                         "biases or whole modules (merge it with merge_adapter instead)")
    modules = dict(model.named_modules())
    names = []
    for module_name, layer in adapter.layers.items():
        mod = modules.get(module_name)
        if layer.kind == "embedding":
            raise UsageError(f"adapter layer {module_name!r}: training an embedding LoRA is "
                             "not supported; merge it with merge_adapter")
        if mod is None:
            raise ShapeMismatchError(f"adapter layer {module_name!r}: the model has no such "
                                     "module")
        mod.lora_A = torch.nn.Parameter(layer.A.detach().to(torch.float32).clone())
        mod.lora_B = torch.nn.Parameter(layer.B.detach().to(torch.float32).clone())
        mod.register_forward_hook(_LoraHook(mod, layer.scaling))
        names += [f"{module_name}.lora_A", f"{module_name}.lora_B"]
    return names


def detach_trained(model: torch.nn.Module, adapter: LoraAdapter) -> LoraAdapter:
    """The adapter with A and B as ``model`` now holds them (copies, on the CPU)."""
    modules = dict(model.named_modules())
    layers = {}
    for name, layer in adapter.layers.items():
        mod = modules[name]
        layers[name] = LoraLayer(name, mod.lora_A.detach().to("cpu", copy=True),
                                 mod.lora_B.detach().to("cpu", copy=True), layer.scaling,
                                 layer.kind)
    return LoraAdapter(layers, adapter.r, adapter.alpha, adapter.use_rslora,
                       adapter.base_model, dict(adapter.config_extra))


class TrainedAdapterNode(LoraDeltaNode):
    """The result of training an adapter: the start model (the residual, for CorDA) with the
    trained A and B merged in, W = W_res + scaling·B A; :meth:`capture` takes them from the
    model once training ends."""

    def __init__(self, source: Node, model: torch.nn.Module, adapter: LoraAdapter,
                 params: dict[str, Any]) -> None:
        super().__init__(Weights(source), adapter, +1, "finetune", params)
        self.model = model
        self.trained: LoraAdapter | None = None

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def capture(self) -> None:
        self.trained = detach_trained(self.model, self.adapter)
        self.by_tensor = {layer.tensor: layer for layer in self.trained.layers.values()}

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        if self.trained is None and name in self.by_tensor:
            raise RuntimeError("TrainedAdapterNode saved before training captured its weights")
        return super().compute(name, ctx)
