"""Outlining: move part of a graph into a submodule that one `call_module` node calls (the inverse of
inlining), so that a pass can decide at run time whether that part runs at all.

    region = exclusive_cone(seeds, scope="blocks.3.attn")    # what only these nodes need
    call, outputs = outline(gm, region, "cache.sites.0", wrap)  # wrap(child GraphModule) -> nn.Module

`inline(graph, child, args)` copies a child's nodes back into a graph.

The child GraphModule takes the region's inputs (tensors, SymInts, lists of tensors) as placeholders,
reads parameters through its own `get_attr` nodes (shared, not copied), and returns a tuple of the
region's outputs. The parent reads each output through a getitem of the call.

In-place writes move with what they write: a region that reads a tensor written in place (a rotary
embedding `copy_`-ed into slices of an `empty_like`) takes the writes in with it, and a write that
cannot come along (it writes memory read outside the region too) makes `outline` refuse
(`OutlineError`) rather than move a read before its write (rewriter/alias.py).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from torch import fx, nn

from dittofx.rewriter.alias import Storage
from dittofx.rewriter.analysis import module_path
from dittofx.rewriter.edit import copy_scope


class OutlineError(ValueError):
    """The region cannot be outlined (it reads a value that depends on its own outputs, or memory
    written in place across its boundary)."""


def _in_scope(node: fx.Node, scope: str | None) -> bool:
    return scope is None or scope in module_path(node)


def exclusive_cone(seeds, scope: str | None = None, descendants_of=()) -> set[fx.Node]:
    """The seeds, plus every call_function node inside `scope` that only they need (all its users are in
    the cone, or are checks with no users), plus every node inside `scope` computed from a node of
    `descendants_of`. Checks with no users (shape asserts) on values of the cone, and in-place writes
    into memory the cone reads, join it."""
    region = set(seeds)
    sources = set(descendants_of)
    graph = next(iter(region | sources)).graph
    candidates = [n for n in graph.nodes if n.op == "call_function" and _in_scope(n, scope)]
    storage = Storage(graph)
    reached = set(sources)
    for n in candidates:
        if n in sources or any(a in reached for a in n.all_input_nodes):
            reached.add(n)
            region.add(n)
    changed = True
    while changed:
        changed = False
        read = storage.reads(region)
        for n in reversed(candidates):
            if n in region:
                continue
            joins = (n.users and all(u in region or not u.users for u in n.users)) \
                or (not n.users and n.all_input_nodes and any(a in region for a in n.all_input_nodes)) \
                or storage.writes(n) & read
            if joins:
                region.add(n)
                changed = True
    return region


def _check_writes(graph: fx.Graph, region: set[fx.Node], order: dict, span: tuple[float, float], target: str) -> None:
    """No in-place write changes what a read sees once the region runs at one place: a write and a read
    of the same memory, one inside and one outside, may not lie within `span` (from the first to the
    last position the region's nodes run at, before or after outlining)."""
    storage = Storage(graph)
    lo, hi = span
    inside = storage.reads(region)
    for w in storage.writers:
        if w in region:
            written = storage.writes(w)
            clash = next((n for n in graph.nodes if n not in region and n.op != "output" and lo < order[n] < hi
                          and storage.reads([n]) & written), None)
        else:
            clash = w if lo < order[w] < hi and storage.writes(w) & inside else None
        if clash is not None:
            raise OutlineError(f"region for {target}: {w.name} writes in place into memory that "
                               f"{'the region' if w not in region else clash.name} reads")


def outline(gm: fx.GraphModule, region: set[fx.Node], target: str, wrap: Callable[[fx.GraphModule], nn.Module],
            extra_args: tuple = ()) -> tuple[fx.Node, list[fx.Node]]:
    """Replace `region` by `call_module(target, (*extra_args, *inputs))`; the module at `target` is
    `wrap(child)`, where `child` computes the region. Returns the call and the getitem per output.

    Parameters (get_attr nodes) the region reads are read inside the child, not passed in.
    """
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(region, key=order.__getitem__)
    inputs, seen = [], set()
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in region and a.op != "get_attr" and a not in seen:
                seen.add(a)
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in region for u in n.users)]
    if not outputs:
        raise OutlineError(f"region for {target} has no outputs")
    # the call goes after the last value it reads, and must come before the first use of its outputs
    anchors = inputs + [a for a in extra_args if isinstance(a, fx.Node)]
    last_input = max(anchors, key=order.__getitem__) if anchors else \
        [n for n in graph.nodes if n.op == "placeholder"][-1]
    first_use = min((order[u] for o in outputs for u in o.users if u not in region), default=len(order))
    if order[last_input] >= first_use:
        raise OutlineError(f"region for {target} reads a value computed from its own outputs")
    at = order[last_input] + 0.5  # where the call will run
    _check_writes(graph, region, order, (min(at, order[nodes[0]]), max(at, order[nodes[-1]])), target)

    child = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = child.placeholder(a.name)
        env[a].meta = dict(a.meta)

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:  # a parameter or buffer: read it in the child too
            env[a] = child.get_attr(a.target)
            env[a].meta = dict(a.meta)
        return env[a]

    for n in nodes:
        env[n] = child.node_copy(n, lookup)
    child.output(tuple(env[o] for o in outputs))
    child_gm = fx.GraphModule(gm, child, class_name="Outlined")
    gm.add_submodule(target, wrap(child_gm))

    with graph.inserting_after(last_input):
        call = graph.call_module(target, tuple(extra_args) + tuple(inputs))
    copy_scope(outputs[-1], call)
    items = []
    previous = call
    for j, o in enumerate(outputs):
        with graph.inserting_after(previous):
            item = graph.call_function(operator.getitem, (call, j))
        copy_scope(o, item)
        item.meta["val"] = o.meta.get("val")
        o.replace_all_uses_with(item, delete_user_cb=lambda user: user not in region)
        items.append(item)
        previous = item
    for n in reversed(nodes):
        graph.erase_node(n)
    return call, items


def inline(graph: fx.Graph, child: fx.GraphModule, args: tuple) -> tuple:
    """Copy `child`'s nodes into `graph` with its placeholders bound to `args`; returns its outputs.
    Its get_attr targets must name the same tensors in `graph`'s module (true of an outlined child)."""
    env = {}
    placeholders = iter(args)
    for c in child.graph.nodes:
        if c.op == "placeholder":
            env[c] = next(placeholders)
        elif c.op == "output":
            return tuple(fx.node.map_arg(c.args[0], lambda a: env[a]))
        else:
            env[c] = graph.node_copy(c, lambda a: env[a])
    raise ValueError("a child graph without an output")
