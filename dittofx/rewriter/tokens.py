"""Token counts and token sizes: what lets passes change the tokens of a sequence.

Token counts. torch.export writes token counts as literals (`reshape(x, [B, 197, 3, 6, 64])`).
Before a pass changes the token count, `make_token_sizes_dynamic` rewrites every size that carries
the token axis (found by axis provenance) into one read from the tensor at run time: a `-1` where
the op allows it, else `sym_size(x, d)` arithmetic. The graph computes the same values as before
for the same inputs, and any token count afterwards.

Token sizes. A token that stands for several (ToMe's merged tokens, RLT's padded copies of a clip's
last token) has a size, a (B, N, 1) tensor; attention counts a token of size s as s tokens by adding
log(s) to its logits (`proportional_bias`, an additive SDPA mask, so the fused kernel stays), and a
mean over tokens weights each by its size (`size_weighted_mean`). These are graph nodes any pass may
insert; `sizes_at(sdpa)` tells a later pass which sizes an earlier one left, so it continues from them.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import torch
from torch import fx

from dittofx.rewriter import axes as ax
from dittofx.rewriter.edit import arg, copy_scope, set_arg

aten = torch.ops.aten
Tensor = torch.Tensor


def token_labels(axis: ax.Axis) -> frozenset[ax.Label]:
    """The labels that identify a token axis: everything but the batch."""
    return frozenset(lab for lab in axis.labels if lab.kind != "batch")


def _carries(axis: ax.Axis, labels: frozenset[ax.Label]) -> bool:
    return bool(labels & set(axis.labels))


def make_token_sizes_dynamic(gm: fx.GraphModule, amap: ax.AxisMap, labels: Iterable[ax.Label],
                             after: fx.Node | None = None) -> int:
    """Rewrite literal sizes that carry any of `labels` (in nodes after `after`); returns how many."""
    labels = frozenset(labels)
    graph = gm.graph
    nodes = list(graph.nodes)
    start = nodes.index(after) + 1 if after is not None else 0
    changed = 0
    for node in nodes[start:]:
        if node.op != "call_function":
            continue
        rewrite = _REWRITES.get(node.target)
        if rewrite is not None and rewrite(graph, node, amap, labels):
            changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return changed


def carrying(start: fx.Node, amap: ax.AxisMap, labels: set) -> set[fx.Node]:
    """`start` and the nodes downstream of it that still carry any of `labels` (its token axis)."""
    region, todo = {start}, [start]
    while todo:
        for user in todo.pop().users:
            if user in region or user.op != "call_function":
                continue
            axes = amap.tensors.get(user)
            carried = axes if isinstance(axes, tuple) else [a for t in (axes or []) for a in t]
            if any(labels & set(a.labels) for a in carried):
                region.add(user)
                todo.append(user)
    return region


def batch_sizes_to_literals(region: set[fx.Node], amap: ax.AxisMap, batch: set) -> None:
    """In the reshapes and expands of `region`, a batch size read from an input becomes its example value,
    which `make_token_sizes_dynamic` then turns into a size read from the reshaped tensor: for a pass that
    folds the batch into the token axis (RLT's packed clips: the batch is 1 once packed)."""
    for n in region:
        if n.target not in ax.RESHAPES and n.target is not aten.expand.default:
            continue
        target = list(n.args[1])
        out_axes = amap[n]
        changed = False
        for d, s in enumerate(target):
            if isinstance(s, fx.Node) and s in amap.symbols and set(amap.symbols[s].labels) <= batch \
                    and d < len(out_axes) and batch & set(out_axes[d].labels):
                target[d] = ax.int_value(s)
                changed = True
        if changed:
            n.args = (n.args[0], target) + tuple(n.args[2:])


def _size(graph: fx.Graph, node: fx.Node, x: fx.Node, dim: int) -> fx.Node:
    with graph.inserting_before(node):
        return graph.call_function(aten.sym_size.int, (x, dim))


def _product(graph: fx.Graph, node: fx.Node, factors: list, divide_by: list) -> object:
    """factors[0] * factors[1] ... // (divide_by...) as graph nodes (ints folded)."""
    literal = math.prod(f for f in factors if isinstance(f, int))
    value = literal
    with graph.inserting_before(node):
        for f in factors:
            if isinstance(f, fx.Node):
                value = f if value == 1 else graph.call_function(operator.mul, (value, f))
        divisor = math.prod(d for d in divide_by if isinstance(d, int))
        for d in divide_by:
            if isinstance(d, fx.Node):
                value = graph.call_function(operator.floordiv, (value, d))
        if divisor != 1:
            value = graph.call_function(operator.floordiv, (value, divisor))
    return value


def _rewrite_reshape(graph, node, amap, labels) -> bool:
    x, target = node.args[0], list(node.args[1])
    in_shape, out_shape = ax.shape_of(x), ax.shape_of(node)
    in_axes, out_axes = amap[x], amap[node]
    if in_shape is None or out_shape is None or not in_axes or len(target) != len(out_shape):
        return False
    fixes = {}
    for gi, go in ax.reshape_groups(in_shape, out_shape):
        if not any(_carries(in_axes[d], labels) for d in gi):
            continue
        token_out = [d for d in go if _carries(out_axes[d], labels) and isinstance(target[d], int)]
        if not token_out:
            continue
        if len(token_out) > 1:  # several token dims in one group: keep the first dynamic, rest literal
            token_out = token_out[:1]
        t = token_out[0]
        fixes[t] = (gi, [target[d] for d in go if d != t])
    if not fixes:
        return False
    if len(fixes) == 1 and -1 not in target:
        target[next(iter(fixes))] = -1
    else:
        for t, (gi, others) in fixes.items():
            sizes = [_size(graph, node, x, d) for d in gi]
            target[t] = _product(graph, node, sizes, others)
    node.args = (x, target) + tuple(node.args[2:])
    return True


def _rewrite_expand(graph, node, amap, labels) -> bool:
    x, target = node.args[0], list(node.args[1])
    in_axes, in_shape = amap[x], ax.shape_of(x)
    if not in_axes or in_shape is None:
        return False
    lead = len(target) - len(in_axes)
    changed = False
    for d in range(lead, len(target)):
        if isinstance(target[d], int) and target[d] == in_shape[d - lead] and target[d] != -1 \
                and _carries(in_axes[d - lead], labels):
            target[d] = -1
            changed = True
    if changed:
        node.args = (x, target) + tuple(node.args[2:])
    return changed


def _rewrite_split_sizes(graph, node, amap, labels) -> bool:
    """split_with_sizes(x, [5, 32], dim): the piece that holds the tokens takes what the others leave."""
    x, sizes = node.args[0], list(node.args[1])
    dim = node.args[2] if len(node.args) > 2 else 0
    axis = amap.axis_of(x, dim)
    if not _carries(axis, labels):
        return False
    pieces = amap.tensors.get(node)
    if not isinstance(pieces, list):
        return False
    dim = dim % len(ax.shape_of(x))
    token_pieces = [i for i, p in enumerate(pieces) if _carries(p[dim], labels) and p[dim].grid]
    if len(token_pieces) != 1 or not all(isinstance(s, int) for s in sizes):
        return False
    i = token_pieces[0]
    total = _size(graph, node, x, dim)
    rest = sum(s for j, s in enumerate(sizes) if j != i)
    with graph.inserting_before(node):
        sizes[i] = graph.call_function(operator.sub, (total, rest)) if rest else total
    node.args = (x, sizes) + tuple(node.args[2:])
    return True


_REWRITES = {
    aten.reshape.default: _rewrite_reshape,
    aten.view.default: _rewrite_reshape,
    aten._unsafe_view.default: _rewrite_reshape,
    aten.expand.default: _rewrite_expand,
    aten.split_with_sizes.default: _rewrite_split_sizes,
}


# -- token sizes -----------------------------------------------------------------------------------


def proportional_bias(size: Tensor, queries: Tensor | None = None) -> Tensor:
    """log(size) as an additive mask for the attention over `queries`: a token of size s counts s
    times. (B, 1, 1, N) for (B, H, N, d) queries; (B·H, 1, N) for queries with the heads folded into
    the batch, batch-major (B·H, N, d), or one head (B, N, d): `size_bias_problem` checks the layout."""
    bias = size.log().transpose(1, 2)[:, None]
    if queries is None or queries.dim() == 4:
        return bias
    heads = queries.shape[0] // max(1, bias.shape[0])
    return bias.expand(-1, heads, -1, -1).reshape(queries.shape[0], 1, bias.shape[-1])


def size_bias_problem(sdpa: fx.Node, amap: ax.AxisMap) -> str | None:
    """Why token sizes cannot bias this attention's logits (its queries' layout), or None."""
    if problem := folded_heads_problem(arg(sdpa, "query"), amap):
        return f"{problem}: token sizes cannot bias the attention"
    return None


def folded_heads_problem(x: fx.Node, amap: ax.AxisMap) -> str | None:
    """Why queries or keys `x` are not (B, H, N, d), (B, N, d) of one head, nor (B·H, N, d) folded
    batch-major from (B, H, ...) by a reshape; None when they are one of those."""
    shape = ax.shape_of(x) or ()
    if len(shape) == 4 or (len(shape) == 3 and _batch_major(x, amap)):
        return None
    return (f"the attention's {x.name} {tuple(shape)} is not (batch, heads, tokens, dim) nor its heads folded "
            f"batch-major into the batch")


def _batch_major(q: fx.Node, amap: ax.AxisMap) -> bool:
    """(B·H, N, d) queries made by a reshape of (B, H, ...), or (B, N, d) queries of one head."""
    shape = ax.shape_of(q)
    batch = next((lab for lab in amap.axis_of(q, 0).labels if lab.kind == "batch"), None)
    if batch is None:
        return False
    if shape[0] == batch.size:
        return True
    n = q
    while n.target not in ax.RESHAPES and n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node) \
            and ax.shape_of(n.args[0]) == shape:  # clones, casts, contiguous
        n = n.args[0]
    src_shape = ax.shape_of(n.args[0]) or () if n.target in ax.RESHAPES else ()
    return len(src_shape) == 4 and src_shape[0] * src_shape[1] == shape[0] and \
        any(lab.kind == "batch" for lab in amap.axis_of(n.args[0], 0).labels)


