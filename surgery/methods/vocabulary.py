"""Vocabulary alignment: models with different tokenizers merged over one vocabulary.

Fine-tunes often add tokens (chat markers, tool tokens) or pad their embedding matrix, so
row ``i`` of one model's embeddings need not be the token at row ``i`` of another's. Before a
merge, every model's vocabulary-indexed tensors (input embeddings, output head, and any other
embedding or head tensor with one row per token) are laid out in the output vocabulary:

* the output vocabulary is one model's tokenizer (``source``), or the **union** of all of them:
  the first model's tokenizer (the base, when one is named) with every other token appended,
  the ordinary tokens first (each tokenizer in model order, each in its own id order), then
  the added tokens;
* a model's row for a token it has is its own row; for a token it lacks, the row of the one
  model that has it, else the base's row when the base has it, else the mean of the rows of
  the models that have it (summed in model order); a token no model has gets zeros;
* with ``pad_to_multiple_of`` the row count is rounded up and the extra rows are the mean of a
  model's token rows;
* ``tokens`` names the source of chosen tokens' rows (:class:`TokenRow`: a model's row of the
  token, a model's row of another token or id, or zeros), for the models that lack the token,
  or with ``force`` for every model (mergekit's ``tokenizer: tokens:``).

This is mergekit's ``tokenizer_source`` (base, a model, or ``union``), with two of its accidents
made deterministic: mergekit appends the union's new tokens in the iteration order of a hash
map (it differs between runs), and picks the union's first tokenizer from a set of models when
there is no base. Rows past a model's ``vocab_size`` (padding) are not tokens of it, and a
tokenizer's tokens at ids past its model's rows are none of the model's: the output's tokenizer
is stripped of them (BPE only, as mergekit's ``get_stripped_tokenizer``). The
output's config.json gets the new ``vocab_size``; its tokenizer files are the source's, or the
union tokenizer's (saved once, content-addressed, in the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.checkpoint.hashing import cache_dir
from surgery.errors import ShapeMismatchError, UsageError
from surgery.expr import EvalContext, Node, TensorSpec, Weights
from surgery.names import TensorKind, tensor_kind

VOCABULARY_REF = "mergekit's tokenizer_source (base, a model's tokenizer, or union)"
ZERO = -1  # a token no model has
AVERAGE = -2  # a token several models have, none of them the base: their mean row
UNSET = -3  # a token without a configured source (see TokenRow)


@dataclass(frozen=True)
class TokenRow:
    """Where a token's row comes from (mergekit's ``tokenizer: tokens:`` entry): model
    ``model``'s row of the token itself, or of ``token`` (a token of that model's vocabulary)
    or of row ``row``; ``model=None``: zeros. It fills the rows of the models that lack the
    token, and with ``force`` the rows of every model."""

    model: int | None = None
    token: str | None = None
    row: int | None = None
    force: bool = False


@dataclass(frozen=True)
class Tokenizer:
    """One model's tokenizer: where its files are and how many rows its embeddings have."""

    label: str
    files: tuple[Path, ...]
    rows: int

    def load(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.files[0].parent)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"{self.label}: cannot load its tokenizer ({e})") from None


@dataclass
class FixedRows:
    """Per output token, its configured source (see TokenRow): the model (UNSET: none;
    ZERO: zeros), its row there, and whether it replaces the models' own rows too."""

    model: torch.Tensor
    row: torch.Tensor
    forced: torch.Tensor


@dataclass
class Vocabulary:
    """The output vocabulary, and for each model where its rows come from."""

    tokens: int  # tokens in the output vocabulary
    size: int  # rows of the output's vocabulary tensors (tokens, padded)
    files: list[Path]  # the output's tokenizer files
    rows: list[torch.Tensor]  # per model: for each output token its row there, or -1
    donor: torch.Tensor  # per output token: the model whose row fills it in, ZERO or AVERAGE
    digest: str  # of the whole layout, for provenance
    fixed: FixedRows | None = None  # the tokens given a source of their own, if any
    stripped: bool = False  # the output's tokenizer lost tokens past its model's rows

    def identity(self, model: int, rows: int) -> bool:
        """Whether model ``model`` (``rows`` rows) already has this layout."""
        return self.size == rows == self.tokens and bool(
            torch.equal(self.rows[model], torch.arange(rows))) and not (
            self.fixed is not None and bool(self.fixed.forced.any()))


def _vocab(tok: Any, rows: int) -> dict[str, int]:
    """A tokenizer's tokens with a row in the model (ids below its vocab_size)."""
    return {t: i for t, i in tok.get_vocab().items() if i < rows}


