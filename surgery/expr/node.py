"""The expression graph: nodes that compute one output tensor at a time.

A node knows its output tensor names (it may rename), the shape and dtype of each, how to
transform config.json, and how to compute one tensor from its inputs' tensors. Evaluation of one
output tensor goes through an :class:`EvalContext`, which memoises each node's value for that
tensor, so a base used by several task vectors is read and converted once.
"""

from __future__ import annotations

import copy
import hashlib
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.checkpoint import Checkpoint
from surgery.errors import ShapeMismatchError, UsageError


@dataclass(frozen=True)
class TensorSpec:
    """Shape and natural storage dtype of one output tensor (before the output cast)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def is_mergeable(dtype: torch.dtype) -> bool:
    """Floating tensors are merged; integer and bool buffers are copied from the first input."""
    return dtype.is_floating_point


def seeded_generator(seed: int, name: str, salt: str = "", device: str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, tensor name, salt): the same draws on every run and machine,
    whatever order the tensors are computed in."""
    digest = hashlib.sha256(f"{seed}\0{salt}\0{name}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


# Row pieces of :meth:`EvalContext.pieces` hold about this many elements.
PIECE_ELEMENTS = 256 * 1024


@dataclass
class EvalContext:
    """State for computing one output tensor: fetched leaf tensors, memoised node values."""

    name: str
    device: torch.device
    fetched: dict[tuple[int, str], torch.Tensor]
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32
    cache: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    # Set by the engine's write pass: CPU conversions go into reused buffers, listed in
    # ``scratch`` and handed back once the output tensor has been copied out.
    pool: Any = None
    scratch: list[torch.Tensor] = field(default_factory=list)
    # The rows (start, count) of the output tensor this context computes; None: all of it.
    rows: tuple[int, int] | None = None
    # The engine's worker threads (a ``Workers``), where this context may use them.
    workers: Any = None
    # Whole-tensor statistics of nodes (see ``ElementwiseNode``), by (id(node), name): shared
    # by the contexts of one tensor's blocks, and filled ahead by the engine where it can.
    statistics: dict[tuple[int, str], Any] = field(default_factory=dict)
    # Whole leaf tensors as stored, by (id(checkpoint), name), already read by the engine: the
    # pieces of a statistic are views of them instead of reads from the checkpoints.
    sources: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, shared among the engine's worker threads when this
        context may use them (``fn`` must then be safe to call from several threads)."""
        if self.workers is None:
            return [fn(x) for x in items]
        return self.workers.map(fn, items)

    def value(self, node: Node, name: str) -> torch.Tensor:
        key = (id(node), name)
        if key not in self.cache:
            self.cache[key] = node.compute(name, self)
        return self.cache[key]

    def read(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        t = self.fetched.pop((id(ckpt), name), None)
        if t is None:
            t = ckpt.read(name)
        return t.to(self.device, non_blocking=True)

    def to_compute(self, t: torch.Tensor) -> torch.Tensor:
        """Float tensors in the compute dtype (float32 by default); others unchanged."""
        if not t.dtype.is_floating_point or t.dtype == self.compute_dtype:
            return t
        if self.pool is None or t.device.type != "cpu":
            return t.to(self.compute_dtype)
        out = self.pool.tensor(tuple(t.shape), self.compute_dtype)
        self.scratch.append(out)
        return out.copy_(t)

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor like ``t``, from the engine's reused buffers when it has them
        (valid until this output tensor is done: fine for the value a node returns)."""
        if self.pool is None or t.device.type != "cpu":
            return torch.empty_like(t)
        return self.empty(tuple(t.shape), t.dtype)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor on this context's device, reused as :meth:`empty_like`."""
        if self.pool is None or self.device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=self.device)
        out = self.pool.tensor(shape, dtype)
        self.scratch.append(out)
        return out

    def statistic(self, node: ElementwiseNode, name: str) -> Any:
        """``node``'s whole-tensor statistic of tensor ``name``: the one the engine computed
        ahead, else computed now (from :meth:`pieces`) and kept for the tensor's other
        blocks."""
        key = (id(node), name)
        if key not in self.statistics:
            self.statistics[key] = node.statistic(name, self)  # type: ignore[misc]
        return self.statistics[key]

    def generator(self, name: str, salt: str) -> torch.Generator:
        return seeded_generator(self.seed, name, salt, device=str(self.device))

    def pieces(self, nodes: Sequence[Node], name: str
               ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(first row, values of ``nodes``) over consecutive pieces of about
        ``PIECE_ELEMENTS`` elements of the whole tensor ``name``, for a whole-tensor statistic
        of a row-wise node: slices of this context's values when it computes the whole
        tensor, else read afresh from the checkpoints, piece by piece."""
        shape = nodes[0].spec(name).shape
        if not shape:  # a scalar: always computed whole
            yield 0, [self.value(n, name) for n in nodes]
            return
        for rows in self.piece_rows(nodes, name):
            yield rows[0], self.piece(nodes, name, rows)

    def piece_rows(self, nodes: Sequence[Node], name: str) -> list[tuple[int, int]]:
        """The (start, count) rows of each piece :meth:`pieces` yields (none for a scalar)."""
        shape = nodes[0].spec(name).shape
        if not shape:
            return []
        if self.rows is None:  # computed once, before any piece is asked for (thread safety)
            for n in nodes:
                self.value(n, name)
        step = max(1, PIECE_ELEMENTS * shape[0] // max(math.prod(shape), 1))
        return [(start, min(step, shape[0] - start)) for start in range(0, shape[0], step)]

    def piece(self, nodes: Sequence[Node], name: str, rows: tuple[int, int],
              reuse: bool = False) -> list[torch.Tensor]:
        """The values of ``nodes`` over ``rows`` of tensor ``name`` (one of
        :meth:`piece_rows`); safe to call from several threads at once. With ``reuse``, what
        is read from the checkpoints goes into buffers of the calling thread, reused by its
        next such call: the values are then valid until that call (fresh memory costs a
        page fault per 4 KB). Leaves in :attr:`sources` are not read: their rows are views.
        """
        if self.rows is None:
            return [self.value(n, name).narrow(0, *rows) for n in nodes]
        reads = dict.fromkeys((ck, n) for node in nodes for ck, n in node.reads(name))
        fetched = {}
        for i, (ck, n) in enumerate(reads):
            whole = self.sources.get((id(ck), n))
            fetched[(id(ck), n)] = whole.narrow(0, *rows) if whole is not None else ck.read(
                n, thread_buffer(f"piece-read-{i}", (ck.read_size(n, rows),), torch.uint8,
                                 torch.device("cpu")) if reuse else None, rows)
        part = EvalContext(name, self.device, fetched, self.seed, self.compute_dtype, rows=rows,
                           statistics=self.statistics, sources=self.sources)
        return [part.value(n, name) for n in nodes]


_LOCAL = threading.local()


def thread_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """A buffer of the calling thread's, reused by its next call with the same ``name``,
    dtype and device: the leading ``shape`` of it (grown when too small)."""
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.dim() != len(shape) or any(
            have < want for have, want in zip(buf.shape, shape, strict=True)):
        buf = buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    for d, size in enumerate(shape):
        buf = buf.narrow(d, 0, size)
    return buf


class Node(ABC):
    """A lazy computation over tensors. Subclasses set ``op`` and ``params`` for provenance."""

    op: str = "node"
    reference: str | None = None
    inputs: tuple[Node, ...] = ()
    # Whether each output element depends only on the same element of the inputs (see
    # ``ElementwiseNode``), so the engine may compute large tensors in row blocks.
    rowwise: bool = False

    def __init__(self) -> None:
        self._names: list[str] | None = None

    def rowwise_tensor(self, name: str) -> bool:
        """Whether tensor ``name`` may be computed in row blocks (a node row-wise for some
        tensors only overrides this)."""
        return self.rowwise

    @abstractmethod
    def _list_names(self) -> list[str]: ...

    @abstractmethod
    def spec(self, name: str) -> TensorSpec: ...

    @abstractmethod
    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor: ...

    def names(self) -> list[str]:
        if self._names is None:
            self._names = self._list_names()
        return self._names

    def params(self) -> dict[str, Any]:
        """JSON-able parameters, for plans, provenance and model cards."""
        return {}

    def config(self) -> dict:
        """The config.json of this node's output (a copy the caller may change)."""
        return self.inputs[0].config() if self.inputs else {}

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        """Which (input node, tensor name) pairs output tensor ``name`` depends on."""
        return [(node, name) for node in self.inputs]

    def reductions(self) -> list[Reduction]:
        """Whole-model statistics this node needs before the write pass."""
        return []

    def card_sections(self) -> dict[str, str]:
        """Model-card sections (title -> markdown) reporting choices this node made."""
        return {}

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files of this node's output when it has a vocabulary of its own
        (see :mod:`surgery.methods.vocabulary`); empty: its inputs' tokenizer."""
        return []

    def provenance_records(self) -> dict[str, Any]:
        """Records for the output's provenance.json (key -> JSON-able value) of work this
        node did, such as a training run; two nodes giving one key give a list, in graph
        order."""
        return {}

    def reads(self, name: str) -> list[tuple[Checkpoint, str]]:
        """The leaf tensors computing ``name`` reads, in order, without duplicates."""
        seen: dict[tuple[int, str], tuple[Checkpoint, str]] = {}
        for node, sub in self.input_names(name):
            for ckpt, tname in node.reads(sub):
                seen.setdefault((id(ckpt), tname), (ckpt, tname))
        return list(seen.values())

    def walk(self) -> Iterator[Node]:
        """Every node of the graph below and including this one, each once, inputs first."""
        seen: set[int] = set()

        def visit(node: Node) -> Iterator[Node]:
            if id(node) in seen:
                return
            seen.add(id(node))
            for child in node.inputs:
                yield from visit(child)
            yield node

        yield from visit(self)

    def checkpoints(self) -> list[Checkpoint]:
        """Input checkpoints of the graph, in first-use order."""
        return [n.checkpoint for n in self.walk() if isinstance(n, LoadNode)]

    def describe(self) -> dict[str, Any]:
        """A JSON-able tree of the expression, for provenance."""
        if isinstance(self, LoadNode):
            return {"load": self.checkpoint.source}
        out: dict[str, Any] = {"op": self.op}
        out.update(self.params())
        out["inputs"] = [n.describe() for n in self.inputs]
        return out


class LoadNode(Node):
    """A leaf: the tensors of one checkpoint, as stored."""

    op = "load"

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.checkpoint = checkpoint

    def _list_names(self) -> list[str]:
        return self.checkpoint.names

    def rowwise_tensor(self, name: str) -> bool:
        return True  # read as stored, any rows

    def spec(self, name: str) -> TensorSpec:
        info = self.checkpoint.info(name)
        return TensorSpec(info.shape, info.dtype)

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        return ctx.read(self.checkpoint, name)

    def config(self) -> dict:
        return copy.deepcopy(self.checkpoint.config)

    def reads(self, name: str) -> list[tuple[Checkpoint, str]]:
        return [(self.checkpoint, name)]


TensorFn = Callable[[str, list[torch.Tensor], EvalContext], torch.Tensor]
# The statistic of a node that has one, and its fn, which gets the statistic as well.
StatisticFn = Callable[[str, EvalContext], Any]
StatisticTensorFn = Callable[[str, list[torch.Tensor], EvalContext, Any], torch.Tensor]


class ElementwiseNode(Node):
    """Combines same-named tensors of its inputs with ``fn`` (name, float tensors, ctx).

    All inputs must hold the same tensor names and shapes; this is checked from headers when the
    node is built. Integer and bool buffers are copied from the first input, never combined.
    ``rowwise`` says that the engine may compute a tensor in blocks of rows, to bound its
    memory: ``fn`` then gets those rows of the inputs, and ``ctx.rows`` says which they are.
    The blocks may be computed on several threads at once, in any order, so random draws must
    be a function of the entry's position, not of what was drawn before. With
    ``convert=False`` ``fn`` gets the floating inputs in their own dtypes and converts them
    itself (block by block, to save memory).

    A node whose blocks need a whole-tensor statistic gives ``statistic(name, ctx)``, which
    computes it from :meth:`EvalContext.pieces`; ``fn`` then gets it as a fourth argument
    (``statistic_bytes(name)``: at most how much memory that holds).
    It is computed once per tensor, before the tensor's first block: for a row-wise graph on
    the CPU the engine computes it on a thread of its own while the tensor before is being
    computed, so its reads overlap that computation.
    """

    def __init__(self, inputs: list[Node], fn: TensorFn | StatisticTensorFn, op: str,
                 params: dict[str, Any] | None = None, reference: str | None = None,
                 rowwise: bool = False, convert: bool = True,
                 statistic: StatisticFn | None = None,
                 statistic_bytes: Callable[[str], int] | None = None) -> None:
        super().__init__()
        self.rowwise = rowwise
        self.convert = convert
        self.statistic = statistic
        # At most how much memory computing the statistic of a tensor holds, for the plan's
        # peak-memory estimate (beyond the pieces it reads).
        self.statistic_bytes = statistic_bytes or (lambda name: 0)
        self.reference = reference
        if not inputs:
            raise UsageError(f"{op}: needs at least one model")
        self.inputs = tuple(inputs)
        self.fn = fn
        self.op = op
        self._params = params or {}
        check_compatible(self.inputs, op)

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def _list_names(self) -> list[str]:
        return self.inputs[0].names()

    def spec(self, name: str) -> TensorSpec:
        return self.inputs[0].spec(name)

    def input_names(self, name: str) -> list[tuple[Node, str]]:
        if not is_mergeable(self.inputs[0].spec(name).dtype):
            return [(self.inputs[0], name)]
        return [(node, name) for node in self.inputs]

    def compute(self, name: str, ctx: EvalContext) -> torch.Tensor:
        first = ctx.value(self.inputs[0], name)
        if not is_mergeable(first.dtype):
            return first
        tensors = [first, *(ctx.value(n, name) for n in self.inputs[1:])]
        if self.convert:
            tensors = [ctx.to_compute(t) for t in tensors]
        if self.statistic is not None:
            return self.fn(name, tensors, ctx, ctx.statistic(self, name))  # type: ignore[call-arg]
        return self.fn(name, tensors, ctx)  # type: ignore[call-arg]


def statistic_requests(root: Node, name: str) -> list[tuple[ElementwiseNode, str]]:
    """The (node, tensor name) pairs whose whole-tensor statistics computing output tensor
    ``name`` of ``root`` needs, inputs first (a statistic may be computed from nodes that
    need one themselves)."""
    out: list[tuple[ElementwiseNode, str]] = []
    seen: set[tuple[int, str]] = set()

    def visit(node: Node, sub: str) -> None:
        if (id(node), sub) in seen:
            return
        seen.add((id(node), sub))
        for child, child_name in node.input_names(sub):
            visit(child, child_name)
        if isinstance(node, ElementwiseNode) and node.statistic is not None \
                and is_mergeable(node.spec(sub).dtype):
            out.append((node, sub))

    visit(root, name)
    return out


def check_compatible(inputs: tuple[Node, ...], op: str) -> None:
    """Fail, naming the tensor, unless every input has the same names and shapes."""
    first = inputs[0]
    names = first.names()
    reference = set(names)
    for i, other in enumerate(inputs[1:], start=2):
        other_names = other.names()
        if len(other_names) != len(names) or set(other_names) != reference:
            missing = sorted(reference - set(other_names))
            extra = sorted(set(other_names) - reference)
            what = (f"lacks tensor {missing[0]!r}" if missing
                    else f"has extra tensor {extra[0]!r}")
            raise ShapeMismatchError(
                f"{op}: model {i} ({node_label(other)}) {what} that model 1 ({node_label(first)}) "
                f"{'has' if missing else 'lacks'}"
                + (f" (+{len(missing) + len(extra) - 1} more)" if len(missing) + len(extra) > 1
                   else "")
            )
        for name in names:
            a, b = first.spec(name), other.spec(name)
            if a.shape != b.shape:
                raise ShapeMismatchError(
                    f"{op}: tensor {name!r} has shape {list(b.shape)} in model {i} "
                    f"({node_label(other)}) but {list(a.shape)} in model 1 ({node_label(first)})"
                )
            if is_mergeable(a.dtype) != is_mergeable(b.dtype):
                raise ShapeMismatchError(
                    f"{op}: tensor {name!r} is {b.dtype} in model {i} but {a.dtype} in model 1"
                )


class Reduction(ABC):
    """A whole-model statistic computed by a streaming pass before the write pass.

    The engine calls :meth:`update` once per name in :meth:`names` with the values of
    ``inputs`` for that tensor, then :meth:`finalize`; nodes read :attr:`value` afterwards.
    """

    inputs: tuple[Node, ...] = ()
    _value: Any = None
    _done: bool = False

    def names(self) -> list[str]:
        return self.inputs[0].names()

    @abstractmethod
    def update(self, name: str, tensors: list[torch.Tensor]) -> None: ...

    @abstractmethod
    def finalize(self) -> Any: ...

    def resolve(self) -> None:
        self._value = self.finalize()
        self._done = True

    @property
    def resolved(self) -> bool:
        return self._done

    @property
    def value(self) -> Any:
        if not self._done:
            raise RuntimeError("reduction read before the engine resolved it")
        return self._value


def node_label(node: Node) -> str:
    """How messages name a model: its source for a loaded checkpoint, else the operation."""
    return node.checkpoint.source if isinstance(node, LoadNode) else f"result of {node.op}"