def set_size_bias(gm: fx.GraphModule, sdpa: fx.Node, size: fx.Node) -> list[fx.Node]:
    """Make `sdpa` add log(size) to its logits (proportional attention), on top of its own mask
    (replacing an earlier pass's size bias). Returns the nodes inserted."""
    mask = arg(sdpa, "attn_mask")
    with gm.graph.inserting_before(sdpa):
        inserted = [gm.graph.call_function(proportional_bias, (size, arg(sdpa, "query")))]
        if isinstance(mask, fx.Node) and sizes_at(sdpa) is None:
            inserted.append(gm.graph.call_function(add_bias, (mask, inserted[0])))
    for node in inserted:
        copy_scope(sdpa, node)
    set_arg(sdpa, "attn_mask", inserted[-1])
    return inserted


def add_bias(mask: Tensor, bias: Tensor) -> Tensor:
    """Combine an existing SDPA mask with a proportional-attention bias."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(~mask, -math.inf)
    return mask + bias


def size_weighted_mean(x: Tensor, size: Tensor, offset: int, keepdim: bool) -> Tensor:
    """A mean over tokens (dim 1) that counts each token as many times as its size; `size` starts at
    token `offset` of `x`."""
    w = size[:, offset:]
    return (x * w).sum(1, keepdim=keepdim) / w.sum(1, keepdim=keepdim)


def is_size_bias(mask) -> bool:
    return isinstance(mask, fx.Node) and mask.target in (proportional_bias, add_bias)


def sizes_at(sdpa: fx.Node) -> fx.Node | None:
    """The token sizes whose proportional bias is this attention's mask (an earlier rewrite's), or None."""
    mask = arg(sdpa, "attn_mask")
    if isinstance(mask, fx.Node) and mask.target is proportional_bias:
        return mask.args[0]
    return None


def _mean_axes(node: fx.Node, amap: ax.AxisMap):
    axes = amap[node.args[0]]
    return (axes[:1] + (ax.EMPTY,) + axes[2:]) if node.args[3] else (axes[:1] + axes[2:])


ax.register_rule(size_weighted_mean, _mean_axes)