def build_vocabulary(tokenizers: Sequence[Tokenizer], source: int | None = None,
                     base: int | None = None, pad_to_multiple_of: int | None = None,
                     tokens: dict[str, TokenRow] | None = None) -> Vocabulary:
    """The layout of ``tokenizers``' models in the vocabulary of model ``source``'s tokenizer
    (None: the union, built from ``base``'s tokenizer, else the first), with the ``tokens``
    whose rows have a source of their own. Loads the tokenizers (small files); reads no
    weights."""
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise UsageError(f"pad_to_multiple_of must be at least 1 (got {pad_to_multiple_of})")
    loaded = [t.load() for t in tokenizers]
    vocabs = [_vocab(tok, t.rows) for t, tok in zip(tokenizers, loaded, strict=True)]
    first = 0 if base is None else base
    if source is None and all(v == vocabs[first] for v in vocabs):
        source = first  # the union of one vocabulary is that tokenizer
    out = first if source is None else source
    stripped: list[Path] | None = None
    if any(i >= tokenizers[out].rows for i in loaded[out].get_vocab().values()):
        loaded[out], stripped = _stripped(tokenizers[out], loaded[out], vocabs[out])
    if source is not None:
        out_tok = loaded[source]
        files = stripped or list(tokenizers[source].files)
    else:
        out_tok, files = _union(tokenizers, loaded, vocabs, first)
    out_vocab = out_tok.get_vocab()
    count_tokens = len(out_vocab)
    ids = sorted(out_vocab.values())
    if ids != list(range(count_tokens)):
        raise UsageError(f"the output tokenizer's ids are not 0..{count_tokens - 1}")
    size = count_tokens
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    order = sorted(out_vocab, key=out_vocab.__getitem__)
    rows = [torch.tensor([v.get(t, -1) for t in order], dtype=torch.long) for v in vocabs]
    present = torch.stack([r >= 0 for r in rows])  # models × tokens
    count = present.sum(0)
    donor = torch.full((count_tokens,), AVERAGE, dtype=torch.long)
    donor[count == 0] = ZERO
    single = count == 1
    donor[single] = present.to(torch.int8).argmax(0)[single]
    if base is not None:
        donor[(count > 1) & present[base]] = base
    fixed = _fixed_rows(tokenizers, vocabs, out_vocab, rows, tokens or {})
    h = hashlib.sha256()
    for r in [*rows, donor, *((fixed.model, fixed.row, fixed.forced) if fixed else ())]:
        h.update(r.numpy().tobytes())
    h.update(str(size).encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return Vocabulary(len(out_vocab), size, files, rows, donor, h.hexdigest()[:16], fixed,
                      stripped is not None)


def _fixed_rows(tokenizers: Sequence[Tokenizer], vocabs: list[dict[str, int]],
                out_vocab: dict[str, int], rows: list[torch.Tensor],
                tokens: dict[str, TokenRow]) -> FixedRows | None:
    """Per output token: the configured source model (UNSET, ZERO or a model), its row, and
    whether it is forced; None when no token is configured. Every reference is checked."""
    if not tokens:
        return None
    n = len(out_vocab)
    fixed = torch.full((n,), UNSET, dtype=torch.long)
    fixed_row = torch.full((n,), -1, dtype=torch.long)
    forced = torch.zeros(n, dtype=torch.bool)
    for tok, spec in tokens.items():
        if tok not in out_vocab:
            raise UsageError(f"tokens: {tok!r} is not a token of the output vocabulary")
        o = out_vocab[tok]
        forced[o] = spec.force
        if spec.model is None:
            fixed[o] = ZERO
            continue
        if not 0 <= spec.model < len(tokenizers):
            raise UsageError(f"tokens: {tok!r}: model {spec.model} is not one of the "
                             f"{len(tokenizers)} models")
        if spec.token is not None and spec.row is not None:
            raise UsageError(f"tokens: {tok!r}: give the source's token or its row, not both")
        label, have = tokenizers[spec.model].label, tokenizers[spec.model].rows
        if spec.row is not None:
            if not 0 <= spec.row < have:
                raise UsageError(f"tokens: {tok!r}: row {spec.row} is past the {have} rows "
                                 f"of {label}")
            row = spec.row
        elif spec.token is not None:
            if spec.token not in vocabs[spec.model]:
                raise UsageError(f"tokens: {tok!r}: {label} has no token {spec.token!r}")
            row = vocabs[spec.model][spec.token]
        else:
            row = int(rows[spec.model][o])
            if row < 0:
                raise UsageError(f"tokens: {tok!r}: {label} has no such token (name one of "
                                 "its tokens, or a row, as the source)")
        fixed[o], fixed_row[o] = spec.model, row
    return FixedRows(fixed, fixed_row, forced)


def _union(tokenizers: Sequence[Tokenizer], loaded: list[Any], vocabs: list[dict[str, int]],
           first: int) -> tuple[Any, list[Path]]:
    """The union tokenizer (the ``first`` model's with every other token added, and its
    generation config), saved once in the cache, and its files."""
    order = [first, *(i for i in range(len(loaded)) if i != first)]
    added: dict[str, Any] = {}
    for i in order:
        for idx, info in sorted(loaded[i].added_tokens_decoder.items()):
            if idx < tokenizers[i].rows:
                added.setdefault(info.content, info)
    have = set(vocabs[first])
    plain: list[str] = []
    for i in order[1:]:
        for tok, _ in sorted(vocabs[i].items(), key=lambda kv: kv[1]):
            if tok not in have and tok not in added:
                have.add(tok)
                plain.append(tok)
    new_added = [info for tok, info in added.items() if tok not in vocabs[first]]
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(dir=_tokenizer_root(), prefix=".copy-") as tmp:
        loaded[first].save_pretrained(tmp)  # a copy to extend, never the model's own object
        out = AutoTokenizer.from_pretrained(tmp)
    for tok in plain:
        out.add_tokens(tok)
    for info in new_added:
        out.add_tokens(info)
    return _cache_tokenizer(out, tokenizers[first].files)


def _stripped(spec: Tokenizer, tok: Any, vocab: dict[str, int]) -> tuple[Any, list[Path]]:
    """``tok`` without its tokens at ids past the model's rows (mergekit's
    ``get_stripped_tokenizer``): dropped from the added tokens and the BPE vocabulary, with
    every merge that involves one (mergekit keeps a merge that makes one of them, which the
    tokenizers library then refuses to load); saved once in the cache. ``vocab``: the tokens
    with rows."""
    rows, ids = spec.rows, tok.get_vocab()
    unused = {t for t, i in ids.items() if i >= rows}
    first = min(unused, key=ids.__getitem__)
    where = (f"{spec.label}: its tokenizer has {len(unused)} token(s) at ids past the model's "
             f"{rows} embedding rows (first {first!r} at {ids[first]})")
    if not getattr(tok, "is_fast", False):
        raise UsageError(f"{where}, and only a fast (tokenizer.json) tokenizer can be "
                         "stripped of them")
    doc = json.loads(tok.backend_tokenizer.to_str())
    if doc["model"]["type"] != "BPE":
        raise UsageError(f"{where}, and only a BPE tokenizer can be stripped of them (this "
                         f"one is {doc['model']['type']})")
    doc["added_tokens"] = [e for e in doc["added_tokens"] if e["id"] < rows]
    for t in unused:
        doc["model"]["vocab"].pop(t, None)

    prefix = doc["model"].get("continuing_subword_prefix") or ""

    def keep(merge: str | list[str]) -> bool:  # neither part nor the result is stripped
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        return not {a, b, a + b.removeprefix(prefix)} & unused

    doc["model"]["merges"] = [m for m in doc["model"]["merges"] if keep(m)]
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(dir=_tokenizer_root(), prefix=".strip-") as tmp:
        tok.save_pretrained(tmp)
        folder = Path(tmp)
        (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False),
                                               encoding="utf-8")
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            decoder = config.get("added_tokens_decoder") or {}
            config["added_tokens_decoder"] = {k: v for k, v in decoder.items()
                                              if int(k) < rows}
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                   encoding="utf-8")
        out = AutoTokenizer.from_pretrained(tmp)
    back = [t for t, i in out.get_vocab().items() if vocab.get(t) != i]
    if back:  # e.g. a special token (eos, pad) of the tokenizer's config, added back on load
        raise UsageError(f"{where}; {back[0]!r} is one of them, and the tokenizer's settings "
                         "name it (a special token?), so it cannot be stripped")
    return _cache_tokenizer(out, spec.files)


