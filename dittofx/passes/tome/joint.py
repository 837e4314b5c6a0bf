"""ToMe's diffusion mode on joint attention: merge the image part of the sequence, text untouched.

Since 2024 diffusion transformers attend over text and image (or video) tokens together: SD3's and
Flux's double-stream blocks project each stream on its own and concatenate after the projections;
CogVideoX and HunyuanVideo's single-stream blocks concatenate before one shared projection; Wan's
self-attention is over video tokens (frames x rows x columns) alone. In every case the q/k/v
projections read one tensor holding the image tokens (alone, or as a segment of the joint sequence),
and the attention's sequence holds them as one segment. Both are found from the graph: the
projections feeding q, k and v, and the concatenation on the token axis that places the image
segment between the text tokens.

The rewrite is tomesd's: before the projections, the image segment is merged (destinations one per
sy x sx cell of each frame, matched on the image tokens entering the block, size-weighted averages);
right after the attention each image token takes its destination's value again. Unmerging there
rather than after the output projection gives the same values (a gather of rows commutes with the
token-wise projection) and leaves the split back into streams untouched. Operands indexed by token
position between the merge and the attention (rotary tables, masks) follow the merged tokens through
`rewriter/positions.py` where that module can; otherwise the site is refused.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from dittofx.passes.tome.attention import attention_problem
from dittofx.passes.tome.ops import (
    destination_draws,
    grid_destinations,
    grid_matching,
    merge_sizes,
    merge_wavg,
    unmerge_index,
)
from dittofx.rewriter import axes as ax
from dittofx.rewriter.alias import Storage
from dittofx.rewriter.analysis import PROJECTIONS, AttentionSite, linear_input, stream_in
from dittofx.rewriter.edit import Inserter, arg, copy_scope, descendants, reroute, set_arg
from dittofx.rewriter.positions import follow_tokens, position_operands, positional_problem
from dittofx.rewriter.tokens import make_token_sizes_dynamic, token_labels

aten = torch.ops.aten
Tensor = torch.Tensor


@dataclass
class JointPlan:
    """Where the image tokens of a joint self-attention are."""

    x: fx.Node  # what the q/k/v projections read: the image stream (B, N_img, C) or the joint one
    start: int  # the image segment's first token in `x`
    seq_start: int  # ... and on the attention's sequence
    count: int  # image tokens
    grid: tuple[int, int, int]  # (frames, rows, columns) of the image tokens, row-major
    grid_note: str | None  # how the grid was read where the graph cannot tell (packed latent tokens)
    metric: fx.Node  # the tokens the matching compares (the block's input), image segment at `metric_start`
    metric_start: int
    positional: bool  # operands indexed by token position lie between the merge and the attention


def _token_dim(node: fx.Node, amap: ax.AxisMap, labels: frozenset) -> int | None:
    axes = amap[node]
    dims = [d for d, a in enumerate(axes)
            if labels & set(a.labels) and not any(lab.kind == "batch" for lab in a.labels)]
    return dims[0] if len(dims) == 1 else None


def _carries(node: fx.Node, amap: ax.AxisMap, labels: frozenset) -> bool:
    return any(labels & set(a.labels) for a in amap[node])


def _projections(node: fx.Node, amap: ax.AxisMap, labels: frozenset) -> set[fx.Node] | None:
    """The projections whose outputs reach `node` through token-carrying values (head splits, norms,
    rotary embeddings, concatenations); None when the walk does not end at projections."""
    found, todo, seen = set(), [node], {node}
    while todo:
        n = todo.pop()
        if n.target in PROJECTIONS:
            found.add(n)
            continue
        if len(seen) > 400:
            return None
        if n.op != "call_function":  # a model input or constant: a position table, not the tokens
            continue
        for a in n.all_input_nodes:  # through tuple outputs (chunk, unbind), which carry no axes themselves
            if a not in seen and (_carries(a, amap, labels) or n.target is operator.getitem):
                seen.add(a)
                todo.append(a)
    return found


def _image_only(node: fx.Node, dim: int, amap: ax.AxisMap) -> bool:
    """Are `node`'s tokens along `dim` image tokens only: whole frames of the patch grid (the grid's
    labels, times one other label of the axis for the frames of a video input)? Text tokens that
    attended to image tokens carry the grid's labels too, but not as their extent."""
    axis = amap.axis_of(node, dim)
    grid = math.prod(lab.size for lab in axis.labels if lab.is_grid)
    size = ax.shape_of(node)[dim]
    if not axis.grid or axis.prefix or size % grid:
        return False
    return size == grid or size // grid in {lab.size for lab in axis.labels if lab.kind == "input"}


