"""Position-indexed operands of an attention: what lets rotary tables follow merged or re-ordered tokens.

A rotary ViT or video DiT multiplies its queries and keys by tables indexed by token position (EVA02's
`rope.pos_embed`, VJEPA2's sin/cos of `arange(N)`, a DiT's frequencies read from a grid). They are sized
for the captured token count: once a pass merges or re-orders the tokens that enter an attention, every
such table must take, for each token now there, the row of the position that token carries.

Everything comes from the graph. Walking back from the attention's q, k and v, each value between them
and the q/k/v projections gets coordinates: the dim that holds the tokens and the site position of its
row 0 (a slice or split along the tokens moves it, a cat shifts each piece; a reshape that folds the
tokens into another axis ends the walk with a reason). Values with token coordinates that come from a
projection are the token stream; the others (from buffers, constants, aranges over a literal token
count, model inputs) are position-indexed operands, gathered where they meet the stream
(`take_positions`). In-place writes into q/k storage (rotary written into slices, Wan, CogVideoX) are
followed through `alias.Storage`.

    problem = positional_problem(site)            # None, or one line: why the tables cannot follow
    follow_tokens(gm, site, positions)            # positions: (B, N) int64 of captured site positions
"""

from __future__ import annotations

import heapq
import operator
import weakref
from dataclasses import dataclass, field

import torch
from torch import fx

from dittofx.errors import UnsupportedModelError
from dittofx.rewriter import axes as ax
from dittofx.rewriter.alias import Storage
from dittofx.rewriter.analysis import AttentionSite
from dittofx.rewriter.edit import copy_scope

aten = torch.ops.aten
Tensor = torch.Tensor

__all__ = ["follow_tokens", "kept_positions", "positional_problem", "take_positions"]

# the Linear that makes q, k or v from the tokens (a matmul counts when its right operand is a 2-D weight)
_LINEAR = {aten.linear.default, aten.addmm.default, aten.mm.default}
_VIEWS = ax.RESHAPES | {aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
                        aten.squeeze.default, aten.squeeze.dims, aten.slice.Tensor, aten.select.int,
                        aten.expand.default, aten.flatten.using_ints, aten.unflatten.int, aten.alias.default,
                        aten.view_as_complex.default, aten.view_as_real.default, aten.as_strided.default}
_MULTI = {aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
          aten.tensor_split.sections}


_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
               aten.var.dim, aten.std.correction}
# ops that read only the shape, dtype or device of their tensor input
_SHAPE_ONLY = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
               aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
               aten.rand_like.default, aten.randn_like.default}


class _Problem(Exception):
    pass


@dataclass(frozen=True)
class _Coords:
    dim: int  # the dim holding the tokens
    offset: int  # the site position of row 0 along it
    batch: int | None  # the dim holding the batch (None: broadcast over it)


@dataclass
class _Operand:
    user: fx.Node  # the node where it meets the token stream
    value: fx.Node  # the operand
    stream: fx.Node  # a token-stream input of `user`, whose token count is read at run time
    stream_coords: _Coords
    dim: int  # its token dim and batch dim once padded to `rank`
    batch: int | None
    rank: int
    offset: int


@dataclass
class _Found:
    operands: list[_Operand] = field(default_factory=list)


def _shape(node) -> tuple[int, ...]:
    return ax.shape_of(node) or ()


def _is_tensor(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and val
                                             and all(isinstance(v, torch.Tensor) for v in val))


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _is_projection(node: fx.Node) -> bool:
    if node.target in _LINEAR:
        return True
    return node.target is aten.matmul.default and len(_shape(node.args[1])) == 2 and node.args[1].op != "call_function"


def _int(value, default: int) -> int:
    if value is None:
        return default
    v = ax.int_value(value)
    if v is None:
        raise _Problem(f"a slice of the tokens has a size computed at run time ({value})")
    return v


def _aligned(d: int, rank: int, shape: tuple[int, ...], size: int) -> int | None:
    """The dim of a broadcast operand of `shape` aligned with dim d of a rank-`rank` result of `size`
    there; None where the operand broadcasts over it."""
    da = d - (rank - len(shape))
    if da < 0 or (shape[da] == 1 and size != 1):
        return None
    if shape[da] != size:
        raise _Problem(f"an operand of {shape} meets {size} tokens")
    return da