def _tokenizer_root() -> Path:
    root = cache_dir() / "tokenizers"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cache_tokenizer(tok: Any, model_files: Sequence[Path]) -> tuple[Any, list[Path]]:
    """``tok`` saved in the cache under the hash of its files (with the generation config
    of ``model_files``, if any), once; the tokenizer loaded from there, and its files."""
    from transformers import AutoTokenizer

    from surgery.checkpoint.checkpoint import TOKENIZER_FILES

    root = _tokenizer_root()
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        built = Path(tmp) / "built"
        tok.save_pretrained(built)
        for f in model_files:
            if f.name == "generation_config.json":
                shutil.copyfile(f, built / f.name)
        h = hashlib.sha256()
        for f in sorted(built.iterdir()):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        final = root / h.hexdigest()[:24]
        if not final.is_dir():
            try:
                os.rename(built, final)
            except OSError:
                if not final.is_dir():  # another process made it first: theirs is the same
                    raise
    files = [final / n for n in TOKENIZER_FILES if (final / n).is_file()]
    return AutoTokenizer.from_pretrained(final), files


def vocabulary_tensors(node: Node, rows: int) -> list[str]:
    """The tensors of ``node`` with one row per token: embedding and head tensors whose first
    dimension is the vocabulary size (position and token-type embeddings excluded)."""
    out = []
    for name in node.names():
        if tensor_kind(name) not in (TensorKind.EMBEDDING, TensorKind.HEAD):
            continue
        if "position" in name or "token_type" in name or name.endswith("wpe.weight"):
            continue
        shape = node.spec(name).shape
        if shape and shape[0] == rows:
            out.append(name)
    return out


