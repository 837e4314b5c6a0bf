"""Editing a captured graph: inserting and replacing nodes, reading arguments by name, walking users,
reading values on the example, and the clean-up and metadata refresh after a pass.

    add = Inserter(after=block.stream, like=block.stream)   # a chain of new nodes after the stream
    metric = add(head_mean, key)
    keep, src, dst = add.getitems(add(match, metric, r), 3)
    reroute(block.stream, merged, skip=add.nodes)           # every other reader now reads `merged`
    mask = arg(sdpa, "attn_mask")                           # positional or keyword, by schema name
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Iterable

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from dittofx._torch_compat import copy_codegen, detect_fake_mode, fresh_name, unexampled_unbacked_symbols

# -- arguments by name -----------------------------------------------------------------------------


@functools.cache
def _parameter_names(target) -> tuple[str, ...]:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return tuple(a.name for a in schema.arguments)
    try:
        return tuple(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return ()


def arg(node: fx.Node, name: str, default=None):
    """The argument `name` of a call_function node, positional or keyword (by the ATen schema, or the
    signature of an inserted Python function); `default` where the call leaves it out."""
    names = _parameter_names(node.target)
    if name in node.kwargs:
        return node.kwargs[name]
    if name in names and names.index(name) < len(node.args):
        return node.args[names.index(name)]
    return default


def set_arg(node: fx.Node, name: str, value) -> None:
    """Set the argument `name` where the call has it (positional stays positional), else as keyword."""
    names = _parameter_names(node.target)
    if name in names and names.index(name) < len(node.args):
        i = names.index(name)
        node.args = node.args[:i] + (value,) + node.args[i + 1:]
    else:
        node.kwargs = {**node.kwargs, name: value}


# -- inserting and replacing -----------------------------------------------------------------------


def copy_scope(src: fx.Node, dst: fx.Node) -> None:
    """Give an inserted node the module scope of the node it belongs with (for reports and analysis)."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


class Inserter:
    """Appends nodes one after another from `after`, each in the module scope of `like`; `nodes` lists
    them (what a `reroute` of the value they read must skip)."""

    def __init__(self, after: fx.Node, like: fx.Node | None = None):
        self.after, self.like, self.nodes = after, like if like is not None else after, []

    def _place(self, make: Callable[[fx.Graph], fx.Node]) -> fx.Node:
        graph = self.after.graph
        with graph.inserting_after(self.after):
            node = make(graph)
        copy_scope(self.like, node)
        self.after = node
        self.nodes.append(node)
        return node

    def __call__(self, fn, *args, **kwargs) -> fx.Node:
        return self._place(lambda g: g.call_function(fn, args, kwargs))

    def getitem(self, tuple_node: fx.Node, i: int) -> fx.Node:
        return self(operator.getitem, tuple_node, i)

    def getitems(self, tuple_node: fx.Node, n: int) -> list[fx.Node]:
        return [self.getitem(tuple_node, i) for i in range(n)]

    def module(self, gm: fx.GraphModule, name: str, module: nn.Module, *args) -> fx.Node:
        gm.add_submodule(name, module)
        return self._place(lambda g: g.call_module(name, args))

    def constant(self, gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
        """`value` as a buffer of `gm` (not saved in its state dict), on the device of `like`'s value."""
        like = self.like.meta.get("val")
        if isinstance(like, torch.Tensor) and like.device.type != "meta":
            value = value.to(like.device)
        gm.register_buffer(name, value, persistent=False)
        return self._place(lambda g: g.get_attr(name))


def insert_after(node: fx.Node, fn: Callable, args: tuple, kwargs: dict | None = None,
                 reroute: bool = True, name: str | None = None) -> fx.Node:
    """Insert `fn(*args)` right after `node`; with `reroute`, every other user of `node` reads the new
    node instead (the usual way to splice an op into a stream)."""
    new = Inserter(node)(fn, *args, **(kwargs or {}))
    if name:
        new.name = fresh_name(node.graph, name)
    if reroute:
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and user not in new.all_input_nodes)
    return new