def _map_dim(node: fx.Node, a: fx.Node, index: int, d: int) -> tuple[int | None, int]:
    """Dim d of `node`'s value in input `a` (argument `index`): (its dim there or None, offset shift)."""
    t, args = node.target, node.args
    out, shape_a = _shape(node), _shape(a)
    rank = len(out)
    if t is operator.getitem:
        src = args[0]
        if src.target is aten.unbind.int:
            dim = _norm(args[0].args[1] if len(src.args) > 1 else 0, rank + 1)
            return (d if d < dim else d + 1), 0
        dim = _norm(src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0), rank)
        if dim != d:
            return d, 0
        pieces = src.meta.get("val")
        start = sum(ax.size_hint(p.shape[dim]) for p in pieces[:args[1]])
        return d, -start
    if t is aten.slice.Tensor:
        dim = _norm(args[1] if len(args) > 1 else 0, rank)
        if dim != d:
            return d, 0
        if (args[4] if len(args) > 4 else 1) != 1:
            raise _Problem(f"{node.name} takes every other token (a strided slice)")
        start = _int(args[2] if len(args) > 2 else None, 0)
        return d, -(start + shape_a[d] if start < 0 else start)
    if t in (aten.cat.default, aten.concat.default):
        dim = _norm(args[1] if len(args) > 1 else 0, rank)
        if dim != d:
            return d, 0
        before = 0
        for x in args[0]:
            if x is a:
                return d, before
            before += _shape(x)[dim]
    if t is aten.stack.default:
        dim = _norm(args[1] if len(args) > 1 else 0, rank)
        if dim == d:
            raise _Problem(f"{node.name} stacks tokens along a new axis")
        return (d if d < dim else d - 1), 0
    if t is aten.slice_scatter.default:
        dim = _norm(args[2] if len(args) > 2 else 0, rank)
        if index == 0 or dim != d:
            return _aligned(d, rank, shape_a, out[d]), 0
        if (args[5] if len(args) > 5 else 1) != 1:
            raise _Problem(f"{node.name} writes every other token (a strided slice)")
        return d, _int(args[3] if len(args) > 3 else None, 0)
    if t is aten.select.int:
        dim = _norm(args[1], rank + 1)
        return (d if d < dim else d + 1), 0
    if t is aten.transpose.int:
        d0, d1 = _norm(args[1], rank), _norm(args[2], rank)
        return (d1 if d == d0 else d0 if d == d1 else d), 0
    if t is aten.permute.default:
        return _norm(args[1][d], rank), 0
    if t is aten.unsqueeze.default:
        k = _norm(args[1], rank)
        return (d if d < k else d - 1), 0
    if t in (aten.view_as_complex.default, aten.view_as_real.default):
        return d, 0
    if t in ax.RESHAPES or t in (aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim,
                                 aten.squeeze.default, aten.squeeze.dims):
        for gi, go in ax.reshape_groups(shape_a, out):
            if d not in go:
                continue
            real_in = [i for i in gi if shape_a[i] != 1]
            real_out = [o for o in go if out[o] != 1]
            if real_out == [d] and len(real_in) == 1 and shape_a[real_in[0]] == out[d]:
                return real_in[0], 0
            raise _Problem(f"{node.name} folds the tokens into another axis ({shape_a} -> {out})")
        raise _Problem(f"{node.name} folds the tokens into another axis ({shape_a} -> {out})")
    if t is aten.repeat.default:
        if args[1][d] != 1:
            raise _Problem(f"{node.name} repeats the tokens")
        return _aligned(d, rank, shape_a, out[d]), 0
    if t in (aten.matmul.default, aten.bmm.default):
        if d < rank - 2:
            da = d - (rank - len(shape_a))
            return (None if da < 0 or da >= len(shape_a) - 2 or shape_a[da] == 1 else da), 0
        if d == rank - 2:
            return (len(shape_a) - 2 if index == 0 else None), 0
        return (len(shape_a) - 1 if index == 1 else None), 0
    if t in _REDUCTIONS and index == 0:  # a norm's statistics: over the features, not the tokens
        dims = args[1] if len(args) > 1 else None
        dims = [dims] if isinstance(dims, int) else list(dims or range(len(shape_a)))
        dims = sorted(_norm(x, len(shape_a)) for x in dims)
        keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        kept = list(range(len(shape_a))) if keep else [x for x in range(len(shape_a)) if x not in dims]
        if kept[d] in dims:
            raise _Problem(f"{node.name} reduces over the tokens")
        return kept[d], 0
    if t is aten.type_as.default and index == 1:
        return None, 0
    if t in ax.ELEMENTWISE or t in (aten.floor_divide.default, aten.pow.Scalar, aten.reciprocal.default,
                                    aten.copy_.default, aten.copy.default, aten.where.self, aten.expand.default,
                                    aten.remainder.Scalar, aten.sign.default, aten.cumsum.default):
        return _aligned(d, rank, shape_a, out[d]), 0
    if shape_a == out:
        return d, 0
    if len(shape_a) > d and out[d] > 1 and out[d] in shape_a:
        raise _Problem(f"cannot tell how {node.name} ({getattr(t, '__name__', t)}) maps the tokens")
    return None, 0


