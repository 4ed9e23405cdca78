"""YAML job files read with bounds: a few hundred bytes of anchors and aliases can expand to billions of
nodes (a "billion laughs" file ends in MemoryError after half a minute), and deep nesting overflows the
parser's recursion. Both are refused at once, with the file named. Only YAML's safe types are built.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 64  # nesting levels; job files use fewer than ten
MAX_NODES = 200_000  # nodes after aliases are expanded; the largest shipped job file has a few hundred


class YamlLimitError(yaml.YAMLError):
    """The document exceeds the bounds above."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlLimitError(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def expanded_nodes(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is expanded, computed without expanding (each shared
    node's count is taken once); a node that contains itself is refused."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_NODES:
                return sizes[key]
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YamlLimitError("an alias refers to a node that contains it")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` within the bounds above (a ``yaml.YAMLError`` names what is wrong)."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = expanded_nodes(node)
        if size > MAX_NODES:
            raise YamlLimitError(f"its aliases expand to more than {MAX_NODES:,} nodes")
        return loader.construct_document(node)
    finally:
        loader.dispose()
