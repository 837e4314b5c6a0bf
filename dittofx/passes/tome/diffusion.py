"""ToMe's diffusion mode: merge before each attention, unmerge after.

`ToMe(ratio=0.5)`, as tomesd: each output must keep every token, so on each
spatial self-attention merge int(N * ratio) tokens before the attention and unmerge after it (each
source takes its destination's value), optionally around the MLP too. The destinations are one
token per 2x2 cell of the patch grid (the top-left one, or one drawn with `seed`, once when the
pass runs); the metric is the block's input tokens; there is no proportional attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dittofx.passes.base import PassContext, PassResult
from dittofx.passes.tome.attention import attention_problem
from dittofx.passes.tome.attention import shape as _shape
from dittofx.passes.tome.ops import (
    grid_destinations,
    grid_matching,
    merge_sizes,
    merge_wavg,
    unmerge,
    unmerge_index,
)
from dittofx.rewriter.analysis import (
    Analysis,
    AttentionSite,
    Block,
    feed_forward,
    patch_grid,
    projection_input,
    stream_in,
)
from dittofx.rewriter.edit import Inserter, descendants, reroute
from dittofx.rewriter.tokens import (
    make_token_sizes_dynamic,
    token_labels,
)

if TYPE_CHECKING:
    from dittofx.passes.tome import ToMe

aten = torch.ops.aten


def diffusion_check(tome: ToMe, analysis: Analysis, block: Block) -> str | None:
    reasons = [site_check(s) for s in block.sites]
    return None if None in reasons else (reasons[0] or "no spatial self-attention")


def site_check(site: AttentionSite) -> str | None:
    if site.kind != "spatial":
        return f"{site.kind} attention (diffusion mode merges spatial self-attention)"
    if patch_grid(site) is None:
        return "the tokens are not exactly the patch grid"
    if problem := attention_problem(site):
        return problem
    x = projection_input(site.query)
    if x is None or any(projection_input(n) is not x for n in (site.key, site.value)):
        return "queries, keys and values do not come from one input"
    metric = stream_in(site)
    for node in (x, site.output, metric):
        if node is None or len(_shape(node)) != 3 or _shape(node)[1] != site.tokens:
            return "the attention input, output or residual is not (batch, tokens, channels)"
    return None


def run_diffusion(tome: ToMe, ctx: PassContext, result: PassResult) -> None:
    gm, analysis = ctx.gm, ctx.analysis
    generator = torch.Generator().manual_seed(tome.seed) if tome.seed is not None else None
    places = [(b, s) for b in analysis.blocks for s in b.sites if site_check(s) is None]
    labels = frozenset().union(*(token_labels(s.seq_axis) for _, s in places))
    dynamic, mlp_done = False, set()
    for i, (block, site) in enumerate(places):
        h, w = patch_grid(site)
        a_pos, b_pos = grid_destinations(h, w, generator)
        r = int(site.tokens * tome.ratio)
        if r > len(a_pos):
            result.note(block.name, f"ratio {tome.ratio} clamped to {len(a_pos)} of {site.tokens} tokens "
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
        ff = feed_forward(block) if tome.merge_mlp and block.name not in mlp_done else None
        if ff is not None and ff.output is not None and _shape(ff.input)[1:2] == (site.tokens,):
            mlp_done.add(block.name)
            into = Inserter(ff.input)
            reroute(ff.input, into(merge_wavg, ff.input, None, size, keep, src, dst, len(b_pos)),
                    skip=into.nodes, only=ff.body)
            after = Inserter(ff.output)
            reroute(ff.output, after(unmerge, ff.output, where), skip=after.nodes)
            text += " and the MLP"
        elif tome.merge_mlp and block.name not in mlp_done:
            result.note(block.name, "tome: no feed-forward branch found to merge")
        result.note(block.name, text)
        result.changed = True
    if not result.changed:
        result.note(None, f"tome: ratio={tome.ratio}, nothing merged")
