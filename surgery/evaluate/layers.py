"""Per-block scores from hidden states on calibration text.

h(l) is the hidden state entering block l (a forward pre-hook on block l) and h(L) the output of
the last block (a forward hook), never the post-final-norm output that ``output_hidden_states``
reports last.

- Angular distance (arXiv 2403.17887): d(l) = arccos(cos(h(l), h(l+n))) / π at the last non-pad
  token, averaged over samples, for l = 0..L−n; removing blocks l*..l*+n−1, l* = argmin d,
  changes the representation least.
- Block influence (ShortGPT, arXiv 2403.03853): BI(l) = mean over non-pad tokens of
  1 − cos(h(l), h(l+1)); the n blocks of lowest BI are the least useful.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from surgery.data import Record, encode_lm, pad_batch
from surgery.errors import UsageError
from surgery.evaluate.metrics import Progress

_BLOCK_LISTS = ("layers", "h", "layer", "blocks", "block", "resblocks")


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: the ModuleList named like a block container
    (``layers``, ``h``, ``layer``, ...) with num_hidden_layers entries."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS \
                and (count is None or len(module) == count):
            return module
    raise UsageError(f"{type(model).__name__}: no list of {count} transformer blocks found")


@dataclass
class LayerScores:
    """Angular distance d(l) for removing n blocks from l (l = 0..L−n), block influence BI(l)
    for each block, and the blocks each method would drop."""

    n: int
    angular: list[float]
    block_influence: list[float]
    samples: int
    tokens: int

    def drop(self, method: str) -> list[int]:
        if method == "angular":
            start = min(range(len(self.angular)), key=self.angular.__getitem__)
            return list(range(start, start + self.n))
        if method == "block_influence":
            order = sorted(range(len(self.block_influence)),
                           key=lambda i: (self.block_influence[i], i))
            return sorted(order[:self.n])
        raise UsageError(f"pruning method {method!r} is not one of angular, block_influence")

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "samples": self.samples, "tokens": self.tokens,
                "angular_distance": self.angular, "block_influence": self.block_influence,
                "drop": {m: self.drop(m) for m in ("angular", "block_influence")}}


class _Capture:
    """Hooks on every block: last-token states h(0..L), and running sums of per-token
    1 − cos(h(l), h(l+1))."""

    def __init__(self, blocks: torch.nn.ModuleList) -> None:
        self.count = len(blocks)
        self.last_index: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.last: list[torch.Tensor | None] = [None] * (self.count + 1)
        self.entering: torch.Tensor | None = None
        self.bi_sum = torch.zeros(self.count, dtype=torch.float64)
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(i), with_kwargs=True))

    def _last_token(self, h: torch.Tensor) -> torch.Tensor:
        assert self.last_index is not None
        rows = torch.arange(h.shape[0], device=h.device)
        return h[rows, self.last_index.to(h.device)].float().cpu()

    def _pre(self, i: int) -> Any:
        def hook(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            self.entering = h
            self.last[i] = self._last_token(h)
        return hook

    def _post(self, i: int) -> Any:
        def hook(_: torch.nn.Module, __: tuple, ___: dict, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            assert self.entering is not None and self.mask is not None
            cos = F.cosine_similarity(self.entering.float(), out.float(), dim=-1)
            self.bi_sum[i] += float(((1 - cos) * self.mask.to(cos.device)).sum())
            if i == self.count - 1:
                self.last[self.count] = self._last_token(out)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def score_layers(model: Any, tokenizer: Any, records: Sequence[Record], n: int,
                 batch_size: int = 8, max_length: int = 1024,
                 progress: Progress | None = None) -> LayerScores:
    """Angular distances for n-block removal and block influences on calibration records
    (prompt and completion are read as one text)."""
    blocks = find_blocks(model)
    L = len(blocks)
    if not 1 <= n < L:
        raise UsageError(f"blocks: n must be between 1 and {L - 1} for a {L}-block model, "
                         f"got {n}")
    texts = [Record(text=r.full_text, line=r.line) for r in records]
    encoded = [encode_lm(tokenizer, r, max_length) for r in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    capture = _Capture(blocks)
    angular = torch.zeros(L - n + 1, dtype=torch.float64)
    tokens = 0
    try:
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            b = {k: v.to(device) for k, v in pad_batch(batch, int(pad)).items()
                 if k != "labels"}
            capture.mask = b["attention_mask"].float()
            capture.last_index = b["attention_mask"].sum(1) - 1
            model(**b)
            states = torch.stack([t for t in capture.last if t is not None], dim=1)  # B, L+1, d
            cos = F.cosine_similarity(states[:, :L - n + 1], states[:, n:], dim=-1)
            angular += (torch.arccos(cos.clamp(-1, 1)) / math.pi).double().sum(0)
            tokens += int(b["attention_mask"].sum())
            if progress:
                progress(min(start + batch_size, len(encoded)), len(encoded))
    finally:
        capture.remove()
    return LayerScores(n, (angular / len(encoded)).tolist(), (capture.bi_sum / tokens).tolist(),
                       len(encoded), tokens)