def _batch_dim(node: fx.Node, a: fx.Node, index: int, b: int | None) -> int | None:
    """The batch dim of `node` in input `a`; None where it is folded with another axis there."""
    if b is None:
        return None
    try:
        return _map_dim(node, a, index, b)[0]
    except _Problem:
        return None


def _inputs(node: fx.Node) -> list[tuple[int, fx.Node]]:
    """(argument index, tensor input) of a node; the source of a getitem of a multi-output op."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].target in _MULTI:
        return [(0, node.args[0].args[0])]
    found = []
    for i, v in enumerate(node.args):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, fx.Node) and _is_tensor(x):
                found.append((i, x))
    for v in node.kwargs.values():
        if isinstance(v, fx.Node) and _is_tensor(v):
            found.append((len(node.args), v))
    return found


def _view_chain(view: fx.Node, storage: Storage) -> list[fx.Node]:
    """view, its base, ... up to the storage's root, through views' first arguments."""
    chain, root = [view], storage.root(view)
    while chain[-1] is not root:
        nxt = chain[-1].args[0] if chain[-1].args and isinstance(chain[-1].args[0], fx.Node) else None
        if nxt is None or storage.root(nxt) is not root:
            return []
        chain.append(nxt)
    return chain


def _back_along(chain: list[fx.Node], c: _Coords) -> _Coords | None:
    for node, base in zip(chain, chain[1:]):
        d, shift = _map_dim(node, base, 0, c.dim)
        if d is None:
            return None
        c = _Coords(d, c.offset + shift, _batch_dim(node, base, 0, c.batch))
    return c


def _coords_of_view(view: fx.Node, root_coords: _Coords, storage: Storage) -> _Coords | None:
    """Coordinates of a view of a storage whose root has `root_coords` (the inverse of the walk back)."""
    chain = _view_chain(view, storage)
    if not chain:
        return None
    for d in range(len(_shape(view))):
        for b in [None, *range(len(_shape(view)))]:
            try:
                got = _back_along(chain, _Coords(d, 0, b))
            except _Problem:  # not the token dim
                continue
            if got is not None and got.dim == root_coords.dim and got.batch == root_coords.batch:
                return _Coords(d, root_coords.offset - got.offset, b)
    return None


_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graph_facts(graph: fx.Graph) -> tuple[dict[fx.Node, int], Storage]:
    """Node order and storages of a graph, kept while it has the same nodes (every site of a model asks)."""
    nodes = tuple((n, tuple(n.all_input_nodes)) for n in graph.nodes)  # what is read from where
    cached = _FACTS.get(graph)
    if cached is None or cached[0] != nodes:
        cached = (nodes, {n: i for i, n in enumerate(graph.nodes)}, Storage(graph), {})
        _FACTS[graph] = cached
    return cached[1], cached[2]


def _token_values(graph: fx.Graph, storage: Storage) -> set[fx.Node]:
    """The values computed from a projection of the tokens (a Linear), or read from a storage written in
    place from one (rotary written into slices of an `empty_like`). Ops that read only their input's
    shape (`empty_like`, `new_zeros`) do not count it."""
    cache = _FACTS[graph][3]
    if "tokens" in cache:
        return cache["tokens"]
    found, written = set(), set()
    changed = True
    while changed:
        changed = False
        for n in graph.nodes:
            if n in found or n.op != "call_function":
                continue
            if _is_projection(n) or storage.root(n) in written or (
                    n.target not in _SHAPE_ONLY and any(a in found for _, a in _inputs(n))):
                found.add(n)
                changed = True
                written |= storage.writes(n)
    cache["tokens"] = found
    return found


def _analyse(site: AttentionSite) -> _Found:
    """Walk back from q, k, v through the token stream (values computed from a projection), giving each
    value its token coordinates; every other input that carries the tokens is a position-indexed operand,
    taken where it meets the stream (how it was built does not matter: it is gathered there)."""
    sdpa = site.node
    graph = sdpa.graph
    order, storage = _graph_facts(graph)
    writers: dict[fx.Node, list[fx.Node]] = {}
    for w in storage.writers:
        if order[w] < order[sdpa]:
            for root in storage.writes(w):
                writers.setdefault(root, []).append(w)
    from_tokens = _token_values(graph, storage)

    def tokens_in(node: fx.Node) -> bool:
        return node in from_tokens

    coords: dict[fx.Node, _Coords] = {}
    heap: list[tuple[int, int]] = []
    by_order = {i: n for n, i in order.items()}
    found = _Found()
    prefix = site.seq_axis.prefix

    def give(node: fx.Node, c: _Coords, why: fx.Node) -> None:
        old = coords.get(node)
        if old is not None:
            if old != c:
                raise _Problem(f"{node.name} is read at two token offsets ({old.offset} via its first reader, "
                               f"{c.offset} via {why.name})")
            return
        coords[node] = c
        heapq.heappush(heap, (-order[node], order[node]))
        root = storage.root(node)
        for w in writers.get(root, []):  # values written into it in place: the writer is a reader
            if w in coords or order[w] <= order[root]:
                continue
            root_c = c if root is node else _back_along(_view_chain(node, storage), c)
            dst_c = _coords_of_view(w.args[0], root_c, storage) if root_c is not None else None
            if dst_c is None:
                raise _Problem(f"{w.name} writes into the queries/keys in place where the tokens cannot be followed")
            coords[w] = dst_c
            heapq.heappush(heap, (-order[w], order[w]))

    def operand(node: fx.Node, a: fx.Node, c: _Coords, streams: list[fx.Node]) -> None:
        cn = coords[node]
        if node.target in (aten.cat.default, aten.concat.default) and \
                _norm(node.args[1] if len(node.args) > 1 else 0, len(_shape(node))) == cn.dim:
            raise _Problem(f"{node.name} adds tokens inside the attention ({a.name})")
        if c.offset > prefix:
            raise _Problem(f"{a.name} is indexed from token {c.offset}, past the {prefix} leading tokens that never "
                           f"move: its rows would not line up once tokens merge")
        if cn.batch is None:
            raise _Problem(f"the batch is folded into another axis at {node.name}")
        stacked = node.target is aten.stack.default
        pad = 0 if stacked else len(_shape(node)) - len(_shape(a))
        if pad < 0:
            raise _Problem(f"{a.name} has more axes than the tokens it meets at {node.name}")
        batch = c.batch + pad if c.batch is not None else (None if stacked else cn.batch)
        if batch is None:
            raise _Problem(f"{a.name} meets the tokens at {node.name} without a batch axis to gather along")
        # where the token count is read at run time: a stream input, or the view an in-place write fills
        s, cs = (streams[0], coords[streams[0]]) if streams else (node.args[0], cn)
        found.operands.append(_Operand(node, a, s, cs, c.dim + pad, batch, len(_shape(a)) + pad, c.offset))

    tokens = site.tokens
    if tokens <= 1:  # one query (an attention pool's): no sequence of positions
        return found
    seeds = site.node.args[:3] if site.is_self else site.node.args[:1]  # a cross attention's k, v: other tokens
    for x in seeds:
        if isinstance(x, fx.Node) and len(_shape(x)) >= 2 and _shape(x)[-2] == tokens:
            if not tokens_in(x):
                raise _Problem(f"the attention's {x.name} does not come from the tokens through a projection")
            give(x, _Coords(len(_shape(x)) - 2, 0, 0 if len(_shape(x)) == 4 else None), sdpa)
    while heap:
        node = by_order[heapq.heappop(heap)[1]]
        c = coords[node]
        if node.op != "call_function" or _is_projection(node):
            continue
        ins = [(i, a) for i, a in _inputs(node) if not (node.target is aten.copy_.default and i == 0)]
        streams = []
        tables = []
        for index, a in ins:
            d, shift = _map_dim(node, a, index, c.dim)
            if d is None:
                continue
            b = _batch_dim(node, a, index, c.batch)
            if b is not None and _shape(a)[b] == 1 and _shape(node)[c.batch] != 1:
                b = None
            if tokens_in(a):
                give(a, _Coords(d, c.offset + shift, b), node)
                streams.append(a)
            else:
                tables.append((a, _Coords(d, c.offset + shift, b)))
        for a, ca in tables:
            operand(node, a, ca, streams)
    return found


def positional_problem(site: AttentionSite) -> str | None:
    """One line: why the position-indexed operands of the site's queries/keys/values (rotary tables,
    sin/cos, position ids from arange, ...) cannot follow re-ordered/merged tokens; None when they can
    or there are none."""
    try:
        _analyse(site)
    except _Problem as e:
        return f"the position-indexed operands of the attention cannot follow moved tokens: {e}"
    return None


def position_operands(site: AttentionSite) -> list[fx.Node]:
    """The operands `follow_tokens` would gather (for reports and tests); [] where there is a problem."""
    try:
        return [op.value for op in _analyse(site).operands]
    except _Problem:
        return []


def follow_tokens(gm: fx.GraphModule, site: AttentionSite, positions: fx.Node) -> int:
    """Make every position-indexed operand of `site` (between the q/k/v projections and the attention)
    take rows by `positions`: an int64 node (B, N), N = tokens now on the site's sequence axis,
    positions[b, i] = the index on the site's sequence axis AS CAPTURED (0 .. site.tokens-1, prefix
    tokens included) of the token whose position token i carries. Returns the number of operands
    rewritten."""
    try:
        found = _analyse(site)
    except _Problem as e:
        raise UnsupportedModelError(f"{site.module}: the position-indexed operands of the attention cannot "
                                    f"follow moved tokens: {e}") from None
    graph = gm.graph
    for op in found.operands:
        with graph.inserting_before(op.user):
            taken = graph.call_function(take_positions, (op.value, positions, op.stream, op.stream_coords.dim,
                                                         op.dim, op.batch, op.offset, op.rank))
        copy_scope(op.user, taken)
        op.user.replace_input_with(op.value, taken)
    if found.operands:
        graph.lint()
        gm.recompile()
    return len(found.operands)


def take_positions(table: Tensor, positions: Tensor, tokens: Tensor, token_dim: int, dim: int,
                   batch_dim: int, offset: int, rank: int) -> Tensor:
    """The rows of a position-indexed `table` for the tokens now in `tokens` (along `token_dim`): row
    positions[b, offset + j] - offset for token j of sample b. `table` is padded with leading size-1
    axes to `rank`; its rows lie along `dim`, its samples along `batch_dim` (size 1: shared)."""
    t = table.reshape((1,) * (rank - table.dim()) + tuple(table.shape))
    n = tokens.shape[token_dim]
    idx = positions[:, offset:offset + n] - offset
    view = [1] * rank
    view[batch_dim], view[dim] = idx.shape[0], n
    size = list(t.shape)
    size[batch_dim], size[dim] = idx.shape[0], n
    t = t.expand([idx.shape[0] if d == batch_dim else -1 for d in range(rank)])
    return t.gather(dim, idx.reshape(view).expand(size))


def kept_positions(positions: Tensor | None, keep: Tensor) -> Tensor:
    """The captured positions (B, N') the tokens carry after a pass keeps `keep` (B, N') of the tokens
    before it (in output order; a merged token is kept as its destination): `keep` itself when the tokens
    before were the captured ones (`positions` None)."""
    return keep if positions is None else positions.gather(1, keep)


def _take_axes(node: fx.Node, amap: ax.AxisMap):
    rank, dim, batch = node.args[7], node.args[4], node.args[5]
    tokens = amap.axis_of(node.args[2], node.args[3])
    out = [ax.EMPTY] * rank
    out[dim] = tokens
    out[batch] = amap.axis_of(node.args[1], 0)
    return tuple(out)


ax.register_rule(take_positions, _take_axes)
ax.register_rule(kept_positions, lambda node, amap: (amap.axis_of(node.args[1], 0), ax.EMPTY))