def _attentions_reached(node: fx.Node, after: set[fx.Node]) -> set[fx.Node]:
    """The attentions `node` flows into before any other attention, not counting what reads the
    attention's result (`after`: a `type_as` of it and q reaches the next blocks)."""
    found, todo, seen = set(), [node], {node}
    while todo:
        for user in todo.pop().users:
            if user in seen or user in after:
                continue
            seen.add(user)
            if user.target is aten.scaled_dot_product_attention.default:
                found.add(user)
            else:
                todo.append(user)
    return found


def _segment(node: fx.Node, amap: ax.AxisMap, labels: frozenset):
    """(offset, count, labels) of the image segment on `node`'s token axis: the whole axis where it is
    image tokens only, else the concatenation on that axis nearest upstream (not across projections)
    with one operand of image tokens only. None where neither holds."""
    dim = _token_dim(node, amap, labels)
    if dim is None:
        return None
    if _image_only(node, dim, amap):
        return 0, ax.shape_of(node)[dim], amap.axis_of(node, dim).labels
    todo, seen = [node], {node}
    while todo:
        n = todo.pop(0)
        if n.target is aten.cat.default:
            d = _token_dim(n, amap, labels)
            parts = [t for t in n.args[0] if isinstance(t, fx.Node)]
            if d is not None and d == ax._norm_dim(n.args[1] if len(n.args) > 1 else 0, len(ax.shape_of(n))):
                image = [t for t in parts if _image_only(t, d, amap)]
                if len(image) == 1:
                    offset = sum(ax.shape_of(t)[d] for t in parts[:parts.index(image[0])])
                    return offset, ax.shape_of(image[0])[d], amap.axis_of(image[0], d).labels
            return None
        if n.target in PROJECTIONS or n.op != "call_function" or len(seen) > 200:
            continue
        for a in n.all_input_nodes:
            if a not in seen and _carries(a, amap, labels):
                seen.add(a)
                todo.append(a)
    return None


def _grid(labels, count: int, given: tuple | None) -> tuple[tuple[int, int, int], str | None] | str:
    """(frames, rows, columns) of the image tokens, and a note where they were not read off the graph."""
    grid = [lab for lab in labels if lab.is_grid]
    if any(lab.kind == "grid_packed" for lab in grid):  # the latent was packed before the model (Flux)
        if given is not None:
            shape = (1, *given) if len(given) == 2 else tuple(given)
            if math.prod(shape) != count:
                return f"grid={given} holds {math.prod(shape)} tokens, the packed latent {count}"
            return shape, None
        side = math.isqrt(count)
        if side * side != count:
            return (f"packed latent tokens ({count}, not a square): the graph cannot tell rows from columns; give "
                    f"tome:grid=(rows,columns)")
        return (1, side, side), f"packed latent tokens read as a {side}x{side} grid (tome:grid=(rows,columns) sets it)"
    if [lab.kind for lab in grid[-2:]] != ["grid_h", "grid_w"]:
        return "the image tokens are not row-major rows x columns of the patch grid"
    rows, cols = grid[-2].size, grid[-1].size
    if count % (rows * cols):
        return "the image tokens are not whole frames of the patch grid"
    return (count // (rows * cols), rows, cols), None


def _feeding(node: fx.Node, stop: fx.Node) -> set[fx.Node]:
    """The nodes `node` reads, back to `stop`, counting in-place writes into what it reads (rotary
    embeddings written into slices of an `empty_like`: Wan, CogVideoX 5B)."""
    storage = Storage(node.graph)
    writers: dict[fx.Node, list[fx.Node]] = {}
    for w in storage.writers:
        for root in storage.writes(w):
            writers.setdefault(root, []).append(w)
    found, todo = {node}, [node]
    while todo:
        n = todo.pop()
        if n is stop:
            continue
        for a in (*n.all_input_nodes, *writers.get(storage.root(n), ())):
            if a not in found:
                found.add(a)
                todo.append(a)
    return found


_CASTS = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default}


