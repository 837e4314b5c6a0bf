"""Sharding one token axis of a graph between the ranks of a process group (sequence parallelism).

From one node on, where the token axis first appears (`Sharder.split_at`), each rank holds only its
chunk of that axis. A forward walk then gives every value a layout: replicated (None), or a `Split`:
which axis is cut, and how that axis is made of segments (outer, n, inner), each of global size
outer * n * inner with its n factor cut between the ranks as `torch.tensor_split` cuts n. A plain
token axis is one segment (1, N, 1); a joint [text, video] axis is two ((1, 6, 1), (1, 192, 1)),
each rank holding its chunk of each; the tokens of one frame folded into the batch of a temporal
attention are (B, hw, 1) of the batch axis.

Per op, the layout follows where the op keeps the tokens apart (elementwise ops, Linears, norms over
features, views and permutes, slices and splits along segment boundaries, concatenations), and the
literal sizes of views and expands become the local ones. A replicated operand that carries the
token axis at its global size (a position embedding, a rotary table, the text half of a joint
concatenation) is cut to the same chunk. Any op the walk does not know gets its split inputs
gathered (all_gather, global order restored) and runs replicated; so does the graph's output. The
attention itself is the caller's (`attention` hook): it decides what to communicate around it.
"""

from __future__ import annotations

import math
import operator
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from dittofx.rewriter import axes as ax
from dittofx.rewriter.edit import arg, copy_scope

aten = torch.ops.aten

Segments = tuple[tuple[int, int, int], ...]  # (outer, n, inner) per segment, global sizes


def chunk(n: int, rank: int, world: int) -> int:
    """The share of rank `rank` of n positions cut as torch.tensor_split cuts them."""
    return n // world + (1 if rank < n % world else 0)


def chunk_start(n: int, rank: int, world: int) -> int:
    return sum(chunk(n, r, world) for r in range(rank))


def local_size(segments: Segments, rank: int, world: int) -> int:
    return sum(outer * chunk(n, rank, world) * inner for outer, n, inner in segments)


def global_size(segments: Segments) -> int:
    return sum(outer * n * inner for outer, n, inner in segments)


@dataclass(frozen=True)
class Split:
    dim: int
    segments: Segments

    @property
    def plain(self) -> bool:
        return all(outer == 1 and inner == 1 for outer, _, inner in self.segments)

    @property
    def size(self) -> int:
        return global_size(self.segments)

    def at(self, dim: int) -> Split:
        return Split(dim, self.segments)

    def local(self, rank: int, world: int) -> int:
        return local_size(self.segments, rank, world)


class Fallback(Exception):
    """The op cannot keep its inputs split: gather them."""


