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

  Without r (`ToMe()`, `--pass tome`), r is chosen when the pass runs, from the graph: the largest
  constant r that still leaves half the unprotected tokens after the last block,
  r = (N - prefix) // (2 L) for N tokens into the first of L blocks (at least 1; `default_r`). For
  ViT-S/B/16 at 224 (197 tokens, 12 blocks) that is r=8, the paper's mild setting (a few tenths of
  a point of top-1 off the shelf; r=16, about 2x, leaves 5 tokens by the last block). The report
  says which r was chosen. `r=0` merges nothing (the exact setting).

Diffusion mode, `ToMe(ratio=0.5)` (as tomesd): each output must keep every token, so on each
spatial self-attention merge int(N * ratio) tokens before the attention and unmerge after it (each
source takes its destination's value), optionally around the MLP too. The destinations are one
token per 2x2 cell of the patch grid (the top-left one, or one drawn with `seed`, once when the
pass runs); the metric is the block's input tokens; there is no proportional attention.

Every step is one of the tensor functions of `ops.py`, inserted as one graph node; this file says
where they go. Token sizes and proportional attention are the rewriter's (`rewriter/tokens.py`): a
ToMe pass after RLT continues from the sizes RLT gave its padded clips.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from dittofx.errors import PassSpecError
from dittofx.passes.base import Pass, PassContext, PassResult
from dittofx.passes.tome.ops import (
    SourceRecorder,
    bipartite_soft_matching,
    grid_destinations,
    grid_matching,
    head_mean,
    merge_sizes,
    merge_source,
    merge_wavg,
    num_destinations,
    parse_r,
    unmerge,
    unmerge_index,
)
from dittofx.rewriter import axes as ax
from dittofx.rewriter.analysis import (
    Analysis,
    AttentionSite,
    Block,
    feed_forward,
    outputs_carry,
    patch_grid,
    projection_input,
    stream_in,
)
from dittofx.rewriter.edit import Inserter, arg, copy_scope, descendants, replace_node, reroute, set_arg
from dittofx.rewriter.tokens import (
    add_bias,
    is_size_bias,
    make_token_sizes_dynamic,
    proportional_bias,
    size_weighted_mean,
    sizes_at,
    token_labels,
)

aten = torch.ops.aten


def _shape(node) -> tuple[int, ...]:
    return ax.shape_of(node) or ()


def _attention_problem(site: AttentionSite) -> str | None:
    """What in the attention itself keeps its tokens from being merged."""
    if site.windowed:
        return "the attention runs over windows of the patch grid: a merge would mix tokens of different windows"
    if site.position_bias:
        return ("the attention adds a learned relative-position bias indexed by token position: merged tokens "
                "have no position in it")
    mask = arg(site.node, "attn_mask")
    if arg(site.node, "is_causal", False):
        return "the attention is causal"
    if isinstance(mask, fx.Node) and not is_size_bias(mask) and (_shape(mask)[-1:] or (1,))[0] != 1:
        return "the attention has a mask over the tokens"
    return None


def _vit_sites(block: Block) -> list[AttentionSite]:
    return [s for s in block.sites if s.is_self and s.kind in ("spatial", "joint")]


@dataclass(repr=False)
class ToMe(Pass):
    """Token Merging: `ToMe(r=16)` for ViTs, `ToMe(ratio=0.5)` for diffusion transformers.

    r: tokens merged in each block: an int, a list (one per block, missing blocks 0), or
        (r, inflection) with inflection in [-1, 1]. ViT mode. None (the default): `default_r` of the
        model's token count and depth, chosen when the pass runs.
    prop_attn: proportional attention: log(size) added to the attention logits after a merge.
    trace_source: record which input tokens each output token covers, (B, N_out, N_in), available
        as `opt.tome_source` after a call.
    ratio: diffusion mode: the share of the tokens of each spatial self-attention merged, in [0, 1).
    merge_mlp: diffusion mode: merge and unmerge around the feed-forward too.
    seed: diffusion mode: draw each 2x2 cell's destination with this seed (None: the top-left one).
    """

    name: ClassVar[str] = "tome"
    changes_tokens: ClassVar[bool] = True

    r: int | list | tuple | None = None
    prop_attn: bool = True
    trace_source: bool = False
    ratio: float | None = None
    merge_mlp: bool = False
    seed: int | None = None

    def __post_init__(self):
        self.r = _check_r(self.r)
        self.ratio = _check_ratio(self.ratio)
        for key in ("prop_attn", "trace_source", "merge_mlp"):
            if not isinstance(getattr(self, key), bool):
                raise PassSpecError(f"tome: {key} must be True or False, got {getattr(self, key)!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise PassSpecError(f"tome: seed must be an int or None, got {self.seed!r}")
        if self.ratio is not None and self.r not in (0, None):
            raise PassSpecError("tome: give r (ViT mode: merge for good) or ratio (diffusion mode: merge and "
                                "unmerge), not both")

    # -- where it applies

    def check(self, analysis: Analysis, block: Block) -> str | None:
        if self.ratio is not None:
            return self._diffusion_check(analysis, block)
        reason = self._vit_check(analysis, block)
        if reason is None or self.r not in (0, None):
            return reason
        return None if self._diffusion_check(analysis, block) is None else reason

    def _vit_check(self, analysis: Analysis, block: Block) -> str | None:
        sites = _vit_sites(block)
        if not sites:
            return "no self-attention over image tokens"
        for site in sites:
            if site.windowed or site.position_bias:  # before the stream checks: Swin's is windowed away
                return _attention_problem(site)
        if analysis.poolings:
            return (f"the token count changes between blocks by pooling ({analysis.poolings[0]}): merged tokens "
                    f"are no grid to pool")
        if block.stream is None or block.token_dim != 1 or len(_shape(block.stream)) != 3:
            return "no (batch, tokens, channels) residual stream after the attention"
        key = sites[-1].key
        if len(_shape(key)) not in (3, 4) or _shape(key)[-2] != block.tokens:
            return "the attention keys are not (batch, heads, tokens, dim)"
        for site in sites:
            if problem := _attention_problem(site):
                return problem
        if outputs_carry(analysis, token_labels(analysis.axes.axis_of(block.stream, 1))):
            return "the model outputs every token: merge and unmerge with ToMe(ratio=...) instead"
        return None

    def _diffusion_check(self, analysis: Analysis, block: Block) -> str | None:
        reasons = [self._site_check(s) for s in block.sites]
        return None if None in reasons else (reasons[0] or "no spatial self-attention")

    def _site_check(self, site: AttentionSite) -> str | None:
        if site.kind != "spatial":
            return f"{site.kind} attention (diffusion mode merges spatial self-attention)"
        if patch_grid(site) is None:
            return "the tokens are not exactly the patch grid"
        if problem := _attention_problem(site):
            return problem
        x = projection_input(site.query)
        if x is None or any(projection_input(n) is not x for n in (site.key, site.value)):
            return "queries, keys and values do not come from one input"
        metric = stream_in(site)
        for node in (x, site.output, metric):
            if node is None or len(_shape(node)) != 3 or _shape(node)[1] != site.tokens:
                return "the attention input, output or residual is not (batch, tokens, channels)"
        return None

    # -- the rewrite

    def exact(self) -> ToMe:
        return dataclasses.replace(self, r=0) if self.ratio is None else dataclasses.replace(self, ratio=0.0)

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        if self.ratio is None and self.r is None and \
                not any(self._vit_check(ctx.analysis, b) is None for b in ctx.analysis.blocks):
            reason = next((self._vit_check(ctx.analysis, b) for b in ctx.analysis.blocks), "no blocks")
            raise PassSpecError(f"tome: give ratio for this model (diffusion mode: merge before each attention, "
                                f"unmerge after), e.g. tome:ratio=0.5; r (merge for good) does not apply: {reason}")
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
        r = self.r
        if r is None:
            r = default_r(blocks[0].tokens, blocks[0].prefix, len(blocks))
            result.note(None, f"tome: r={r} (default for {len(blocks)} blocks of {blocks[0].tokens} tokens: leaves "
                              f"half the unprotected tokens after the last block; tome:r=N to choose)")
        schedule = parse_r(len(blocks), r)
        if len(schedule) > len(blocks):
            raise PassSpecError(f"tome: r lists {len(schedule)} layers but the model has {len(blocks)} blocks "
                                f"where ToMe applies")
        make_token_sizes_dynamic(gm, analysis.axes, labels)
        tokens, size, bias, source, last = blocks[0].tokens, None, None, None, None
        # token sizes an earlier pass gave (RLT's padded clips: a clip's last token and its copies count
        # as one), as the proportional bias of the first attention: continue from those sizes
        given = next((sizes_at(s.node) for s in _vit_sites(blocks[0]) if sizes_at(s.node) is not None), None)
        if given is not None:
            size = given
        for block, r in zip(blocks, schedule):
            sites = _vit_sites(block)
            if bias is not None:
                for site in sites:
                    mask = arg(site.node, "attn_mask")
                    if isinstance(mask, fx.Node) and (given is None or sizes_at(site.node) is not given):
                        with gm.graph.inserting_before(site.node):
                            bias_here = gm.graph.call_function(add_bias, (mask, bias))
                        copy_scope(site.node, bias_here)
                    else:
                        bias_here = bias
                    set_arg(site.node, "attn_mask", bias_here)
            limit = (tokens - block.prefix) // 2
            if r > limit:
                result.note(block.name, f"r={r} clamped to {limit} (half the {tokens - block.prefix} "
                                        f"unprotected tokens)")
                r = limit
            if r <= 0:
                continue
            add = Inserter(block.stream)
            metric = add(head_mean, sites[-1].key)
            keep, src, dst = add.getitems(add(bipartite_soft_matching, metric, r, block.prefix), 3)
            new_size = add(merge_sizes, block.stream, size, keep, src, dst)
            num_dst = num_destinations(tokens, block.prefix)
            if given is not None:  # the token count depends on the data (RLT's clips): read it at run time
                num_dst = add(num_destinations, add(aten.sym_size.int, block.stream, 1), block.prefix)
            merged = add(merge_wavg, block.stream, size, new_size, keep, src, dst, num_dst)
            if self.trace_source:
                source = add(merge_source, block.stream, source, keep, src, dst)
            reroute(block.stream, merged, skip=add.nodes)
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
            Inserter(source).module(gm, "tome_source", recorder, source)
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
            keepdim = bool(arg(node, "keepdim", False))
            offset = prefix - axes[1].prefix
            if dims != [1] or len(axes) != 3 or not 0 <= offset <= prefix:
                result.note(None, f"tome: cannot weight the mean {node.name} by token size")
                continue
            replace_node(node, size_weighted_mean, (x, size, offset, keepdim))
            result.note(None, "tome: the mean over tokens in the head weights tokens by size")

    def _run_diffusion(self, ctx: PassContext, result: PassResult) -> None:
        gm, analysis = ctx.gm, ctx.analysis
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        places = [(b, s) for b in analysis.blocks for s in b.sites if self._site_check(s) is None]
        labels = frozenset().union(*(token_labels(s.seq_axis) for _, s in places))
        dynamic, mlp_done = False, set()
        for i, (block, site) in enumerate(places):
            h, w = patch_grid(site)
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
            x, metric = projection_input(site.query), stream_in(site)
            order = {n: k for k, n in enumerate(gm.graph.nodes)}
            add = Inserter(max(x, metric, key=order.__getitem__), like=x)
            consts = []
            for name, value in (("a", a_pos), ("b", b_pos)):
                attr = f"tome_{name}_pos_{i}"
                gm.register_buffer(attr, value, persistent=False)
                with gm.graph.inserting_before(add.after):
                    consts.append(gm.graph.get_attr(attr))
            keep, src, dst = add.getitems(add(grid_matching, metric, consts[0], consts[1], r), 3)
            size = add(merge_sizes, x, None, keep, src, dst)
            where = add(unmerge_index, keep, src, dst)
            merged = add(merge_wavg, x, None, size, keep, src, dst, len(b_pos))
            reroute(x, merged, skip=add.nodes, only={u for u in x.users if site.node in descendants(u)})
            out = Inserter(site.output)
            reroute(site.output, out(unmerge, site.output, where), skip=out.nodes)
            text = f"tome: {site.module}: merged {r} of {site.tokens} tokens around the attention"
            ff = feed_forward(block) if self.merge_mlp and block.name not in mlp_done else None
            if ff is not None and ff.output is not None and _shape(ff.input)[1:2] == (site.tokens,):
                mlp_done.add(block.name)
                into = Inserter(ff.input)
                reroute(ff.input, into(merge_wavg, ff.input, None, size, keep, src, dst, len(b_pos)),
                        skip=into.nodes, only=ff.body)
                after = Inserter(ff.output)
                reroute(ff.output, after(unmerge, ff.output, where), skip=after.nodes)
                text += " and the MLP"
            elif self.merge_mlp and block.name not in mlp_done:
                result.note(block.name, "tome: no feed-forward branch found to merge")
            result.note(block.name, text)
            result.changed = True
        if not result.changed:
            result.note(None, f"tome: ratio={self.ratio}, nothing merged")



def default_r(tokens: int, prefix: int, blocks: int) -> int:
    """ToMe's r when none is given: the largest constant r that leaves at least half of the `tokens - prefix`
    unprotected tokens after `blocks` merges, at least 1 (r=8 for 197 tokens, 1 protected, 12 blocks)."""
    return max(1, (tokens - prefix) // (2 * max(1, blocks)))


def _check_r(r):
    if r is None:
        return None

    def bad():
        return PassSpecError(f"tome: r must be a non-negative int, a list of them (one per block), (r, inflection) "
                             f"with inflection in [-1, 1], or None (chosen from the model's depth); got {r!r}")

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