def _before(metric: fx.Node, x: fx.Node) -> fx.Node:
    """The metric as a value computed before `x` (where the merge goes): a cast of the stream made later
    (Wan: `hidden_states.float()` written again in the residual add) is read at its source; `x` itself
    where that fails."""
    if metric is x:
        return x
    while metric > x and metric.target in _CASTS and isinstance(metric.args[0], fx.Node):  # graph order
        metric = metric.args[0]
    return metric if metric < x else x


def _mask_follows(site: AttentionSite) -> bool:
    """Is the attention's mask one `follow_mask` gathers: (B or 1, H or 1, 1 or N, N) over the sequence?"""
    mask = arg(site.node, "attn_mask")
    shape = ax.shape_of(mask) if isinstance(mask, fx.Node) else None
    return shape is not None and len(shape) == 4 and shape[-1] == site.tokens and shape[-2] in (1, site.tokens)


def _positional(x: fx.Node, site: AttentionSite, amap: ax.AxisMap, labels: frozenset) -> bool:
    """Does anything between `x` and the attention combine the tokens with an operand that has the
    token axis but does not come from them (a rotary table, a position embedding, a mask)?"""
    path = (descendants(x) & _feeding(site.node, x)) - {site.node}
    for n in path:
        dim = _token_dim(n, amap, labels)
        shape = ax.shape_of(n)
        if dim is None or shape is None or n.target not in ax.ELEMENTWISE:
            continue
        for a in n.all_input_nodes:
            other = ax.shape_of(a)
            if a in path or a is x or other is None:
                continue
            d = dim - (len(shape) - len(other))
            if 0 <= d < len(other) and other[d] > 1:
                return True
    return False


def plan(site: AttentionSite, amap: ax.AxisMap, grid: tuple | None = None) -> JointPlan | str:
    """Where to merge a joint self-attention site, or why not (one line). `grid`: ToMe's, for packed tokens."""
    if site.kind != "joint":
        return f"{site.kind} attention (not joint)"
    if site.tokens != site.kv_tokens:
        return "the keys are not the queries' tokens"
    problem = attention_problem(site)
    if problem and _mask_follows(site) and not (site.windowed or site.position_bias or arg(site.node, "is_causal")):
        problem = None  # a padding mask over the sequence: gathered like the tokens (`follow_mask`)
    if problem:
        return problem
    out = ax.shape_of(site.node)
    if out is None or len(out) != 4 or not any(lab.kind == "batch" for lab in amap.axis_of(site.node, 0).labels):
        return "the attention is not over (batch, heads, tokens, channels)"
    labels = frozenset(lab for lab in site.seq_axis.labels if lab.kind != "batch")
    inputs, after = set(), descendants(site.node)
    for node in (site.query, site.key, site.value):
        projections = _projections(node, amap, labels)
        if not projections:
            return "queries, keys and values do not come from projections of the tokens"
        if any(_attentions_reached(p, after) != {site.node} for p in projections):
            return "the q/k/v projections feed several attentions (one per sample or per chunk): not merged"
        inputs |= {linear_input(p) for p in projections}
    if len(inputs) > 1:  # a projection per stream: the image stream's
        inputs = {x for x in inputs if _token_dim(x, amap, labels) is not None
                  and _image_only(x, _token_dim(x, amap, labels), amap)}
    if len(inputs) != 1:
        return "queries, keys and values do not come from one tensor of image tokens"
    x = inputs.pop()
    shape = ax.shape_of(x)
    if shape is None or len(shape) != 3 or _token_dim(x, amap, labels) != 1:
        return "the projections' input is not (batch, tokens, channels)"
    if shape[0] != out[0]:
        return "the attention runs over a part of the batch"
    if shape[1] == site.tokens:  # one shared projection: the image segment of the joint input
        found = _segment(x, amap, labels)
        if found is None:
            return "the image tokens are not one segment of the projections' input"
        start, count, image_labels = found
        seq_start = start
    else:  # projections per stream: the image stream whole; its segment on the attention's sequence
        found = _segment(site.query, amap, labels)
        if found is None or found[1] != shape[1]:
            return "the image tokens are not one segment of the attention's sequence"
        seq_start, count, image_labels = found
        start = 0
    where = _grid(image_labels, count, grid)
    if isinstance(where, str):
        return where
    metric, metric_start = stream_in(site), start  # the tokens entering the block, else the normed ones
    m_dim = _token_dim(metric, amap, labels) if metric is not None else None
    m_seg = _segment(metric, amap, labels) if m_dim == 1 and len(ax.shape_of(metric)) == 3 else None
    if m_seg is not None and m_seg[:2] == (0, ax.shape_of(metric)[1]) and m_seg[1] == count:
        metric_start = 0
    elif m_seg is None or m_seg[:2] != (start, count) or ax.shape_of(metric)[1] != shape[1]:
        metric = x
    metric = _before(metric, x)
    if metric is x:
        metric_start = start
    if problem := positional_problem(site):
        return problem
    positional = bool(position_operands(site))
    if _positional(x, site, amap, labels) and not positional:  # a second look, by another route
        return ("an operand indexed by token position lies between the merge and the attention, and "
                "rewriter/positions.py finds none to follow")
    return JointPlan(x, start, seq_start, count, *where, metric, metric_start, positional)


