"""Token Merging (ToMe, Bolya et al., ICLR 2023) as a graph rewrite.

ViT mode, `ToMe(r=16)`. In every block, between attention and MLP, merge the r most similar tokens:

  1. metric: the block's attention keys, averaged over heads, L2-normalised;
  2. split the tokens alternately into A (even positions) and B (odd positions); protected prefix
     tokens (class, distillation, register) take part in neither side;
  3. score every A token against every B token (cosine similarity); keep each A token's best edge;
  4. the r A tokens with the best edges (sources) merge into their B match (destinations) by a
     size-weighted average; sizes start at 1 and add up;
  5. output order: the prefix, the unmerged A tokens (in original order when there is a prefix,
     else in decreasing score order, as the reference code), then B.

  Later attentions add log(size) to their logits (proportional attention, an additive SDPA mask so
  the fused kernel stays); heads that average tokens weight them by size. r is an int, a list (one
  per block) or (r, inflection): a linear ramp from r(1 - i) to r(1 + i). It is clamped to half the
  unprotected tokens of each block.

Diffusion mode, `ToMe(ratio=0.5)` (as tomesd): each output must keep every token, so on each
spatial self-attention merge int(N * ratio) tokens before the attention and unmerge after it (each
source takes its destination's value), optionally around the MLP too. The destinations are one
token per 2x2 cell of the patch grid (the top-left one, or one drawn with `seed`, once when the
pass runs); the metric is the block's input tokens; there is no proportional attention.

Every step is one of the tensor functions below, inserted as one graph node. The merge is a gather
and a scatter_add followed by a divide: `scatter_reduce(mean)` exports to ONNX wrongly.
"""

from __future__ import annotations

import itertools
import math
import operator

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor

from dittofx.errors import PassSpecError, UnsupportedModelError
from dittofx.passes.base import Pass, PassContext, PassResult
from dittofx.rewriter import axes as ax
from dittofx.rewriter.analysis import Analysis, AttentionSite, Block
from dittofx.rewriter.graph import (
    copy_scope,
    descendants,
    sdpa_is_causal,
    sdpa_mask,
    set_sdpa_mask,
)
from dittofx.rewriter.tokens import make_token_sizes_dynamic, token_labels

aten = torch.ops.aten
Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# The algorithm: plain tensor functions, each one node of the rewritten graph.
#
# A matching is three index tensors: `keep` (B, N - r), the positions of the tokens that stay, in
# output order; `src` (B, r), the positions of the tokens merged away; `dst` (B, r), where in the
# output each of those goes.


def head_mean(key: Tensor) -> Tensor:
    """The ToMe metric: keys (B, heads, N, d) averaged over heads -> (B, N, d)."""
    return key.mean(1) if key.dim() == 4 else key


