"""Static specialisation of gated sites: one flat graph for one decision of which sites compute.

A gated graph decides at run time, in a `gate` node, which of its `call_module` sites run their child
graph (the rest return a value kept from an earlier call). Python state cannot live in a compiled or
exported graph, so for a fixed decision `computes` this builds the graph that decision runs:

    inputs   (*the graph's flat inputs, *the kept outputs of every site that does not compute)
    outputs  (*the graph's flat outputs, *the fresh outputs of every site that computes)

both in site order. A computing site's child graph is inlined; a site that does not compute is not
in the result at all; the gate is gone. `fold` names kept outputs (site, output) whose dim 0 is a
multiple of the batch (B * frames, B * tokens), with their other dims: those are passed batch-major,
(B, multiple, *dims), so that every input and output shares one dynamic batch dim (an exact reshape
on either side). PAB's runners and its ONNX export are built on this (runtime/pab.py).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx
from torch.utils import _pytree as pytree

from dittofx.rewriter.outline import inline

aten = torch.ops.aten


def site_outputs(sites: dict[int, fx.Node], body: Callable[[fx.Node], fx.GraphModule]) -> dict[int, int]:
    """How many values each site returns."""
    return {i: len(body(n).graph.find_nodes(op="output")[0].args[0]) for i, n in sites.items()}


def cache_layout(n_out: dict[int, int], computes: tuple[bool, ...]) -> tuple[list, list]:
    """(kept outputs read, fresh outputs written) as (site, output) pairs, for one decision."""
    ins = [(i, j) for i in sorted(n_out) if not computes[i] for j in range(n_out[i])]
    outs = [(i, j) for i in sorted(n_out) if computes[i] for j in range(n_out[i])]
    return ins, outs


def specialize(gm: fx.GraphModule, gate: fx.Node, sites: dict[int, fx.Node], computes: tuple[bool, ...],
               body: Callable[[fx.Node], fx.GraphModule], fold: dict[tuple[int, int], tuple] | None = None,
               batch_input: int | None = None) -> fx.GraphModule:
    """The flat graph of decision `computes` (see the module docstring). `body(site)` is the child graph a
    site runs on its inputs `site.args[1:]` (its first argument is the gate's value); `batch_input`, the
    flat input whose dim 0 is the batch (needed with `fold`)."""
    fold = fold or {}
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        env[ph] = graph.placeholder(ph.name)
        env[ph].meta = dict(ph.meta)
    n_out = site_outputs(sites, body)
    kept: dict[int, tuple] = {}
    for i in sorted(sites):
        if not computes[i]:
            vals = {u.args[1]: u.meta.get("val") for u in sites[i].users}
            kept[i] = tuple(graph.placeholder(f"cache_{i}_{j}") for j in range(n_out[i]))
            for j, p in enumerate(kept[i]):
                p.meta["val"] = vals.get(j)
    batch = None
    if fold:
        batch = graph.call_function(aten.sym_size.int, (env[placeholders[batch_input]], 0))
        for i, nodes in kept.items():
            kept[i] = tuple(graph.call_function(aten.reshape.default, (p, [-1, *fold[(i, j)]]))
                            if (i, j) in fold else p for j, p in enumerate(nodes))
    site_of = {n: i for i, n in sites.items()}
    fresh: dict[int, list] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n is gate:
            continue
        if n.op == "output":
            new_out = [env[o] if isinstance(o, fx.Node) else o for o in pytree.tree_leaves(n.args[0])]
            for i in sorted(sites):
                if computes[i]:
                    new_out.extend(fresh[i])
            graph.output(tuple(new_out))
            break
        if n in site_of:
            i = site_of[n]
            if computes[i]:
                env[n] = inline(graph, body(n), fx.node.map_arg(tuple(n.args[1:]), lambda a: env[a]))
                fresh[i] = [graph.call_function(aten.reshape.default, (o, [batch, -1, *fold[(i, j)]]))
                            if (i, j) in fold else o for j, o in enumerate(env[n])]
            else:
                env[n] = kept[i]
            continue
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node) \
                and n.args[0] in site_of:
            env[n] = env[n.args[0]][n.args[1]]
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    prog = fx.GraphModule(gm, graph, class_name="Specialized")
    prog.graph.eliminate_dead_code()
    prog.recompile()
    return prog