def reroute(old: fx.Node, new: fx.Node, skip: Iterable[fx.Node] = (), only: set[fx.Node] | None = None) -> None:
    """Users of `old` read `new` instead, except `skip` (the nodes computing `new`), and only `only`
    where given."""
    skip = set(skip)
    old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in skip and (only is None or u in only))


def replace_node(old: fx.Node, fn, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """`fn(*args, **kwargs)` in place of `old`: inserted before it, in its scope, read by its users;
    `old` is erased."""
    graph = old.graph
    with graph.inserting_before(old):
        new = graph.call_function(fn, args, kwargs or {})
    copy_scope(old, new)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


# -- walking ---------------------------------------------------------------------------------------


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node computed, directly or not, from `node`."""
    seen, todo = set(), [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def ancestors(node: fx.Node, stop: Callable[[fx.Node], bool] = lambda n: False) -> set[fx.Node]:
    """Every node `node` is computed from (itself included), not walking past nodes where `stop` holds
    (those are not included)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or stop(n):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
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


# -- values and metadata ---------------------------------------------------------------------------


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with its own graph (same node names, metadata, calling convention) and the same
    parameters, buffers and submodules: edits of one do not touch the other."""
    graph = fx.Graph()
    copy_codegen(graph, gm.graph)
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(gm.meta)
    return copy


def values_at(gm: fx.GraphModule, nodes: Iterable[fx.Node], flat_inputs: list) -> dict[fx.Node, object]:
    """The values of `nodes` when the graph runs on the flat example inputs (it stops after the last)."""
    wanted, values = set(nodes), {}

    class _Done(Exception):
        pass

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
                if len(values) == len(wanted):
                    raise _Done
            return out

    if wanted:
        try:
            with torch.no_grad():
                Recorder(gm).run(*flat_inputs)
        except _Done:
            pass
    return values


def refresh_meta(gm: fx.GraphModule, flat_inputs: list) -> None:
    """Recompute every node's `meta["val"]` (fake tensors) after an edit.

    First under the capture's own fake mode and ShapeEnv, from the placeholders' symbolic values, so
    that sizes the capture left symbolic (the batch) stay symbolic. Where a pass inserted sizes that
    depend on the data (RLT's kept-token counts: nonzero inside an inserted function), torch's
    propagation refuses them (PendingUnbackedSymbolNotFound: a fresh unbacked size not in the node's
    outputs) or leaves unbacked sizes, which have no example value for the analysis: then the values
    are recomputed from the flat example inputs with static shapes, as the data-dependent nodes
    expect (they carry the example's counts as hints). Where even that fails (a data-dependent op
    outside inserted functions: Mochi's per-sample nonzero, moved into an outlined attention), the
    values are those of one real run on the example inputs, as static fakes: stateful modules in the
    graph see that call (the pass manager resets them after).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbolic = [ph.meta.get("val") for ph in placeholders]
    mode = detect_fake_mode(*[v for v in symbolic if isinstance(v, torch.Tensor)])
    if mode is not None and mode.shape_env is not None:
        try:
            with torch.no_grad():
                FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*symbolic)
            if not any(unexampled_unbacked_symbols(n.meta.get("val")) for n in gm.graph.nodes):
                return
        except Exception:  # noqa: BLE001 - data-dependent sizes: the static refresh below
            pass
    for n in gm.graph.nodes:  # bindings of unbacked sizes mean nothing without a ShapeEnv
        n.meta.pop("unbacked_bindings", None)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat_inputs[:len(placeholders)]]
    try:
        with torch.no_grad():
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception:  # noqa: BLE001 - an op with no static fake (nonzero): one real run
        _real_meta(gm, flat_inputs[:len(placeholders)], mode)


def _real_meta(gm: fx.GraphModule, flat_inputs: list, mode: FakeTensorMode) -> None:
    """Every node's `meta["val"]`: a static fake of its value in one real run on the example inputs."""

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = pytree.tree_map_only(torch.Tensor, mode.from_tensor, out)
            return out

    with torch.no_grad():
        Recorder(gm).run(*flat_inputs)


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