def map_split(split: Split, ins: tuple[int, ...], outs: tuple[int, ...]) -> Split | None:
    """Where a row-major reshape from `ins` to `outs` (global sizes) puts the split factor: the output
    dim holding it whole, with its outer and inner factors there; None where it is cut."""
    d = split.dim
    keep_in = [i for i, s in enumerate(ins) if s != 1]
    keep_out = [j for j, s in enumerate(outs) if s != 1]
    if [ins[i] for i in keep_in] == [outs[j] for j in keep_out] and d in keep_in:
        return split.at(keep_out[keep_in.index(d)])
    for gi, go in ax.reshape_groups(ins, outs):  # the split axis kept whole, the others regrouped
        real_in, real_out = [i for i in gi if ins[i] != 1], [j for j in go if outs[j] != 1]
        if d in gi and real_in == [d] and len(real_out) == 1 and outs[real_out[0]] == ins[d]:
            return split.at(real_out[0])
    if len(split.segments) != 1:
        return None
    _, n, inner = split.segments[0]
    inner_total = inner * math.prod(ins[d + 1:])
    suffix = 1
    for j in range(len(outs) - 1, -1, -1):
        span = suffix * outs[j]
        if inner_total % suffix == 0 and span % (inner_total * n) == 0:
            return Split(j, ((span // (inner_total * n), n, inner_total // suffix),))
        suffix = span
    return None


ELEMENTWISE = ax.ELEMENTWISE - {aten.native_layer_norm.default, aten.group_norm.default, aten.native_dropout.default,
                                aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
                                aten.layer_norm.default, aten.rms_norm.default, aten.type_as.default}
REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.var.correction}
SPLITS = {aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default}
SQUEEZES = {aten.flatten.using_ints, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
            aten.squeeze.dims}


class Sharder:
    """Walk `gm` from the split point on, giving each node a layout and editing what must change.

    local_slice(x, ctx, dim, segments, begin=False), gather(x, ctx, dim, segments): the functions the
    graph calls to cut a replicated value to this rank's chunk and to gather a split one (the
    runtime's: `dittofx.runtime.sp`); ctx: their first argument after x (which group, which counters).
    attention(sharder, sdpa_node) -> Split | None: the layout of an attention's output, after inserting
    what it needs (raise Fallback to have its inputs gathered)."""

    def __init__(self, gm: fx.GraphModule, ctx: int, rank: int, world: int,
                 attention: Callable[[Sharder, fx.Node], Split | None], local_slice: Callable, gather: Callable):
        self.gm, self.graph = gm, gm.graph
        self.ctx, self.rank, self.world = ctx, rank, world
        self.attention = attention
        self.local_slice, self.gather_fn = local_slice, gather
        self.state: dict[fx.Node, object] = {}
        self.shape: dict[fx.Node, tuple[int, ...] | None] = {n: ax.shape_of(n) for n in gm.graph.nodes}
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.sliced: dict[tuple[fx.Node, Split], fx.Node] = {}
        self.gathers: Counter[str] = Counter()  # why values were gathered (the op that needed them whole)
        self.slices: set[fx.Node] = set()  # replicated values cut to their local chunk

    # -- edits -----------------------------------------------------------------------------------

    def _insert(self, where: Callable, like: fx.Node, fn, args: tuple, shape) -> fx.Node:
        with where:
            node = self.graph.call_function(fn, args)
        copy_scope(like, node)
        self.shape[node] = shape
        return node

    def split_at(self, node: fx.Node, split: Split) -> fx.Node:
        """Cut `node`'s value to this rank's chunk; its readers read the chunk."""
        cut = self._insert(self.graph.inserting_after(node), node, self.local_slice,
                           (node, self.ctx, split.dim, split.segments, True), self.shape[node])
        node.replace_all_uses_with(cut, delete_user_cb=lambda u: u is not cut)
        self.state[cut] = split
        return cut

    def gather(self, node: fx.Node, why: str = "") -> fx.Node:
        """`node`'s whole value (global order), once per node."""
        if node not in self.gathered:
            split = self.state[node]
            self.gathered[node] = self._insert(self.graph.inserting_after(node), node, self.gather_fn,
                                               (node, self.ctx, split.dim, split.segments), self.shape[node])
            self.gathers[why or "?"] += 1
        return self.gathered[node]

    def local(self, node: fx.Node, split: Split, before: fx.Node) -> fx.Node:
        """This rank's chunk of replicated `node`, laid out as `split`."""
        key = (node, split)
        if key not in self.sliced:
            self.sliced[key] = self._insert(self.graph.inserting_before(before), before, self.local_slice,
                                            (node, self.ctx, split.dim, split.segments), self.shape[node])
            self.slices.add(node)
        return self.sliced[key]

    def call_before(self, before: fx.Node, fn, args: tuple, shape=None) -> fx.Node:
        return self._insert(self.graph.inserting_before(before), before, fn, args, shape)

    def call_after(self, after: fx.Node, fn, args: tuple, shape=None) -> fx.Node:
        return self._insert(self.graph.inserting_after(after), after, fn, args, shape)

    def fallback(self, node: fx.Node, why: str) -> None:
        for a in node.all_input_nodes:
            if isinstance(self.state.get(a), Split):
                node.replace_input_with(a, self.gather(a, why))
        self.state[node] = None

    # -- the walk --------------------------------------------------------------------------------

    def split_of(self, node) -> Split | None:
        s = self.state.get(node) if isinstance(node, fx.Node) else None
        return s if isinstance(s, Split) else None

    def split_in(self, node: fx.Node) -> Split:
        """The split of `node`'s first argument; Fallback where it is not split."""
        s = self.split_of(node.args[0])
        if s is None:
            raise Fallback
        return s

    def run(self, start: fx.Node) -> None:
        nodes = list(self.graph.nodes)
        for node in nodes[nodes.index(start) + 1:]:
            if node.op == "output":
                for a in node.all_input_nodes:
                    if self.split_of(a) is not None:
                        node.replace_input_with(a, self.gather(a, "the output"))
                continue
            if not any(self.state.get(a) is not None for a in node.all_input_nodes):
                continue
            if node.op != "call_function":
                self.fallback(node, str(node.target))
                continue
            rule = RULES.get(node.target)
            if node.target is aten.scaled_dot_product_attention.default:
                rule = self.attention
            if rule is None and node.target in ELEMENTWISE:
                rule = _elementwise
            name = getattr(node.target, "__name__", str(node.target))
            schema = getattr(node.target, "_schema", None)
            if rule is None and schema is not None and schema.is_mutable:
                raise Unsplittable(f"{node.name} ({name}) writes in place into a tensor of split tokens")
            if rule is None:
                self.fallback(node, name)
                continue
            try:
                self.state[node] = rule(self, node)
            except Fallback:
                self.fallback(node, name)

    # -- helpers for rules -----------------------------------------------------------------------

    def rank_of(self, node) -> int:
        return len(self.shape.get(node) or ())

    def static(self, node: fx.Node) -> list[int | None]:
        """The sizes of `node`'s value that are the same for every input (None: symbolic, the batch)."""
        val = node.meta.get("val")
        return [s if isinstance(s, int) else None for s in val.shape]

    def align(self, node: fx.Node, operands: list, out_rank: int, same_rank: bool = False) -> Split | None:
        """The one layout of the split operands (aligned from the right, as broadcasting does), after
        cutting replicated operands that carry the token axis at its global size; Fallback if they
        disagree."""
        out_shape = self.shape[node]
        target = None
        for a in operands:
            s = self.split_of(a)
            if s is None:
                if isinstance(a, fx.Node) and isinstance(self.state.get(a), list):
                    raise Fallback
                continue
            d = s.dim + out_rank - self.rank_of(a)
            if out_shape is not None and self.shape[a][s.dim] != out_shape[d]:
                raise Fallback
            if target is None:
                target = s.at(d)
            elif target != s.at(d):
                raise Fallback
        if target is None:
            return None
        cuts = []
        for a in operands:
            if not isinstance(a, fx.Node) or self.split_of(a) is not None or self.shape.get(a) is None:
                continue
            d = target.dim - (out_rank - self.rank_of(a))
            if d < 0 or self.shape[a][d] == 1:
                continue
            if self.shape[a][d] != target.size:
                raise Fallback
            cuts.append((a, target.at(d)))
        for a, s in cuts:
            node.replace_input_with(a, self.local(a, s, node))
        return target


def fix_sizes(sizes: list, j: int, static: list[int | None], local: int) -> list | None:
    """Sizes of a view / reshape / expand with entry j made local: -1 there where no other entry is
    -1, else that -1 becomes its (static) size; None where neither works."""
    sizes = list(sizes)
    minus = [i for i, s in enumerate(sizes) if isinstance(s, int) and s == -1]
    if minus == [j]:
        return sizes
    if not minus:
        sizes[j] = -1
        return sizes
    i = minus[0]
    if static[i] is not None:
        sizes[i], sizes[j] = static[i], -1
        return sizes
    if isinstance(sizes[j], int):
        sizes[j] = local
        return sizes
    return None


# -- rules: (sharder, node) -> layout of the node's value --------------------------------------------


def _elementwise(sh: Sharder, node: fx.Node):
    if not isinstance(node.meta.get("val"), torch.Tensor):
        raise Fallback
    return sh.align(node, node.all_input_nodes, sh.rank_of(node))


def _norm(sh: Sharder, node: fx.Node):
    normalized = arg(node, "normalized_shape")
    s = _elementwise(sh, node)
    if s is not None and s.dim >= sh.rank_of(node) - len(normalized):
        raise Fallback
    return s


def _softmax(sh: Sharder, node: fx.Node):
    s = sh.split_of(node.args[0])
    if s is None or node.args[1] % sh.rank_of(node) == s.dim:
        raise Fallback
    return s


def _first(sh: Sharder, node: fx.Node):  # type_as: the layout of the first argument
    return sh.split_of(node.args[0])


def _linear(sh: Sharder, node: fx.Node):
    x = node.args[0]
    s = sh.split_of(x)
    if s is None or any(sh.split_of(a) for a in node.args[1:]) or s.dim == sh.rank_of(x) - 1:
        raise Fallback
    return s


def _reshape(sh: Sharder, node: fx.Node):
    x, s = node.args[0], sh.split_in(node)
    out = map_split(s, sh.shape[x], sh.shape[node])
    if out is None:
        raise Fallback
    local = out.local(sh.rank, sh.world)
    if node.target in ax.RESHAPES:
        sizes = fix_sizes(node.args[1], out.dim, sh.static(node), local)
        if sizes is None:
            raise Fallback
        node.args = (x, sizes) + tuple(node.args[2:])
    elif node.target is aten.unflatten.int:
        d = node.args[1] % sh.rank_of(x)
        sizes = list(node.args[2])
        if d <= out.dim < d + len(sizes):
            fixed = fix_sizes(sizes, out.dim - d, sh.static(node)[d:d + len(sizes)], local)
            if fixed is None:
                raise Fallback
            node.args = (x, d, fixed)
    return out


def _expand(sh: Sharder, node: fx.Node):
    x, s = node.args[0], sh.split_in(node)
    sizes = list(node.args[1])
    d = s.dim + len(sizes) - sh.rank_of(x)
    sizes[d] = -1
    node.args = (x, sizes) + tuple(node.args[2:])
    return s.at(d)


def _permute(sh: Sharder, node: fx.Node):
    s = sh.split_of(node.args[0])
    rank = sh.rank_of(node)
    return s.at([d % rank for d in node.args[1]].index(s.dim))


def _transpose(sh: Sharder, node: fx.Node):
    s = sh.split_of(node.args[0])
    rank = sh.rank_of(node)
    a, b = node.args[1] % rank, node.args[2] % rank
    return s.at(b if s.dim == a else a if s.dim == b else s.dim)


def _t(sh: Sharder, node: fx.Node):
    s = sh.split_of(node.args[0])
    return s.at(sh.rank_of(node) - 1 - s.dim)


def _select(sh: Sharder, node: fx.Node):
    s = sh.split_of(node.args[0])
    d = node.args[1] % sh.rank_of(node.args[0])
    if s is None or d == s.dim:
        raise Fallback
    return s.at(s.dim - (d < s.dim))


def _bounds(split: Split) -> list[int]:
    out = [0]
    for outer, n, inner in split.segments:
        out.append(out[-1] + outer * n * inner)
    return out


def _local_bounds(split: Split, rank: int, world: int) -> list[int]:
    out = [0]
    for seg in split.segments:
        out.append(out[-1] + local_size((seg,), rank, world))
    return out


def _slice(sh: Sharder, node: fx.Node):
    x, s = node.args[0], sh.split_in(node)
    rank = sh.rank_of(x)
    d = (node.args[1] if len(node.args) > 1 else 0) % rank
    if d != s.dim:
        return s
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else sys.maxsize
    step = node.args[4] if len(node.args) > 4 else 1
    if not all(isinstance(v, int) for v in (start, end, step)) or step != 1:
        raise Fallback
    size = s.size
    start = max(0, start + size if start < 0 else start)
    end = min(size, end + size if end < 0 else end)
    if start == 0 and end == size:
        node.args = (x, d, 0, sys.maxsize)
        return s
    bounds = _bounds(s)
    if not s.plain or start not in bounds or end not in bounds or end <= start:
        raise Fallback
    i, j = bounds.index(start), bounds.index(end)
    local = _local_bounds(s, sh.rank, sh.world)
    node.args = (x, d, local[i], local[j])
    return Split(d, s.segments[i:j])


def _split(sh: Sharder, node: fx.Node):
    x, s = node.args[0], sh.split_in(node)
    rank = sh.rank_of(x)
    d = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % rank
    pieces = node.meta.get("val")
    if d != s.dim:
        return [s] * len(pieces)
    sizes = [ax.size_hint(p.shape[d]) for p in pieces]
    bounds = _bounds(s)
    cuts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    if not s.plain or any(c not in bounds for c in cuts):
        raise Fallback
    local = _local_bounds(s, sh.rank, sh.world)
    out, local_sizes = [], []
    for a, b in zip(cuts, cuts[1:]):
        i, j = bounds.index(a), bounds.index(b)
        out.append(Split(d, s.segments[i:j]))
        local_sizes.append(local[j] - local[i])
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (x, local_sizes, d), {}
    return out


def _getitem(sh: Sharder, node: fx.Node):
    pieces = sh.state.get(node.args[0])
    if not isinstance(pieces, list):
        raise Fallback
    return pieces[node.args[1]]


def _unbind(sh: Sharder, node: fx.Node):
    s = sh.split_of(node.args[0])
    d = (node.args[1] if len(node.args) > 1 else 0) % sh.rank_of(node.args[0])
    if s is None or d == s.dim:
        raise Fallback
    return [s.at(s.dim - (d < s.dim))] * len(node.meta["val"])


def _cat(sh: Sharder, node: fx.Node):
    tensors = list(node.args[0])
    rank = sh.rank_of(node)
    d = (node.args[1] if len(node.args) > 1 else 0) % rank
    if d != next(sh.split_of(t) for t in tensors if sh.split_of(t) is not None).dim:
        return sh.align(node, tensors, rank)
    segments, cuts = [], []
    for t in tensors:
        s = sh.split_of(t)
        if s is None:
            if isinstance(sh.state.get(t), list) or sh.rank_of(t) != rank:
                raise Fallback
            s = Split(d, ((1, sh.shape[t][d], 1),))
            cuts.append((t, s))
        elif s.dim != d or not s.plain:
            raise Fallback
        segments.extend(s.segments)
    for t, s in cuts:
        node.replace_input_with(t, sh.local(t, s, node))
    return Split(d, tuple(segments))


def _stack(sh: Sharder, node: fx.Node):
    """stack(tensors, dim): operands of one shape, all split alike (replicated ones cut to the chunk)."""
    tensors = list(node.args[0])
    d = (node.args[1] if len(node.args) > 1 else 0) % sh.rank_of(node)
    splits = {sh.split_of(t) for t in tensors} - {None}
    if len(splits) != 1 or any(isinstance(sh.state.get(t), list) for t in tensors):
        raise Fallback
    s = splits.pop()
    for t in tensors:
        if sh.split_of(t) is None:
            node.replace_input_with(t, sh.local(t, s, node))
    return s.at(s.dim + (d <= s.dim))


def _reduce(sh: Sharder, node: fx.Node):
    x = node.args[0]
    s = sh.split_of(x)
    rank = sh.rank_of(x)
    dims = node.args[1] if len(node.args) > 1 else None
    if s is None or dims is None:
        raise Fallback
    dims = {d % rank for d in ([dims] if isinstance(dims, int) else dims)}
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if s.dim in dims:
        raise Fallback
    return s if keepdim else s.at(s.dim - sum(d < s.dim for d in dims))


def _copy(sh: Sharder, node: fx.Node):
    """copy_(dst, src) writes into dst: both local alike, or the pass cannot go on (a gathered dst
    would take the write in place of the real one)."""
    try:
        out = sh.align(node, node.all_input_nodes, sh.rank_of(node))
    except Fallback:
        out = None
    if out is None or sh.split_of(node.args[0]) is None:
        raise Unsplittable(f"{node.name} writes in place into a tensor that the token split cannot follow")
    return out


class Unsplittable(Exception):
    """An op on split tokens that neither keeps the split nor can be given gathered inputs."""


def _size(sh: Sharder, node: fx.Node):
    """sym_size(x, d): an int, read from the local value (the local count along the split axis: what the
    views of the same value, made local, take)."""
    return None


def _drop_check(sh: Sharder, node: fx.Node):
    """A shape / dtype assertion on a value now local: its sizes are the global ones, so it goes."""
    sh.graph.erase_node(node)
    return None


RULES: dict = {
    aten.linear.default: _linear,
    aten.layer_norm.default: _norm,
    aten.rms_norm.default: _norm,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.log_softmax.int: _softmax,
    aten.type_as.default: _first,
    aten.empty_like.default: _first,
    aten.zeros_like.default: _first,
    aten.ones_like.default: _first,
    aten.copy_.default: _copy,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.t.default: _t,
    aten.select.int: _select,
    aten.slice.Tensor: _slice,
    aten.unbind.int: _unbind,
    aten.expand.default: _expand,
    aten.unflatten.int: _reshape,
    operator.getitem: _getitem,
    aten.cat.default: _cat,
    aten.stack.default: _stack,
    aten.concat.default: _cat,
    aten._assert_tensor_metadata.default: _drop_check,
    aten.sym_size.int: _size,
    **{t: _reshape for t in ax.RESHAPES | SQUEEZES},
    **{t: _split for t in SPLITS},
    **{t: _reduce for t in REDUCTIONS},
}