class VocabularyNode(Node):
    """Model ``index`` of ``inputs`` laid out in ``vocab``: its vocabulary tensors rebuilt
    (reading every model's same-named tensor, for the rows it lacks), the rest as they are."""

    op = "align_vocabulary"
    reference = VOCABULARY_REF
    rowwise = True  # for the tensors it passes through (see rowwise_tensor)

    def __init__(self, inputs: Sequence[Node], index: int, vocab: Vocabulary,
                 names: list[str], params: dict[str, Any]) -> None:
        super().__init__()
        self.inputs = tuple(inputs)
        self.index = index
        self.vocab = vocab
        self.aligned = set(names)
        self._params = params

    def params(self) -> dict[str, Any]:
        return {**self._params, "model": self.index, "layout": self.vocab.digest}

    def _list_names(self) -> list[str]:
        return self.inputs[self.index].names()

    def spec(self, name: str) -> TensorSpec:
        spec = self.inputs[self.index].spec(name)
        if name in self.aligned:
            return TensorSpec((self.vocab.size, *spec.shape[1:]), spec.dtype)
        return spec

    def rowwise_tensor(self, name: str) -> bool:
        """A vocabulary tensor's rows come from anywhere in the inputs' (computed whole); the
        other tensors pass through, row for row."""
        return name not in self.aligned

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        if name in self.aligned:
            return [(n, name) for n in self.inputs]
        return [(self.inputs[self.index], name)]

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        own = ctx.value(self.inputs[self.index], name)
        if name not in self.aligned:
            return own
        tensors = [ctx.to_compute(ctx.value(n, name)) for n in self.inputs]
        return align_rows(tensors, self.index, self.vocab)

    def config(self) -> dict:
        config = self.inputs[self.index].config()
        if config:
            config["vocab_size"] = self.vocab.size
        return config

    def tokenizer_files(self) -> list[Path]:
        return list(self.vocab.files)


def align_rows(tensors: Sequence[torch.Tensor], index: int, vocab: Vocabulary) -> torch.Tensor:
    """Model ``index``'s tensor (rows: tokens) laid out in ``vocab``, from every model's."""
    own, rows, device = tensors[index], vocab.rows[index], tensors[index].device
    dtype = own.dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    out = torch.zeros((vocab.size, *own.shape[1:]), dtype=dtype, device=device)

    def where(mask: torch.Tensor) -> torch.Tensor:  # the output ids of a mask over tokens
        return mask.nonzero().squeeze(1)

    def copy(ids: torch.Tensor, j: int) -> None:  # rows ``ids`` from model j's own rows
        if ids.numel():
            out[ids.to(device)] = tensors[j][vocab.rows[j][ids].to(device)].to(dtype)

    own_rows = rows >= 0
    missing = ~own_rows
    fixed = vocab.fixed
    if fixed is not None:
        own_rows &= ~fixed.forced
        configured = ~own_rows & (fixed.model != UNSET)
        for j in range(len(tensors)):  # rows of configured tokens: their source's row
            ids = where(configured & (fixed.model == j))
            if ids.numel():
                out[ids.to(device)] = tensors[j][fixed.row[ids].to(device)].to(dtype)
        missing &= fixed.model == UNSET  # (a ZERO source stays zeros)
    copy(where(own_rows), index)
    for j in range(len(tensors)):
        copy(where(missing & (vocab.donor == j)), j)
    mean = where(missing & (vocab.donor == AVERAGE))
    if mean.numel():
        acc = torch.zeros((mean.numel(), *own.shape[1:]), dtype=dtype, device=device)
        for j, t in enumerate(tensors):  # summed in model order, as mergekit does
            src = vocab.rows[j][mean]
            at = where(src >= 0).to(device)
            acc[at] = acc[at] + t[src[src >= 0].to(device)].to(dtype)
        count = torch.stack([r[mean] >= 0 for r in vocab.rows]).sum(0).to(device, dtype)
        out[mean.to(device)] = acc / count.reshape(-1, *([1] * (acc.dim() - 1)))
    if vocab.size > vocab.tokens:
        out[vocab.tokens:] = torch.mean(out[:vocab.tokens], dim=0)
    return out