# ---------------------------------------------------------------------------------------------
# the tensor functions, one graph node each


def video_destinations(frames: int, rows: int, cols: int, generator: torch.Generator | None = None,
                       sy: int = 2, sx: int = 2) -> tuple[Tensor, Tensor]:
    """(A, B) positions over `frames` row-major grids in sequence: each frame's own sy x sx cells."""
    a_parts, b_parts = [], []
    for f in range(frames):
        a_pos, b_pos = grid_destinations(rows, cols, generator, sy=sy, sx=sx)
        a_parts.append(a_pos + f * rows * cols)
        b_parts.append(b_pos + f * rows * cols)
    return torch.cat(a_parts), torch.cat(b_parts)


def segment(x: Tensor, start: int, count: int) -> Tensor:
    """The image tokens of a (B, N, C) sequence."""
    return x if start == 0 and count == x.shape[1] else x[:, start:start + count]


def merge_segment(x: Tensor, merged: Tensor, start: int, count: int) -> Tensor:
    """The sequence with its image segment replaced by the merged tokens."""
    if start == 0 and count == x.shape[1]:
        return merged
    return torch.cat([x[:, :start], merged, x[:, start + count:]], dim=1)


def unmerge_sequence(out: Tensor, where: Tensor, start: int, merged: int) -> Tensor:
    """Attention output (B, H, N', d) back to every token: each image token takes its destination's
    value (`where`: its position among the merged image tokens), the text tokens stay."""
    batch, n_out = out.shape[0], out.shape[-2]
    ar = torch.arange(n_out, device=out.device, dtype=where.dtype).expand(batch, n_out)
    index = torch.cat([ar[:, :start], start + where, ar[:, start + merged:]], dim=1)
    index = index[:, None, :, None].expand(batch, out.shape[1], index.shape[1], out.shape[-1])
    return out.gather(2, index)


def sequence_positions(keep: Tensor, start: int, total: int, count: int) -> Tensor:
    """For each token on the merged sequence, the token (on the original sequence) whose position it
    carries: a merged token its destination's."""
    batch = keep.shape[0]
    ar = torch.arange(total, device=keep.device, dtype=keep.dtype).expand(batch, total)
    return torch.cat([ar[:, :start], start + keep, ar[:, start + count:]], dim=1)


def follow_mask(mask: Tensor, positions: Tensor) -> Tensor:
    """An attention mask (B or 1, H or 1, 1 or N, N) for the merged sequence: each token's column (and
    row) is that of the token whose position it carries."""
    batch, n = positions.shape
    mask = mask.expand(batch, *mask.shape[1:])
    cols = positions[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], n)
    mask = mask.gather(3, cols)
    if mask.shape[2] == 1:
        return mask
    rows = positions[:, None, :, None].expand(batch, mask.shape[1], n, n)
    return mask.gather(2, rows)


def _first_axes(node: fx.Node, amap: ax.AxisMap):
    return amap.tensors.get(node.args[0], ())


def _batch_and_tokens(node: fx.Node, amap: ax.AxisMap):
    first = amap[node.args[0]]
    return (first[0] if first else ax.EMPTY, ax.EMPTY)


