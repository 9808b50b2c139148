"""The grid files' YAML reader: PyYAML's safe loader (plain data only, nothing executed), plus three limits.

- A key given twice in one mapping is an error (PyYAML keeps the last silently: `smartkv: {budget: 3}` then
  `smartkv: {budget: 5}` would drop a job). Merge keys (`<<: *base`) may still be overridden, as YAML intends.
- Aliases may add at most MAX_ALIAS_VALUES values beyond those written in the file, and may not refer to
  themselves: a few hundred bytes of nested aliases otherwise expand to billions of values (a "billion laughs"
  file) that exhaust memory wherever the grid is read, `status` included.
- Nesting deeper than MAX_DEPTH is an error rather than a RecursionError.
"""
from __future__ import annotations

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_ALIAS_VALUES = 10_000
MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"


class GridYAMLError(yaml.YAMLError):
    """A limit of this loader: `where` (line and column) and `problem`."""

    def __init__(self, problem: str, mark=None):
        self.problem = problem
        self.where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(yaml)"
        super().__init__(f"{self.where}: {problem}")


class GridLoader(yaml.SafeLoader):
    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            _check_duplicates(self, node)
        return super().construct_mapping(node, deep=deep)


def load(text: str):
    """Parse one YAML document with GridLoader; yaml.YAMLError (GridYAMLError for the limits) on bad input."""
    try:
        return yaml.load(text, Loader=GridLoader)  # noqa: S506 (GridLoader is a SafeLoader)
    except RecursionError:
        raise GridYAMLError(f"nested too deeply (at most {MAX_DEPTH} levels)") from None


def _check_duplicates(loader: GridLoader, node: MappingNode) -> None:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node)
        except TypeError:  # an unhashable key (a list or mapping as a key): PyYAML reports it itself
            continue
        if first is not key_node:
            raise GridYAMLError(f"duplicate key {key!r} (first given on line {first.start_mark.line + 1}); "
                                "each key may appear once in a mapping", key_node.start_mark)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: Node) -> None:
    """Values the document holds once aliases are expanded, counted without expanding them (each node's size is
    computed once; an alias shares its anchor's node), against the values written."""
    size: dict[int, int] = {}
    active: set[int] = set()   # nodes whose children are being counted: the path from the root (LIFO order)
    stack: list[tuple[Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, children_done = stack.pop()
        if id(node) in size:
            continue
        if depth > MAX_DEPTH:
            raise GridYAMLError(f"nested too deeply (at most {MAX_DEPTH} levels)", node.start_mark)
        if children_done:
            active.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in _children(node))
            continue
        if id(node) in active:
            raise GridYAMLError("an alias refers to the value that contains it", node.start_mark)
        active.add(id(node))
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in _children(node) if id(child) not in size)
    added = size[id(root)] - len(size)
    if added > MAX_ALIAS_VALUES:
        raise GridYAMLError(f"aliases expand to {size[id(root)]} values, {added} more than the file writes; at most "
                            f"{MAX_ALIAS_VALUES} more are allowed")
