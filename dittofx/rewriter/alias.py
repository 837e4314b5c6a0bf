"""Which values of a graph share memory, and which nodes write into it in place.

Captured graphs keep in-place writes: rotary embeddings written into slices of an `empty_like`
(Wan, CogVideoX 5B, EasyAnimate: `out[..., 0::2].copy_(...)`), `add_` on a buffer. A `copy_` has no
users, so a rewrite that follows data flow alone (outlining a region, moving a node) loses it, and
the moved code reads memory that was never written. This module answers, from the ATen schemas'
alias annotations: which nodes are views of the same storage (`Storage`), and which storages a node
writes (`Storage.writes`).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

# ops that may return their input itself but whose schema does not say so (composite: `to` inside)
_MAY_RETURN_INPUT = {aten.type_as.default}


def _schema(node: fx.Node):
    target = node.target
    return target._schema if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) else None


def _argument(node: fx.Node, i: int, name: str):
    return node.args[i] if i < len(node.args) else node.kwargs.get(name)


class Storage:
    """Storage classes of a graph's values: `root(n)` is the same node for every view of one tensor."""

    def __init__(self, graph: fx.Graph):
        self._parent: dict[fx.Node, fx.Node] = {}
        self._writes: dict[fx.Node, list[fx.Node]] = {}
        for node in graph.nodes:
            schema = _schema(node)
            if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
                if node.args[0] in self._parent:  # an element of a list of views (unbind, split, chunk)
                    self._union(node, node.args[0])
                continue
            if node.target in _MAY_RETURN_INPUT and isinstance(node.args[0], fx.Node):
                self._union(node, node.args[0])
                continue
            if schema is None:
                continue
            returned = {s for r in schema.returns if r.alias_info is not None for s in r.alias_info.before_set}
            for i, a in enumerate(schema.arguments):
                value = _argument(node, i, a.name)
                if a.alias_info is None or not isinstance(value, fx.Node):
                    continue
                if a.alias_info.before_set & returned:
                    self._union(node, value)
                if a.alias_info.is_write:
                    self._writes.setdefault(node, []).append(value)

    def _find(self, n: fx.Node) -> fx.Node:
        while self._parent.get(n, n) is not n:
            n = self._parent[n]
        return n

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        self._parent.setdefault(a, a)
        self._parent.setdefault(b, b)
        ra, rb = self._find(a), self._find(b)
        if ra is not rb:
            self._parent[ra] = rb

    def root(self, n: fx.Node) -> fx.Node:
        return self._find(n) if n in self._parent else n

    @property
    def writers(self) -> list[fx.Node]:
        """The nodes that write into an argument in place, in graph order."""
        return list(self._writes)

    def writes(self, node: fx.Node) -> set[fx.Node]:
        """The storages (roots) `node` writes in place; empty for a pure node."""
        return {self.root(v) for v in self._writes.get(node, ())}

    def reads(self, nodes) -> set[fx.Node]:
        """The storages `nodes` read or produce (their own values and their tensor inputs)."""
        return {self.root(m) for n in nodes for m in (n, *n.all_input_nodes)}