def _best_edges(a: Tensor, b: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine scores of A against B; each A token's best B match; A sorted by that score.
    Returns (the r best A tokens, the other A tokens, the B match of each of the r)."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    src, unm = order[:, :r], order[:, r:]
    return src, unm, node_idx.gather(1, src)


def num_destinations(n: int, protected: int) -> int:
    """How many tokens are in B (odd positions past the protected prefix)."""
    return max(0, (n - protected + protected % 2) // 2)


def bipartite_soft_matching(metric: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's matching on (B, N, C): A = even positions, B = odd, the first `protected` excluded."""
    batch, n = metric.shape[:2]
    a0 = protected + protected % 2  # first unprotected even position
    b0 = protected + 1 - protected % 2  # first unprotected odd position
    src, unm, dst = _best_edges(metric[:, a0::2], metric[:, b0::2], r)
    if protected:
        unm = unm.sort(dim=-1).values  # the reference keeps A in order when a class token exists
    num_b = num_destinations(n, protected)
    keep = torch.cat([torch.arange(protected, device=metric.device).expand(batch, protected),
                      a0 + 2 * unm,
                      (b0 + 2 * torch.arange(num_b, device=metric.device)).expand(batch, num_b)], dim=1)
    return keep, a0 + 2 * src, protected + unm.shape[1] + dst


def grid_matching(metric: Tensor, a_pos: Tensor, b_pos: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """tomesd's matching: B = the given destination positions (one per grid cell), A = the rest."""
    batch = metric.shape[0]
    src, unm, dst = _best_edges(metric.index_select(1, a_pos), metric.index_select(1, b_pos), r)
    keep = torch.cat([a_pos[unm], b_pos.expand(batch, -1)], dim=1)
    return keep, a_pos[src], unm.shape[1] + dst


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b, j]] for (B, N, C) x and (B, M) idx: whole rows, copied (on CPU much faster than a
    gather with an expanded index)."""
    b, n, c = x.shape
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * n).flatten()
    return x.reshape(b * n, c).index_select(0, flat).view(b, -1, c)


def _add_rows(out: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """out[b, idx[b, j]] += rows[b, j], repeated indices accumulating: a scatter-add (in place, except
    while exporting)."""
    b, n, c = out.shape
    if torch.compiler.is_exporting():  # one ScatterElements(add): what ONNX and TensorRT read
        return out.scatter_add(1, idx[..., None].expand(-1, -1, c), rows)
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * n).flatten()
    out.view(b * n, c).index_add_(0, flat, rows.reshape(-1, c))  # whole rows: much faster on CPU
    return out


def _merge_sum(x: Tensor, keep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Kept tokens in output order, each source added into its destination."""
    return _add_rows(_rows(x, keep), dst, _rows(x, src))


def merge_sizes(x: Tensor, size: Tensor | None, keep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Token sizes (B, N, 1) after the merge; None means every token has size 1."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    return _merge_sum(size, keep, src, dst)


def merge_wavg(x: Tensor, size: Tensor | None, new_size: Tensor, keep: Tensor, src: Tensor, dst: Tensor,
               num_dst: int) -> Tensor:
    """The size-weighted average of each group of merged tokens. The destinations are the last
    `num_dst` outputs; the outputs before them are copies of their input tokens."""
    out, moved = _rows(x, keep), _rows(x, src)
    first = out.shape[1] - num_dst
    if size is not None:
        moved = moved * _rows(size, src)
    if torch.compiler.is_exporting():  # functional: Gather, ScatterElements(add), Concat
        groups = out[:, first:] if size is None else out[:, first:] * _rows(size, keep[:, first:])
        groups = _add_rows(groups, dst - first, moved) / new_size[:, first:]
        return torch.cat([out[:, :first], groups], dim=1)
    groups = out[:, first:]  # eager: in place, so that the only large new tensor is `out`
    if size is not None:
        groups.mul_(_rows(size, keep[:, first:]))
    _add_rows(out, dst, moved)
    groups.div_(new_size[:, first:])
    return out


def merge_source(x: Tensor, source: Tensor | None, keep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Which input tokens each token covers: (B, N_out, N_in), 0/1 (groups are disjoint)."""
    if source is None:
        batch, n = x.shape[:2]
        source = torch.eye(n, dtype=x.dtype, device=x.device).expand(batch, n, n).contiguous()
    return _merge_sum(source, keep, src, dst)


def unmerge_index(keep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """For every original token, its position in the merged sequence (B, N)."""
    batch, n_out = keep.shape
    where = torch.zeros(batch, n_out + src.shape[1], dtype=keep.dtype, device=keep.device)
    where = where.scatter(1, keep, torch.arange(n_out, device=keep.device).expand(batch, n_out))
    return where.scatter(1, src, dst)


def unmerge(x: Tensor, where: Tensor) -> Tensor:
    """Every original token back: merged-away tokens take their destination's value."""
    return _rows(x, where)


def proportional_bias(size: Tensor) -> Tensor:
    """log(size) as an additive attention mask (B, 1, 1, N): a token of size s counts s times."""
    return size.log().transpose(1, 2)[:, None]


def add_bias(mask: Tensor, bias: Tensor) -> Tensor:
    """Combine an existing SDPA mask with the proportional-attention bias."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(~mask, -math.inf)
    return mask + bias


def size_weighted_mean(x: Tensor, size: Tensor, offset: int, keepdim: bool) -> Tensor:
    """A mean over tokens (dim 1) that counts each merged token as many times as its size."""
    w = size[:, offset:]
    return (x * w).sum(1, keepdim=keepdim) / w.sum(1, keepdim=keepdim)


def parse_r(layers: int, r) -> list[int]:
    """r per layer: an int, a list (padded with zeros), or (r, inflection): r(1-i) .. r(1+i) linearly."""
    if isinstance(r, list):
        return list(r) + [0] * (layers - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (layers - 1) if layers > 1 else 0.0
    return [int(lo + step * i) for i in range(layers)]


def grid_destinations(h: int, w: int, generator: torch.Generator | None = None, sy: int = 2,
                      sx: int = 2) -> tuple[Tensor, Tensor]:
    """(A, B) positions on an h x w raster: B holds one token per sy x sx cell (top-left, or drawn
    from `generator`); rows and columns beyond the last whole cell are all in A."""
    hs, ws = h // sy, w // sx
    pick = (torch.randint(sy * sx, (hs, ws), generator=generator) if generator is not None
            else torch.zeros(hs, ws, dtype=torch.long))
    rows = torch.arange(hs)[:, None] * sy + pick // sx
    cols = torch.arange(ws)[None, :] * sx + pick % sx
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[(rows * w + cols).flatten()] = True
    return (~is_dst).nonzero().flatten(), is_dst.nonzero().flatten()


class SourceRecorder(nn.Module):
    """Keeps the last source matrix computed (trace_source=True): `opt.tome_source`."""

    _is_impure = True  # its output is unused: keep it through dead-code elimination
    dittofx_recorder = True

    def __init__(self):
        super().__init__()
        self.value, self.stamp = None, 0

    def forward(self, source: Tensor) -> Tensor:
        if not isinstance(source, FakeTensor):
            self.value, self.stamp = source.detach(), next(_calls)
        return source

    def __str__(self) -> str:
        if self.value is None:
            return "not recorded yet (call the model)"
        return f"(batch, tokens, patches) = {tuple(self.value.shape)} from the last call: opt.tome_source"


_calls = itertools.count(1)


def _matching_axes(node: fx.Node, amap: ax.AxisMap):
    batch = amap.axis_of(node.args[0], 0)
    return [(batch, ax.EMPTY)] * 3


def _mean_axes(node: fx.Node, amap: ax.AxisMap):
    axes = amap[node.args[0]]
    return (axes[:1] + (ax.EMPTY,) + axes[2:]) if node.args[3] else (axes[:1] + axes[2:])


for _fn in (merge_wavg, merge_sizes, merge_source, unmerge, head_mean):
    ax.register_rule(_fn, ax.same_as_first_input)
ax.register_rule(bipartite_soft_matching, _matching_axes)
ax.register_rule(grid_matching, _matching_axes)
ax.register_rule(size_weighted_mean, _mean_axes)

# ---------------------------------------------------------------------------------------------
# Where in the graph


def _shape(node) -> tuple[int, ...]:
    return ax.shape_of(node) or ()


def _mask_problem(site: AttentionSite) -> str | None:
    mask = sdpa_mask(site.node)
    if sdpa_is_causal(site.node):
        return "the attention is causal"
    if isinstance(mask, fx.Node) and mask.target not in (proportional_bias, add_bias) \
            and (_shape(mask)[-1:] or (1,))[0] != 1:
        return "the attention has a mask over the tokens"
    return None


def _outputs_carry(analysis: Analysis, labels: frozenset) -> bool:
    """Does any graph output keep the token axis (a model that returns every token)?"""
    if not analysis.blocks or not labels:
        return False
    graph = analysis.blocks[0].sites[0].node.graph
    outputs = []
    for out in graph.find_nodes(op="output"):
        fx.node.map_arg(out.args, outputs.append)
    if any(labels & set(a.labels) for node in outputs for a in analysis.axes[node]):
        return True
    # or that reshapes its tokens back into a grid (a DiT's unpatchify, a video model's frames)
    reshapes = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int)
    return any(sum(bool(labels & set(a.labels)) for a in analysis.axes[n]) > 1
               for n in graph.nodes if n.target in reshapes)


_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
            aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default,
            aten.contiguous.default, aten.to.dtype, aten._to_copy.default, aten.select.int, aten.unbind.int,
            aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
            aten.layer_norm.default, aten.rms_norm.default, aten.mul.Tensor, aten.mul.Scalar,
            aten.div.Tensor, operator.getitem}
_LINEARS = {aten.linear.default, aten.addmm.default, aten.matmul.default, aten.mm.default}


def _projection_input(node: fx.Node) -> fx.Node | None:
    """Walk back from q, k or v to the linear projection; return that projection's input."""
    for _ in range(32):
        if node.target in _LINEARS:
            return node.args[1] if node.target is aten.addmm.default else node.args[0]
        if node.target not in _THROUGH or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _ancestors(node: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _residual_input(site: AttentionSite) -> fx.Node | None:
    """The operand of the attention's residual add that does not come from the attention: the block's
    input tokens (tomesd's metric)."""
    if site.residual is None:
        return None
    from_attention = descendants(site.node) | {site.node}
    others = [a for a in site.residual.args[:2] if isinstance(a, fx.Node) and a not in from_attention]
    return others[0] if len(others) == 1 else None


def _feed_forward(block: Block) -> tuple[fx.Node, fx.Node, set[fx.Node]] | None:
    """(input, output, nodes) of the feed-forward branch that block.mlp_residual closes."""
    stream, res = block.stream, block.mlp_residual
    if stream is None or res is None:
        return None
    branch = [a for a in res.args[:2] if isinstance(a, fx.Node) and a is not stream]
    if len(branch) != 1:
        return None
    out = branch[0]
    for _ in range(8):  # back through gates, dropouts, casts to the last linear
        if out.target in _LINEARS:
            break
        inputs = [a for a in out.args if isinstance(a, fx.Node) and _shape(a) == _shape(out)]
        if out.target not in (aten.mul.Tensor, aten.dropout.default, aten.div.Tensor, aten.to.dtype,
                              aten.clone.default) or not inputs:
            return None
        out = inputs[0]
    if out.target not in _LINEARS:
        return None
    body = _ancestors(out, {stream}) & descendants(stream)
    order = {n: i for i, n in enumerate(stream.graph.nodes)}
    linears = sorted((n for n in body if n.target in _LINEARS), key=order.__getitem__)
    first = linears[0]
    x = first.args[1] if first.target is aten.addmm.default else first.args[0]
    return x, out, body


def _grid(site: AttentionSite) -> tuple[int, int] | None:
    labels = {lab.kind: lab.size for lab in site.seq_axis.labels if lab.kind != "batch"}
    if set(labels) != {"grid_h", "grid_w"} or site.seq_axis.prefix:
        return None
    h, w = labels["grid_h"], labels["grid_w"]
    return (h, w) if h * w == site.tokens else None


def _vit_sites(block: Block) -> list[AttentionSite]:
    return [s for s in block.sites if s.is_self and s.kind in ("spatial", "joint")]


class _Inserter:
    """Appends call_function nodes one after another from a given point, in the scope of `like`."""

    def __init__(self, after: fx.Node, like: fx.Node):
        self.after, self.like, self.nodes = after, like, []

    def __call__(self, fn, *args) -> fx.Node:
        graph = self.after.graph
        with graph.inserting_after(self.after):
            node = graph.call_function(fn, args)
        copy_scope(self.like, node)
        self.after = node
        self.nodes.append(node)
        return node

    def get(self, tuple_node: fx.Node, i: int) -> fx.Node:
        return self(operator.getitem, tuple_node, i)

    def module(self, gm: fx.GraphModule, name: str, module: nn.Module, arg: fx.Node) -> fx.Node:
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(self.after):
            node = gm.graph.call_module(name, (arg,))
        copy_scope(self.like, node)
        self.after = node
        self.nodes.append(node)
        return node


def _reroute(old: fx.Node, new: fx.Node, skip: list[fx.Node], only: set[fx.Node] | None = None) -> None:
    old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in skip and (only is None or u in only))


# ---------------------------------------------------------------------------------------------
# The pass


class ToMe(Pass):
    """Token Merging: `ToMe(r=16)` for ViTs, `ToMe(ratio=0.5)` for diffusion transformers.

    r: tokens merged in each block: an int, a list (one per block, missing blocks 0), or
        (r, inflection) with inflection in [-1, 1]. ViT mode.
    prop_attn: proportional attention: log(size) added to the attention logits after a merge.
    trace_source: record which input tokens each output token covers, (B, N_out, N_in), available
        as `opt.tome_source` after a call.
    ratio: diffusion mode: the share of the tokens of each spatial self-attention merged, in [0, 1).
    merge_mlp: diffusion mode: merge and unmerge around the feed-forward too.
    seed: diffusion mode: draw each 2x2 cell's destination with this seed (None: the top-left one).
    """

    name = "tome"
    changes_tokens = True

    def __init__(self, r=0, prop_attn=True, trace_source=False, ratio=None, merge_mlp=False, seed=None):
        self.r = _check_r(r)
        self.ratio = _check_ratio(ratio)
        for key, value in (("prop_attn", prop_attn), ("trace_source", trace_source), ("merge_mlp", merge_mlp)):
            if not isinstance(value, bool):
                raise PassSpecError(f"tome: {key} must be True or False, got {value!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise PassSpecError(f"tome: seed must be an int or None, got {seed!r}")
        if self.ratio is not None and r != 0:
            raise PassSpecError("tome: give r (ViT mode: merge for good) or ratio (diffusion mode: merge and "
                                "unmerge), not both")
        self.prop_attn, self.trace_source, self.merge_mlp, self.seed = prop_attn, trace_source, merge_mlp, seed

    def options(self) -> dict:
        defaults = {"r": 0, "prop_attn": True, "trace_source": False, "ratio": None, "merge_mlp": False, "seed": None}
        return {k: getattr(self, k) for k, d in defaults.items() if getattr(self, k) != d}

    # -- where it applies

    def check(self, analysis: Analysis, block: Block) -> str | None:
        if self.ratio is not None:
            return self._diffusion_check(analysis, block)
        reason = self._vit_check(analysis, block)
        if reason is None or self.r != 0:
            return reason
        return None if self._diffusion_check(analysis, block) is None else reason

    def _vit_check(self, analysis: Analysis, block: Block) -> str | None:
        sites = _vit_sites(block)
        if not sites:
            return "no self-attention over image tokens"
        if block.stream is None or block.token_dim != 1 or len(_shape(block.stream)) != 3:
            return "no (batch, tokens, channels) residual stream after the attention"
        key = sites[-1].key
        if len(_shape(key)) not in (3, 4) or _shape(key)[-2] != block.tokens:
            return "the attention keys are not (batch, heads, tokens, dim)"
        for site in sites:
            if _mask_problem(site):
                return _mask_problem(site)
        if _outputs_carry(analysis, token_labels(analysis.axes.axis_of(block.stream, 1))):
            return "the model outputs every token: merge and unmerge with ToMe(ratio=...) instead"
        return None

    def _diffusion_check(self, analysis: Analysis, block: Block) -> str | None:
        reasons = [self._site_check(s) for s in block.sites]
        return None if None in reasons else (reasons[0] or "no spatial self-attention")

    def _site_check(self, site: AttentionSite) -> str | None:
        if site.kind != "spatial":
            return f"{site.kind} attention (diffusion mode merges spatial self-attention)"
        if _grid(site) is None:
            return "the tokens are not exactly the patch grid"
        if _mask_problem(site):
            return _mask_problem(site)
        x = _projection_input(site.query)
        if x is None or any(_projection_input(n) is not x for n in (site.key, site.value)):
            return "queries, keys and values do not come from one input"
        metric = _residual_input(site)
        for node in (x, site.output, metric):
            if node is None or len(_shape(node)) != 3 or _shape(node)[1] != site.tokens:
                return "the attention input, output or residual is not (batch, tokens, channels)"
        return None

    # -- the rewrite

    def run(self, ctx: PassContext) -> PassResult:
        analysis = ctx.analysis
        reasons = {b.name: self.check(analysis, b) for b in analysis.blocks}
        if all(reasons.values()):
            first = next(iter(reasons.items()), ("the model", "no attention blocks"))
            raise UnsupportedModelError(f"ToMe has no place to merge in {type(ctx.model).__name__}: "
                                        f"{first[0]}: {first[1]}")
        result = PassResult()
        if self.ratio is not None:
            self._run_diffusion(ctx, result)
        elif self.r == 0:
            result.note(None, "tome: r=0, nothing merged")
        else:
            self._run_vit(ctx, result)
        return result

    def _run_vit(self, ctx: PassContext, result: PassResult) -> None:
        gm, analysis = ctx.gm, ctx.analysis
        blocks = [b for b in analysis.blocks if self._vit_check(analysis, b) is None]
        labels = token_labels(analysis.axes.axis_of(blocks[0].stream, 1))
        blocks = [b for b in blocks if token_labels(analysis.axes.axis_of(b.stream, 1)) == labels]
        schedule = parse_r(len(blocks), self.r)
        if len(schedule) > len(blocks):
            raise PassSpecError(f"tome: r lists {len(schedule)} layers but the model has {len(blocks)} blocks "
                                f"where ToMe applies")
        make_token_sizes_dynamic(gm, analysis.axes, labels)
        tokens, size, bias, source, last = blocks[0].tokens, None, None, None, None
        # token sizes an earlier pass gave (RLT's padded clips: a clip's last token and its copies count
        # as one): its proportional bias on the first attention; continue from those sizes
        initial = next((m for m in map(sdpa_mask, (s.node for s in _vit_sites(blocks[0])))
                        if isinstance(m, fx.Node) and m.target is proportional_bias), None)
        if initial is not None:
            size = initial.args[0]
        for block, r in zip(blocks, schedule):
            sites = _vit_sites(block)
            if bias is not None:
                for site in sites:
                    mask = sdpa_mask(site.node)
                    if isinstance(mask, fx.Node) and mask is not initial:
                        with gm.graph.inserting_before(site.node):
                            bias_here = gm.graph.call_function(add_bias, (mask, bias))
                        copy_scope(site.node, bias_here)
                    else:
                        bias_here = bias
                    set_sdpa_mask(site.node, bias_here)
            limit = (tokens - block.prefix) // 2
            if r > limit:
                result.note(block.name, f"r={r} clamped to {limit} (half the {tokens - block.prefix} "
                                        f"unprotected tokens)")
                r = limit
            if r <= 0:
                continue
            add = _Inserter(block.stream, block.stream)
            metric = add(head_mean, sites[-1].key)
            match = add(bipartite_soft_matching, metric, r, block.prefix)
            keep, src, dst = (add.get(match, i) for i in range(3))
            new_size = add(merge_sizes, block.stream, size, keep, src, dst)
            num_dst = num_destinations(tokens, block.prefix)
            if initial is not None:  # the token count depends on the data (RLT's clips): read it at run time
                num_dst = add(num_destinations, add(aten.sym_size.int, block.stream, 1), block.prefix)
            merged = add(merge_wavg, block.stream, size, new_size, keep, src, dst, num_dst)
            if self.trace_source:
                source = add(merge_source, block.stream, source, keep, src, dst)
            _reroute(block.stream, merged, add.nodes)
            size, last = new_size, merged
            if self.prop_attn:
                bias = add(proportional_bias, size)
            protected = f", {block.prefix} protected" if block.prefix else ""
            result.note(block.name, f"tome: merged {r} tokens after attention ({tokens} -> {tokens - r}{protected})")
            tokens -= r
        if last is None:
            result.note(None, "tome: every block has r=0, nothing merged")
            return
        if self.trace_source:  # keep the final source matrix for `opt.tome_source`
            recorder = SourceRecorder()
            _Inserter(source, source).module(gm, "tome_source", recorder, source)
            result.stats["tome_source"] = recorder
        result.note(None, f"tome: {blocks[0].tokens} tokens -> {tokens} after {len(blocks)} blocks")
        result.changed = True
        self._weight_means(gm, analysis, labels, last, size, tokens, blocks[-1].prefix, result)

    def _weight_means(self, gm, analysis, labels, last, size, tokens, prefix, result) -> None:
        """Means over tokens after the last merge count each token by its size (global pooling)."""
        nodes = list(gm.graph.nodes)
        for node in nodes[nodes.index(last) + 1:]:
            if node.target is size_weighted_mean and node.args[1] is not size:  # an earlier pass's (RLT)
                node.args = (node.args[0], size) + tuple(node.args[2:])
                continue
            if node.target is not aten.mean.dim or node not in analysis.axes.tensors:
                continue
            x, axes = node.args[0], analysis.axes[node.args[0]]
            dims = [d % len(axes) for d in node.args[1]] if axes else []
            if not any(labels & set(axes[d].labels) for d in dims):
                continue
            keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
            offset = prefix - axes[1].prefix
            if dims != [1] or len(axes) != 3 or not 0 <= offset <= prefix:
                result.note(None, f"tome: cannot weight the mean {node.name} by token size")
                continue
            with gm.graph.inserting_before(node):
                weighted = gm.graph.call_function(size_weighted_mean, (x, size, offset, keepdim))
            copy_scope(node, weighted)
            node.replace_all_uses_with(weighted)
            gm.graph.erase_node(node)
            result.note(None, "tome: the mean over tokens in the head weights tokens by size")

    def _run_diffusion(self, ctx: PassContext, result: PassResult) -> None:
        gm, analysis = ctx.gm, ctx.analysis
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        places = [(b, s) for b in analysis.blocks for s in b.sites if self._site_check(s) is None]
        labels = frozenset().union(*(token_labels(s.seq_axis) for _, s in places))
        dynamic, mlp_done = False, set()
        for i, (block, site) in enumerate(places):
            h, w = _grid(site)
            a_pos, b_pos = grid_destinations(h, w, generator)
            r = int(site.tokens * self.ratio)
            if r > len(a_pos):
                result.note(block.name, f"ratio {self.ratio} clamped to {len(a_pos)} of {site.tokens} tokens "
                                        f"(one destination per 2x2 cell)")
                r = len(a_pos)
            if r <= 0:
                continue
            if not dynamic:
                make_token_sizes_dynamic(gm, analysis.axes, labels)
                dynamic = True
            x, metric = _projection_input(site.query), _residual_input(site)
            order = {n: k for k, n in enumerate(gm.graph.nodes)}
            add = _Inserter(max(x, metric, key=order.__getitem__), x)
            consts = []
            for name, value in (("a", a_pos), ("b", b_pos)):
                attr = f"tome_{name}_pos_{i}"
                gm.register_buffer(attr, value, persistent=False)
                with gm.graph.inserting_before(add.after):
                    consts.append(gm.graph.get_attr(attr))
            match = add(grid_matching, metric, consts[0], consts[1], r)
            keep, src, dst = (add.get(match, k) for k in range(3))
            size = add(merge_sizes, x, None, keep, src, dst)
            where = add(unmerge_index, keep, src, dst)
            merged = add(merge_wavg, x, None, size, keep, src, dst, len(b_pos))
            projections = {u for u in x.users if site.node in descendants(u)}
            _reroute(x, merged, add.nodes, projections)
            out = _Inserter(site.output, site.output)
            back = out(unmerge, site.output, where)
            _reroute(site.output, back, out.nodes)
            text = f"tome: {site.module}: merged {r} of {site.tokens} tokens around the attention"
            ff = _feed_forward(block) if self.merge_mlp and block.name not in mlp_done else None
            if ff is not None and _shape(ff[0])[1:2] == (site.tokens,):
                mlp_done.add(block.name)
                ff_x, ff_out, body = ff
                into = _Inserter(ff_x, ff_x)
                ff_merged = into(merge_wavg, ff_x, None, size, keep, src, dst, len(b_pos))
                _reroute(ff_x, ff_merged, into.nodes, body)
                after = _Inserter(ff_out, ff_out)
                _reroute(ff_out, after(unmerge, ff_out, where), after.nodes)
                text += " and the MLP"
            elif self.merge_mlp and block.name not in mlp_done:
                result.note(block.name, "tome: no feed-forward branch found to merge")
            result.note(block.name, text)
            result.changed = True
        if not result.changed:
            result.note(None, f"tome: ratio={self.ratio}, nothing merged")



def _check_r(r):
    def bad():
        return PassSpecError(f"tome: r must be a non-negative int, a list of them (one per block) or "
                             f"(r, inflection) with inflection in [-1, 1]; got {r!r}")

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if count(r):
        return r
    if isinstance(r, list) and all(count(v) for v in r):
        return list(r)
    if isinstance(r, tuple) and len(r) == 2 and count(r[0]) and isinstance(r[1], (int, float)) \
            and not isinstance(r[1], bool) and -1 <= r[1] <= 1:
        return (r[0], float(r[1]))
    raise bad()


def _check_ratio(ratio):
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PassSpecError(f"tome: ratio must be a number in [0, 1) (the share of tokens merged), got {ratio!r}")
    return float(ratio)
