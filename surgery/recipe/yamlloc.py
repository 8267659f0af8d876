"""YAML loading that remembers where each value came from, so errors can say
``recipe.yaml:12:5: steps.merged.density: ...``."""

from __future__ import annotations

from typing import Any

import yaml

from surgery.errors import RecipeError

Loc = tuple[str | int, ...]


class Located:
    """The parsed document plus a map from key paths to 1-based (line, column)."""

    def __init__(self, source: str, data: Any, marks: dict[Loc, tuple[int, int]]) -> None:
        self.source = source
        self.data = data
        self.marks = marks

    def where(self, loc: Loc) -> str:
        """``file:line:col`` of the deepest known prefix of ``loc``."""
        for n in range(len(loc), -1, -1):
            mark = self.marks.get(tuple(loc[:n]))
            if mark:
                return f"{self.source}:{mark[0]}:{mark[1]}"
        return self.source

    def error(self, loc: Loc, message: str) -> RecipeError:
        path = ".".join(str(p) for p in loc)
        error = RecipeError(f"{self.where(loc)}: {path + ': ' if path else ''}{message}")
        error.key, error.detail = path, message
        return error


def load_located(text: str, source: str) -> Located:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}: invalid YAML ({problem})") from None
    marks: dict[Loc, tuple[int, int]] = {}
    if node is None:
        return Located(source, None, marks)
    return Located(source, _convert(node, (), marks, source), marks)


def _convert(node: yaml.Node, loc: Loc, marks: dict[Loc, tuple[int, int]], source: str) -> Any:
    marks[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in out:
                mark = key_node.start_mark
                raise RecipeError(f"{source}:{mark.line + 1}:{mark.column + 1}: "
                                  f"key {key!r} appears twice")
            out[key] = _convert(value_node, (*loc, key), marks, source)
            marks[(*loc, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(child, (*loc, i), marks, source) for i, child in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()