for _fn in (segment, merge_segment, unmerge_sequence):
    ax.register_rule(_fn, _first_axes)
ax.register_rule(sequence_positions, _batch_and_tokens)
ax.register_rule(follow_mask, _first_axes)


# ---------------------------------------------------------------------------------------------
# the rewrite


def joint_check(site: AttentionSite, amap: ax.AxisMap, grid: tuple | None = None) -> str | None:
    found = plan(site, amap, grid)
    return found if isinstance(found, str) else None


def run_joint(tome, ctx, result) -> None:
    """Merge the image segment of every joint self-attention the plan finds, unmerge after it."""
    gm, analysis = ctx.gm, ctx.analysis
    amap = analysis.axes
    places = [(b, s, p) for b in analysis.blocks for s in b.sites if s.kind == "joint"
              and isinstance(p := plan(s, amap, tome.grid), JointPlan)]
    generator = torch.Generator().manual_seed(tome.seed) if tome.seed is not None else None
    sy, sx = tome.sy, tome.sx
    if not tome.merge_attn:
        return
    use_rand = tome.use_rand is True
    labels = frozenset().union(*(token_labels(s.seq_axis) for _, s, _ in places))
    dynamic = False
    for i, (block, site, p) in enumerate(places):
        frames, rows, cols = p.grid
        a_pos, b_pos = video_destinations(frames, rows, cols, generator, sy=sy, sx=sx)
        r = int(p.count * tome.ratio)
        if r > len(a_pos):
            result.note(block.name, f"ratio {tome.ratio} clamped to {len(a_pos)} of {p.count} image tokens "
                                    f"(one destination per {sy}x{sx} cell)")
            r = len(a_pos)
        if r <= 0 or not len(b_pos):
            continue
        if not dynamic:
            make_token_sizes_dynamic(gm, amap, labels)
            dynamic = True
        add = Inserter(max(p.x, p.metric), like=p.x)  # the later of the two in the graph
        metric = add(segment, p.metric, p.metric_start, p.count)
        if use_rand and (frames == 1 or rows % sy == 0):  # frames stacked: the same sy x sx cells
            consts = destination_draws(gm, tome.seed).draw(add, metric, frames * rows, cols, sy, sx)
        else:
            if use_rand:
                result.note(block.name, f"tome: use_rand: frames of {rows} rows are not whole {sy}-row cells: "
                                        f"destinations drawn once")
            consts = [add.constant(gm, f"tome_joint_{ab}_pos_{i}", pos) for ab, pos in zip("ab", (a_pos, b_pos))]
        keep, src, dst = add.getitems(add(grid_matching, metric, consts[0], consts[1], r), 3)
        image = add(segment, p.x, p.start, p.count)
        size = add(merge_sizes, image, None, keep, src, dst)
        where = add(unmerge_index, keep, src, dst)
        merged = add(merge_wavg, image, None, size, keep, src, dst, len(b_pos))
        joined = add(merge_segment, p.x, merged, p.start, p.count)
        reroute(p.x, joined, skip=add.nodes, only={u for u in p.x.users if site.node in descendants(u)})
        mask = arg(site.node, "attn_mask")
        mask = mask if isinstance(mask, fx.Node) and _mask_follows(site) else None
        if p.positional or mask is not None:
            positions = add(sequence_positions, keep, p.seq_start, site.tokens, p.count)
        if p.positional:
            follow_tokens(gm, site, positions)
        if mask is not None:
            with gm.graph.inserting_before(site.node):
                followed = gm.graph.call_function(follow_mask, (mask, positions))
            copy_scope(site.node, followed)
            set_arg(site.node, "attn_mask", followed)
        out = Inserter(site.node)
        reroute(site.node, out(unmerge_sequence, site.node, where, p.seq_start, p.count - r), skip=out.nodes)
        text = f", {site.tokens - p.count} other tokens untouched" if site.tokens > p.count else ""
        result.note(block.name, f"tome: {site.module}: merged {r} of {p.count} image tokens "
                                f"({p.grid[0]}x{p.grid[1]}x{p.grid[2]}) around the joint attention{text}")
        if p.grid_note:
            result.note(block.name, f"tome: {p.grid_note}")
        if tome.merge_mlp:
            result.note(block.name, "tome: merge_mlp: the MLPs of joint blocks are left whole")
        result.changed = True
