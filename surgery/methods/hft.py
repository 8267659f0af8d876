"""HFT half-reset, post-hoc (Half Fine-Tuning, arXiv 2404.18466).

The unit of choice is a module: a weight and its bias share a name prefix and are reset
together. Within each block, modules are put in categories by the kind of their weight
(attention projection, MLP projection, norm); of the n modules of a category, a seeded random
⌊n/2⌋ or ⌈n/2⌉ are reset to θ0. For odd n, a seeded half of the blocks (⌈L/2⌉ of them) resets
⌈n/2⌉ and the others ⌊n/2⌋. So Llama (q, k, v, o; gate, up, down; 2 norms) resets 2 of 4
attention projections, 2 or 1 of 3 MLP projections, 1 of 2 norms; BERT (query, key, value,
attention.output.dense; intermediate.dense, output.dense; 2 LayerNorms) 2 of 4, 1 of 2, 1 of 2;
GPT-2, whose fused c_attn holds q, k and v, resets 1 of its 2 attention matrices (c_attn,
attn.c_proj), 1 of 2 MLP matrices (c_fc, mlp.c_proj), 1 of 2 norms (ln_1, ln_2). Other block
tensors, embeddings and the head stay fine-tuned unless asked.
"""

from __future__ import annotations

import torch
from pydantic import Field

from surgery.errors import UsageError
from surgery.expr import ElementwiseNode, EvalContext, Weights, seeded_generator
from surgery.methods.soup import Params
from surgery.names import TensorKind, layer_index, tensor_kind

HFT_REF = "Half Fine-Tuning (HFT), arXiv 2404.18466"
CATEGORIES = (TensorKind.ATTENTION, TensorKind.MLP, TensorKind.NORM)

Selection = dict[int, list[str]]


def module_of(name: str) -> str:
    """The module a tensor belongs to: its name without ``.weight`` / ``.bias``."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _category(module: str, names: list[str]) -> TensorKind | None:
    weight = f"{module}.weight"
    kind = tensor_kind(weight if weight in names else module)
    return kind if kind in CATEGORIES else None


def hft_selection(names: list[str], seed: int = 0) -> Selection:
    """Per block index, the modules (name prefixes) reset to θ0, by category, in name order."""
    blocks: dict[int, dict[TensorKind, list[str]]] = {}
    for name in names:
        idx = layer_index(name)
        if idx is None:
            continue
        module = module_of(name)
        cat = _category(module, names)
        if cat is None:
            continue
        mods = blocks.setdefault(idx, {}).setdefault(cat, [])
        if module not in mods:
            mods.append(module)
    order = sorted(blocks)
    # For a category with an odd module count, which blocks reset the larger half.
    larger: dict[TensorKind, set[int]] = {}
    for cat in CATEGORIES:
        perm = torch.randperm(len(order), generator=seeded_generator(seed, cat.value, "hft-odd"))
        larger[cat] = {order[i] for i in perm[: (len(order) + 1) // 2].tolist()}
    selection: Selection = {}
    for idx in order:
        chosen: list[str] = []
        for cat in CATEGORIES:
            mods = sorted(blocks[idx].get(cat, []))  # the same draw whatever the tensor order
            count = (len(mods) + 1) // 2 if idx in larger[cat] else len(mods) // 2
            perm = torch.randperm(len(mods), generator=seeded_generator(
                seed, f"block {idx}", f"hft-{cat.value}"))
            chosen += [mods[i] for i in sorted(perm[:count].tolist())]
        selection[idx] = chosen
    return selection


def hft_reset(base: Weights, model: Weights, seed: int = 0, *, reset_embeddings: bool = False,
              reset_head: bool = False) -> Weights:
    """Post-hoc HFT (arXiv 2404.18466): θ = θ0 on the selected half of each block's modules
    (see :func:`hft_selection`), θ1 elsewhere. The selection is in ``.node.selection`` and
    recorded in the output's provenance and model card.
    """
    return Weights(HftNode(base, model, hft_selection(model.names, seed), seed,
                           reset_embeddings, reset_head))


class HftNode(ElementwiseNode):
    """The node of :func:`hft_reset`; it reports its selection in the model card."""

    def __init__(self, base: Weights, model: Weights, selection: Selection, seed: int,
                 reset_embeddings: bool, reset_head: bool) -> None:
        self.selection = selection
        self.seed = seed
        self.reset = {m for mods in selection.values() for m in mods}
        self.extra = {k for k, on in ((TensorKind.EMBEDDING, reset_embeddings),
                                      (TensorKind.HEAD, reset_head)) if on}
        if not self.reset and not self.extra:
            raise UsageError("hft_reset: the model has no attention, MLP or norm modules in "
                             "blocks")
        super().__init__([base.node, model.node], self._fn, "hft_reset",
                         {"seed": seed, "reset_embeddings": reset_embeddings,
                          "reset_head": reset_head,
                          "selection": {str(k): v for k, v in selection.items()}}, HFT_REF,
                         rowwise=True)

    def _fn(self, name: str, ts: list[torch.Tensor], _: EvalContext) -> torch.Tensor:
        if module_of(name) in self.reset or (layer_index(name) is None
                                             and tensor_kind(name) in self.extra):
            return ts[0]
        return ts[1]

    def card_sections(self) -> dict[str, str]:
        lines = [f"Modules reset to the base (seed {self.seed}):", ""]
        for idx, mods in self.selection.items():
            lines.append(f"- block {idx}: " + ", ".join(f"`{m}`" for m in mods))
        return {"HFT half-reset selection": "\n".join(lines)}


class HftResetParams(Params):
    base: str
    model: str
    seed: int = Field(0, description="default: the recipe seed")
    reset_embeddings: bool = False
    reset_head: bool = False