def _tokenizer_of(w: Weights, label: str) -> Tokenizer:
    config = w.config
    rows = config.get("vocab_size")
    if not isinstance(rows, int):
        raise UsageError(f"{label}: config.json has no vocab_size")
    from surgery.engine.run import output_tokenizer

    files = output_tokenizer(w.node, w.node.checkpoints(), None)
    if not [f for f in files if f.name != "generation_config.json"]:
        raise UsageError(f"{label} has no tokenizer files")
    return Tokenizer(label, tuple(files), rows)


def align_vocabularies(models: Sequence[Weights], *, source: int | None = None,
                       base: int | None = None, pad_to_multiple_of: int | None = None,
                       tokens: dict[str, TokenRow] | None = None,
                       labels: Sequence[str] | None = None) -> list[Weights]:
    """``models`` laid out in one vocabulary (see the module's text): model ``source``'s
    tokenizer's, or with ``source=None`` the union of their tokenizers, built from model
    ``base``'s (else the first). ``base``: the model whose rows fill in a token several others
    have. ``tokens``: the tokens whose rows come from a source of their own (:class:`TokenRow`,
    its model an index into ``models``). A model already in that layout is returned as it
    is; the others read every model's vocabulary tensors. Merge the results as usual: the
    output takes the new tokenizer."""
    if not models:
        raise UsageError("align_vocabularies: needs at least one model")
    labels = list(labels or [_label(w) for w in models])
    for what, i in (("source", source), ("base", base)):
        if i is not None and not 0 <= i < len(models):
            raise UsageError(f"align_vocabularies: {what}={i} is not one of the "
                             f"{len(models)} models")
    toks = [_tokenizer_of(w, label) for w, label in zip(models, labels, strict=True)]
    vocab = build_vocabulary(toks, source, base, pad_to_multiple_of, tokens)
    names = [vocabulary_tensors(w.node, t.rows) for w, t in zip(models, toks, strict=True)]
    for label, found in zip(labels[1:], names[1:], strict=True):
        if set(found) != set(names[0]):
            diff = sorted(set(found) ^ set(names[0]))
            raise ShapeMismatchError(
                f"align_vocabularies: {label} and {labels[0]} differ in their vocabulary "
                f"tensors ({diff[0]!r})")
    if not names[0]:
        raise UsageError(f"align_vocabularies: {labels[0]} has no embedding tensor with "
                         f"{toks[0].rows} rows (its vocab_size)")
    for name in names[0]:
        rest = {tuple(w.spec(name).shape[1:]) for w in models}
        if len(rest) > 1:
            raise ShapeMismatchError(f"align_vocabularies: tensor {name!r} has rows of "
                                     f"different shapes {sorted(rest)}")
    if not vocab.stripped and all(vocab.identity(i, t.rows) for i, t in enumerate(toks)):
        return list(models)  # one vocabulary already: nothing to lay out
    params = {"source": "union" if source is None else labels[source],
              "base": None if base is None else labels[base], "tokens": vocab.tokens,
              "rows": vocab.size}
    if tokens:
        params["token_sources"] = {
            tok: {"model": None if t.model is None else labels[t.model], "token": t.token,
                  "row": t.row, "force": t.force} for tok, t in tokens.items()}
    nodes = [w.node for w in models]
    return [Weights(VocabularyNode(nodes, i, vocab, names[i], params))
            for i in range(len(models))]


def _label(w: Weights) -> str:
    cks = w.node.checkpoints()
    return cks[0].source if cks else f"result of {w.node.op}"
