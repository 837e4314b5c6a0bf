"""Small graph-editing helpers shared by the passes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def insert_after(node: fx.Node, fn: Callable, args: tuple, kwargs: dict | None = None,
                 reroute: bool = True, name: str | None = None) -> fx.Node:
    """Insert `fn(*args)` right after `node`; with `reroute`, every other user of `node` reads the new
    node instead (the usual way to splice an op into a stream)."""
    graph = node.graph
    with graph.inserting_after(node):
        new = graph.call_function(fn, args, kwargs or {})
    if name:
        new.name = graph._graph_namespace.create_name(name, None)
    copy_scope(node, new)
    if reroute:
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and not _feeds(user, new))
    return new


def _feeds(user: fx.Node, new: fx.Node) -> bool:
    """True where `user` is one of the nodes computing `new`'s arguments (keep those on the old value)."""
    return user in new.all_input_nodes


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node computed, directly or not, from `node`."""
    seen, todo = set(), [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def users_breadth_first(start: fx.Node, follow: Callable[[fx.Node], bool] = lambda n: True):
    """Yield the nodes computed from `start`, nearest first; the walk goes on through a node only where
    `follow(node)` is true."""
    todo, seen = [start], set()
    while todo:
        for user in todo.pop(0).users:
            if user not in seen:
                seen.add(user)
                yield user
                if follow(user):
                    todo.append(user)


def sdpa_mask(sdpa: fx.Node):
    """The attn_mask argument of a scaled_dot_product_attention node (positional or keyword)."""
    return sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")


def set_sdpa_mask(sdpa: fx.Node, mask: fx.Node) -> None:
    if len(sdpa.args) > 3:
        sdpa.args = sdpa.args[:3] + (mask,) + sdpa.args[4:]
    else:
        sdpa.kwargs = {**sdpa.kwargs, "attn_mask": mask}


def sdpa_is_causal(sdpa: fx.Node) -> bool:
    return bool(sdpa.args[5] if len(sdpa.args) > 5 else sdpa.kwargs.get("is_causal", False))


def copy_scope(src: fx.Node, dst: fx.Node) -> None:
    """Give an inserted node the module scope of the node it belongs with (for reports and analysis)."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def getitem(node: fx.Node, index: int) -> fx.Node:
    import operator

    with node.graph.inserting_after(node):
        item = node.graph.call_function(operator.getitem, (node, index))
    copy_scope(node, item)
    return item


def refresh_meta(gm: fx.GraphModule, flat_inputs: list) -> None:
    """Recompute every node's `meta["val"]` (fake tensors) after an edit, from the flat example inputs."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat_inputs[:len(placeholders)]]
    with torch.no_grad():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)


def run_flat(gm: fx.GraphModule, flat_inputs: list):
    """Call a captured GraphModule with flat inputs (bypassing its pytree call convention)."""
    return fx.Interpreter(gm).run(*flat_inputs)


def remove_dead(gm: fx.GraphModule) -> int:
    """Erase pure nodes whose value nobody reads. Unlike fx's own dead-code elimination this also
    erases inference-time dropouts (fx keeps every seeded-random op); asserts and mutations stay."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        target = node.target
        schema = getattr(target, "_schema", None)
        name = getattr(target, "__name__", "")
        if (schema is not None and schema.is_mutable) or "assert" in name or name.endswith("_"):
            continue
        if target is torch.ops.aten.dropout.default and node.args[2:3] == (True,):
            continue
        gm.graph.erase_node(node)
        removed += 1
    return removed
